"""One writer per run directory: an advisory ``flock`` held for as long as a command writes there.

``npr train``, ``sample``, ``eval`` and ``pipeline`` lock their ``--out`` directory itself (the
directory's own file descriptor, so no lock file is written and none can go stale); ``npr view``
locks a hidden ``.NAME.lock`` beside the HTML file it writes, since that file is replaced by a
rename. The kernel drops a ``flock`` when its holder exits for any reason, ``kill -9`` and power
cuts included, so a crashed run never blocks its own ``--resume``.

A second writer is refused with an ``NprError`` (exit 2) naming the holder's PID and command,
read from ``/proc/locks`` and ``/proc/PID/cmdline`` (Linux; elsewhere the message says "another
process"). Under ``accelerate launch`` only the process of rank 0 takes the lock: the other ranks
of the same run write into the same directory by design.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sys
from pathlib import Path

from npr.errors import NprError


class RunDirLocked(NprError):
    """Another process is writing the same run directory (or output file)."""


def _holder(st: os.stat_result) -> tuple[int, str] | None:
    """(PID, command line) of the process holding a flock on the file ``st`` describes, from /proc/locks."""
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    matches = []
    for line in lines:
        fields = line.split()
        if "->" in fields or len(fields) < 6 or fields[1] != "FLOCK":  # "->": a waiter, not the holder
            continue
        pid, where = fields[4], fields[5]
        if where == device or where.rsplit(":", 1)[-1] == str(st.st_ino):  # overlay file systems report
            matches.append((where == device, int(pid)))  # another device number
    if not matches:
        return None
    pid = max(matches)[1]
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        command = " ".join(raw.decode(errors="replace").split())
    except OSError:
        command = ""
    if len(command) > 200:
        command = command[:199] + "…"
    return pid, command or "(command unknown)"


def _is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0") or 0) == 0


def _describe(path: Path, st: os.stat_result, what: str, flag: str) -> str:
    holder = _holder(st)
    who = f"process {holder[0]} ({holder[1]})" if holder else "another process"
    return f"{flag} {path}: {what} is being written by {who}; wait for it to finish, stop it, or choose another {flag}"


@contextlib.contextmanager
def locked_run_dir(path: str | Path, flag: str = "--out"):
    """Hold the exclusive lock of the run directory ``path`` (created if missing) for the ``with`` block.

    A directory this call created is removed again when the block ends and it is still empty, so a
    command refused after taking the lock leaves nothing behind.
    """
    path = Path(path)
    if not _is_rank_zero():
        yield path
        return
    while True:
        created = _missing_parents(path)
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            _lock(fd, path, "this run directory", flag)  # refused: the holder owns what exists, remove nothing
        except BaseException:
            os.close(fd)
            raise
        if _same_file(path, fd):
            break
        os.close(fd)  # the previous holder removed the (empty) directory after we opened it: lock the new one
    try:
        yield path
    finally:
        for directory in created:  # innermost first, while still locked; stops at the first that is not empty
            try:
                directory.rmdir()
            except OSError:
                break
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def locked_output_file(path: str | Path, flag: str = "--out"):
    """Hold the exclusive lock of the output file ``path`` (through ``.NAME.lock`` beside it)."""
    path = Path(path)
    lock_path = path.with_name(f".{path.name}.lock")
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _lock(fd, path, "this file", flag)
        except BaseException:
            os.close(fd)
            raise
        if _same_file(lock_path, fd):  # the previous holder may have unlinked it between our open and our lock
            break
        os.close(fd)
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock_path.unlink()  # while still locked: a process waiting on this inode retries on the new one
        os.close(fd)


def _lock(fd: int, path: Path, what: str, flag: str) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise RunDirLocked(_describe(path, os.fstat(fd), what, flag)) from None
        # a file system without flock (some network mounts): run unprotected, but say so
        print(
            f"npr: warning: cannot lock {path} ({e.strerror}); nothing stops a second command writing it",
            file=sys.stderr,
        )


def _same_file(path: Path, fd: int) -> bool:
    try:
        st, held = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)


def _missing_parents(path: Path) -> list[Path]:
    """``path`` and those of its parents that do not exist yet, innermost first."""
    missing, p = [], path.absolute()
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    return missing
