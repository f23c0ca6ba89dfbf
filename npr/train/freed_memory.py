"""Give freed memory back to the device or the OS between phases that need it elsewhere."""

from __future__ import annotations

import ctypes
import gc
import sys

import torch


def return_freed_memory(device: torch.device | str = "cpu") -> bool:
    """Collect garbage, then return freed memory: CUDA's cached blocks (``empty_cache``) on a CUDA
    device; on a CPU the heap's free pages (glibc's ``malloc_trim``), which the ``npr`` command's
    allocator settings otherwise keep resident for reuse (npr.cli.main.tune_malloc). Returns
    whether memory was handed back (False: not glibc, or nothing to trim)."""
    gc.collect()  # models and engines may sit in reference cycles
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):  # not glibc
        return False
