"""Everything one engine step sends to the device, in one pinned, non-blocking copy.

The host plans a step (scheduler feeds, page-table changes, attention indices, per-row sampling
settings) as integers and floats. ``torch.tensor(data, device="cuda")`` would copy each of them from
pageable memory, and such a copy waits for the device: ten of them per step serialise the host with
the GPU. Here each part is staged on the host, the parts are packed into one int64 buffer (floats
travel as the bits of float64 words), pinned on CUDA, and copied once with ``non_blocking=True``;
each part is then a view of the device buffer, cast on the device where its dtype differs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class StepUpload:
    """Host values of one step; ``add`` returns a handle, ``send`` copies them all, ``upload[handle]``
    is then the part on the device (``shape`` and ``dtype`` as added)."""

    def __init__(self):
        self._parts: list[torch.Tensor] = []  # int64 host words
        self._layout: list[tuple[int, int, tuple[int, ...], torch.dtype]] = []  # (start, end, shape, dtype)
        self._size = 0
        self._device_parts: list[torch.Tensor] | None = None

    def add(self, values: Sequence | torch.Tensor, dtype: torch.dtype = torch.long) -> int:
        """Stage ``values`` (nested lists of numbers, or a host tensor) to arrive as ``dtype``."""
        if self._device_parts is not None:
            raise RuntimeError("StepUpload.add after send")
        floating = dtype.is_floating_point
        host = (
            values
            if isinstance(values, torch.Tensor)
            else torch.tensor(values, dtype=torch.float64 if floating else torch.long)
        )
        host = host.to(torch.float64 if floating else torch.long)
        words = host.reshape(-1).view(torch.long) if floating else host.reshape(-1)
        start = self._size
        self._size += words.numel()
        self._parts.append(words)
        self._layout.append((start, self._size, tuple(host.shape), dtype))
        return len(self._layout) - 1

    def send(self, device: torch.device | str) -> None:
        """Copy every staged part to ``device``: one pinned, non-blocking transfer on CUDA."""
        device = torch.device(device)
        host = torch.cat(self._parts) if self._parts else torch.zeros(0, dtype=torch.long)
        if device.type == "cuda":
            buffer = host.pin_memory().to(device, non_blocking=True)
        else:
            buffer = host.to(device)
        parts = []
        for start, end, shape, dtype in self._layout:
            words = buffer[start:end]
            part = words.view(torch.float64) if dtype.is_floating_point else words
            parts.append(part.view(shape).to(dtype))
        self._device_parts = parts

    def __getitem__(self, handle: int) -> torch.Tensor:
        if self._device_parts is None:
            raise RuntimeError("StepUpload read before send")
        return self._device_parts[handle]
