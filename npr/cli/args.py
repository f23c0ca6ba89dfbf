"""Checked command-line values: argparse ``type=`` functions and checks of output paths.

A bad value is refused while the command line is parsed, before anything is loaded or
written: argparse prints ``argument --top-p: must be in (0, 1], got 2`` and exits with 2.
Checks that need torch (is ``cuda`` usable here?) run in ``run`` before any work, through
``npr.models.resolve_device``.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from npr.errors import UsageError

DTYPE_NAMES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16")  # npr.models.DTYPES, without torch


def _number(text: str, kind: type):
    try:
        value = kind(text)
    except ValueError:
        expected = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text, float)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def seed(text: str) -> int:
    """A random seed: 0 <= seed < 2**32, as numpy and torch take on every platform."""
    from npr.validate import seed_problem

    value = _number(text, int)
    problem = seed_problem(value)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return value


def out_path(text: str) -> str:
    """An output path: not empty (``--out ""`` would write into the working directory)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty (an empty path would write into the working directory)")
    return text


def probability(text: str) -> float:
    """A share in (0, 1]: a nucleus mass, a memory fraction."""
    value = _number(text, float)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def dtype_name(text: str) -> str:
    if text not in DTYPE_NAMES:
        raise argparse.ArgumentTypeError(f"{text!r} is not a dtype; use one of {', '.join(DTYPE_NAMES)}")
    return text


def device_name(text: str) -> str:
    """``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (whether this machine has it is checked in ``run``)."""
    kind, _, index = text.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and not index.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use cpu, cuda, cuda:N or mps")
    return text


def non_empty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def check_device(device: str) -> None:
    """Raise ``DeviceError`` (exit 2) when this torch cannot use ``device``; imports torch."""
    from npr.models import resolve_device

    resolve_device(device)


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_out_dir(path: str | Path, flag: str = "--out") -> Path:
    """``path`` as an output directory: it is one, or can be created and written; ``UsageError`` otherwise."""
    _refuse_empty(path, flag)
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} is a file, not a directory; choose another {flag}")
    _check_writable(path, flag)
    return path


def check_out_file(path: str | Path, flag: str = "--out") -> Path:
    """``path`` as an output file: not a directory, and its folder can be written."""
    _refuse_empty(path, flag)
    path = Path(path).expanduser()
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a directory; give a file name, e.g. {path / 'view.html'}")
    _check_writable(path.parent, flag)
    return path


def _refuse_empty(path: str | Path, flag: str) -> None:
    if isinstance(path, str) and not path.strip():
        raise UsageError(f"{flag} is empty, which would write into the working directory; give a path")


def _check_writable(path: Path, flag: str) -> None:
    existing = _nearest_existing(path.absolute())
    if not existing.is_dir():
        raise UsageError(
            f"{flag} {path}: {existing} is a file, so the directory cannot be created; choose another {flag}"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: no permission to write in {existing}; choose another {flag}")
    from npr.validate import probe_writable

    probe_writable(existing, f"{flag} {path}")  # read-only mounts and root's view of permissions
