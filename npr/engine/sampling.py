"""Batched, device-side token sampling: repetition penalty, temperature, top-k, top-p, log-probs.

Every row of a step is processed at once on the model's device. What the host decides (which rows
draw how, their settings and noise) travels in the step's one upload (``plan_sampling``); the only
transfer back is the final token ids and log-probs (one per step, not one per row).

**Reproducible noise.** A row draws one uniform number from a counter-based hash of its *key*
``(seed, sample, block, branch, offset)`` (``row_uniform``, blake2b): no generator state exists, so what a
stream samples does not depend on which other streams share the batch, on the engine mode, or on
a preemption that recomputed its KV. The token is then the inverse CDF of the row's (filtered)
distribution at that number:

- ``temperature == 0``: argmax;
- no top-k and no top-p: the categorical over the whole vocabulary (cumulative sum in float64);
- top-k and/or top-p: the top candidates in descending order (``CANDIDATES``, or ``top_k`` when
  larger), top-k first, then the nucleus of the renormalised top-k mass (a token is kept while the
  mass strictly before it is below ``top_p``, so the top token always is; HF's and vLLM's order).
  A row whose nucleus is wider than the candidates (flagged with the tokens, so the check costs no
  extra transfer) is redrawn over the fully sorted vocabulary: the same rule, the same number, the
  same token.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from npr.engine.upload import StepUpload

CANDIDATES = 256  # top-k/top-p rows look at this many tokens first


_INT63 = 0x7FFF_FFFF_FFFF_FFFF


def row_uniform(*key: int) -> float:
    """A uniform number in [0, 1) from an integer key (blake2b: identical on every platform)."""
    if min(key) < 0 or max(key) > _INT63:
        key = tuple(k & _INT63 for k in key)
    digest = hashlib.blake2b(struct.pack(f"<{len(key)}q", *key), digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> 11) * 2.0**-53


def row_uniforms(keys: Sequence[Sequence[int]]) -> list[float]:
    """``row_uniform`` of each key (a step's drawing rows)."""
    return [row_uniform(*key) for key in keys]


@dataclass
class RowParams:
    """Per-row settings of one step, as lists on the host (one entry per logits row)."""

    temperature: list[float]
    top_p: list[float]
    top_k: list[int]
    uniform: list[float]


@dataclass
class RowClass:
    """Rows of one step drawn the same way (``StepUpload`` handles of their index and settings)."""

    rows: list[int]
    index: int  # [r] their logits rows
    temperature: int | None  # [r] float32; None: all 1.0
    uniform: int  # [r] float64
    width: int = 0  # nucleus rows: candidates looked at
    top_k: int | None = None  # [r]
    top_p: int | None = None  # [r] float32


@dataclass
class SamplingPlan:
    """How one step samples, decided on the host from ``RowParams`` (never from device data)."""

    rows: int
    greedy: bool  # some rows take the argmax
    full: RowClass | None  # categorical over the whole vocabulary
    nucleus: RowClass | None  # top-k and/or top-p


def plan_sampling(params: RowParams, upload: StepUpload, vocab: int) -> SamplingPlan:
    """Split the rows by how they draw and stage each class's indices and settings in ``upload``."""
    sampled = [i for i, t in enumerate(params.temperature) if t > 0]
    full = [i for i in sampled if params.top_p[i] >= 1.0 and params.top_k[i] <= 0]
    filtered = [i for i in sampled if params.top_p[i] < 1.0 or params.top_k[i] > 0]

    def row_class(rows: list[int], nucleus: bool) -> RowClass | None:
        if not rows:
            return None
        temperature = [params.temperature[i] for i in rows]
        cls = RowClass(
            rows,
            upload.add(rows),
            upload.add(temperature, torch.float32) if any(t != 1.0 for t in temperature) else None,
            upload.add([params.uniform[i] for i in rows], torch.float64),
        )
        if nucleus:
            cls.width = min(vocab, max(CANDIDATES, *(params.top_k[i] for i in rows)))
            cls.top_k = upload.add([params.top_k[i] for i in rows])
            cls.top_p = upload.add([params.top_p[i] for i in rows], torch.float32)
        return cls

    return SamplingPlan(
        len(params.temperature),
        len(sampled) < len(params.temperature),
        row_class(full, False),
        row_class(filtered, True),
    )


def apply_repetition_penalty(
    logits: torch.Tensor, seen_ids: torch.Tensor, penalty: torch.Tensor, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """HF/CTRL rule in place on ``logits`` [R, V]: for the token ids ``seen_ids`` [r, w] (long) of each
    penalised row, divide positive scores by ``penalty`` [r] and multiply negative ones by it. Row i of
    ``seen_ids`` describes row ``rows[i]`` of ``logits`` (default: row i); a row's ids may repeat (its
    table pads with its first id: the repeats write the same value) and a row with ``penalty`` 1 is
    left as it is. Only the listed entries are read and written, with shapes the host knows: no pass
    over [R, V] and no ``nonzero`` (which would wait for the device)."""
    vocab = logits.shape[1]
    first = torch.arange(len(seen_ids), device=logits.device) if rows is None else rows
    flat = (first[:, None] * vocab + seen_ids).reshape(-1)  # [r*w] entries of logits.view(-1)
    entries = logits.view(-1)  # logits is contiguous: edited in place
    values = entries.index_select(0, flat).view(seen_ids.shape)  # [r, w]
    p = penalty[:, None]
    entries.index_copy_(0, flat, torch.where(values < 0, values * p, values / p).reshape(-1))
    return logits


def _inverse_cdf(weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Index drawn from each row of non-negative ``weights`` [R, C] at ``uniform`` [R] (float64 sums)."""
    cdf = weights.double().cumsum(-1)  # [R, C]
    target = uniform * cdf[:, -1]  # [R]
    index = torch.searchsorted(cdf, target[:, None], right=True)[:, 0]  # first entry with cdf > target
    return index.clamp_(max=weights.shape[1] - 1)


def _nucleus(
    z: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, uniform: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k then top-p draw over the ``width`` best tokens of ``z`` [R, V] (scaled logits).

    Returns (token ids [R], wide [R] bool: the nucleus may extend past ``width``, redraw wider).
    """
    values, index = z.topk(width, dim=-1)  # [R, C] descending
    probs = torch.exp(values - torch.logsumexp(z, dim=-1, keepdim=True))  # [R, C]: mass over the whole vocabulary
    rank = torch.arange(width, device=z.device)[None, :]
    k = torch.where(top_k > 0, top_k, z.shape[1])[:, None]  # [R, 1]
    in_k = rank < k
    kept = probs * in_k
    total = kept.sum(-1, keepdim=True)  # [R, 1] candidate mass
    inside = k <= width  # the whole top-k set is among the candidates: renormalise over it
    norm = torch.where(inside, total, torch.ones_like(total))  # else over the whole vocabulary (top_k 0)
    before = (kept.cumsum(-1) - kept) / norm  # renormalised mass strictly before each token
    keep = in_k & (before < top_p[:, None])
    choice = _inverse_cdf(kept * keep, uniform)
    # the candidates hold the whole nucleus unless they are fewer than k and their mass falls short of top_p
    wide = ~inside[:, 0] & (total[:, 0] < top_p)
    return index.gather(1, choice[:, None])[:, 0], wide


def sample(
    logits: torch.Tensor, params: RowParams, plan: SamplingPlan | None = None, upload: StepUpload | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of processed ``logits`` [R, V] (float32). Returns (tokens [R] int64, wide
    [R] bool): rows flagged ``wide`` must be redrawn with ``redraw_wide``. ``plan`` and its sent
    ``upload`` come from ``plan_sampling`` (the engine stages them with the rest of its step);
    without them the plan is made and sent here."""
    device = logits.device
    if plan is None:
        upload = StepUpload()
        plan = plan_sampling(params, upload, logits.shape[1])
        upload.send(device)
    # greedy rows take the argmax (a pass over [R, V] only when there are some)
    tokens = logits.argmax(-1) if plan.greedy else torch.zeros(plan.rows, dtype=torch.long, device=device)
    wide = torch.zeros(plan.rows, dtype=torch.bool, device=device)
    for cls in (plan.full, plan.nucleus):
        if cls is None:
            continue
        index = upload[cls.index]
        z = logits if len(cls.rows) == plan.rows else logits.index_select(0, index)  # [r, V]
        if cls.temperature is not None:
            z = z / upload[cls.temperature][:, None]
        if cls is plan.nucleus:
            chosen, row_wide = _nucleus(z, upload[cls.top_k], upload[cls.top_p], upload[cls.uniform], cls.width)
            wide.index_copy_(0, index, row_wide)
        else:
            chosen = _inverse_cdf(torch.softmax(z, dim=-1), upload[cls.uniform])
        tokens.index_copy_(0, index, chosen)
    return tokens, wide


def redraw_wide(logits: torch.Tensor, params: RowParams, rows: list[int]) -> list[int]:
    """Tokens of ``rows`` drawn over the fully sorted vocabulary (their nucleus outgrew the candidates)."""
    device = logits.device
    index = torch.tensor(rows, device=device)
    temperature = torch.tensor([params.temperature[i] for i in rows], device=device)
    z = logits.index_select(0, index) / temperature[:, None]
    top_k = torch.tensor([params.top_k[i] for i in rows], device=device)
    top_p = torch.tensor([params.top_p[i] for i in rows], device=device)
    uniform = torch.tensor([params.uniform[i] for i in rows], dtype=torch.float64, device=device)
    return _nucleus(z, top_k, top_p, uniform, z.shape[1])[0].tolist()


class SeenTokens:
    """The distinct tokens each branch sampled (repetition penalty), by seen slot: ordered lists on the
    host, and ``ids`` [slots, capacity] long on the device holding them (a row's entries past its
    list repeat its first id). The host knows every list's length, so a step reads ``ids[slots, :w]``
    with a width it chose; changes are staged in the step's upload."""

    def __init__(self, slots: int, device, capacity: int = 256):
        self.ids = torch.zeros(slots, capacity, dtype=torch.long, device=device)
        self.lists: list[list[int]] = [[] for _ in range(slots)]
        self._sets: list[set[int]] = [set() for _ in range(slots)]
        self._dirty: dict[int, int] = {}  # slot -> first column changed since the last upload
        self._staged: tuple[int | None, int | None] = (None, None)

    def reset(self, slot: int, history: list[int]) -> None:
        """Slot ``slot`` now holds a branch that sampled ``history`` (empty for a new one)."""
        self.lists[slot] = list(dict.fromkeys(history))
        self._sets[slot] = set(self.lists[slot])
        self._dirty[slot] = 0

    def add(self, slot: int, token: int) -> None:
        if token not in self._sets[slot]:
            self._sets[slot].add(token)
            self.lists[slot].append(token)
            self._dirty.setdefault(slot, len(self.lists[slot]) - 1)

    def width(self, slots: list[int]) -> int:
        """Columns to read for ``slots``: their longest list, rounded up to a power of two (few shapes)."""
        longest = max(len(self.lists[s]) for s in slots)
        return min(self.ids.shape[1], 1 << max(3, (longest - 1).bit_length()))

    def stage(self, upload: StepUpload) -> None:
        longest = max((len(self.lists[s]) for s in self._dirty), default=0)
        if longest > self.ids.shape[1]:  # rare: double, the new columns repeating each row's first id
            extra = max(longest, 2 * self.ids.shape[1]) - self.ids.shape[1]
            self.ids = torch.cat([self.ids, self.ids[:, :1].expand(-1, extra)], dim=1)
        fills = [(s, self.lists[s][0]) for s, start in self._dirty.items() if start == 0 and self.lists[s]]
        writes = [
            (s, c, self.lists[s][c]) for s, start in self._dirty.items() for c in range(start, len(self.lists[s]))
        ]
        self._staged = (upload.add(fills) if fills else None, upload.add(writes) if writes else None)
        self._dirty = {}

    def apply(self, upload: StepUpload) -> None:
        fills, writes = self._staged
        self._staged = (None, None)
        if fills is not None:
            slot, token = upload[fills].unbind(1)
            self.ids[slot] = token[:, None].expand(-1, self.ids.shape[1])
        if writes is not None:
            slot, column, token = upload[writes].unbind(1)
            self.ids[slot, column] = token
