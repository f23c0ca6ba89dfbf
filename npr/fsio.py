"""Crash-safe file writes: a reader sees the old complete file or the new complete file, never half of one.

Each write goes to a temporary name in the same directory, is fsynced, then renamed over the target
(``os.replace`` is atomic on POSIX within one file system), and the directory is fsynced so the
rename itself survives a power cut.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def fsync_dir(path: str | Path) -> None:
    """Flush a directory entry (a rename or a new file) to disk; a no-op where the OS can't."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a directory; the rename is still atomic
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj, indent: int | None = 1) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")
