"""Crash-safe file writes: a reader sees the old complete file or the new complete file, never half of one.

Each write goes to a temporary name in the same directory, is fsynced, then renamed over the target
(``os.replace`` is atomic on POSIX within one file system), and the directory is fsynced so the
rename itself survives a power cut.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# what writers that do not raise OSError say when the disk fills: safetensors (Rust io::Error), torch's zip writer
DISK_FULL_TEXTS = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")
SHORT_WRITE_TEXTS = ("unexpected pos", "file write failed")  # torch.save after a short write: full, or another fault
NEARLY_FULL_BYTES = 64 << 20
# how each command continues after the space is freed
CONTINUE_HINTS = {
    "train": "run the same command again with --resume: it continues from the last checkpoint",
    "eval": "run the same command again with --resume: it continues from the last finished problem",
    "pipeline": "run the same command again: it continues from the step that was cut short",
}


def disk_full_message(path: str | Path | None, command: str | None) -> str:
    where = f"the device holding {path}" if path else "the output device"
    hint = CONTINUE_HINTS.get(command or "", "run the same command again")
    return f"no space left on {where}; free some space (or choose another --out), then {hint}"


def is_disk_full(error: BaseException, path: str | Path | None = None) -> bool:
    """Whether ``error`` (or what caused it) says the disk or quota is full. A short write from torch.save
    counts when the file system of ``path`` has less than 64 MiB left (measured before any clean-up)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            return True
        text = str(error)
        if any(marker in text for marker in DISK_FULL_TEXTS):
            return True
        if path is not None and any(marker in text for marker in SHORT_WRITE_TEXTS):
            try:
                return shutil.disk_usage(_existing(Path(path))).free < NEARLY_FULL_BYTES
            except OSError:
                return False
        error = error.__cause__ or error.__context__
    return False


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def disk_full_path(error: BaseException) -> str | None:
    """The file an ``OSError`` in ``error``'s chain names, if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.filename:
            path = Path(error.filename)  # a temporary removed by the clean-up: name its directory
            return str(path if path.exists() else path.parent)
        error = error.__cause__ or error.__context__
    return None


def as_disk_full(error: BaseException, path: str | Path) -> OSError | None:
    """``error`` as one ``OSError(ENOSPC)`` naming ``path`` when it says the disk is full (else None):
    writers such as torch.save report a full disk as a RuntimeError without the file's name."""
    if not is_disk_full(error, path):
        return None
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


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
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk (or Ctrl-C) leaves the old file and no temporary beside it
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj, indent: int | None = 1) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


# ----------------------------------------------------------------------------- directory manifests

MANIFEST_FILE = "manifest.json"


def fsync_file(path: str | Path) -> None:
    """Flush a file written by someone else's writer (torch.save, save_pretrained) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def crc32_file(path: str | Path, chunk: int = 1 << 24) -> str:
    """CRC-32 of a file's bytes as 8 hex digits. A manifest's checksum guards against torn, truncated
    or bit-flipped files, not against tampering, so a non-cryptographic checksum is enough: zlib's runs
    at ~2x sha256's speed on one core and, like the file reads, releases the GIL (``file_checksums``
    runs files in parallel threads)."""
    import zlib

    value = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            value = zlib.crc32(block, value)
    return f"{value:08x}"


def checksum_threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _parallel(function, items: list, threads: int | None = None) -> list:
    """``[function(x) for x in items]`` on a thread pool (hashing and fsync release the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    threads = min(threads or checksum_threads(), len(items))
    if threads <= 1:
        return [function(x) for x in items]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(function, items))


def tree_files(root: str | Path) -> list[str]:
    """Every regular file under ``root`` (hidden ones included), as sorted relative POSIX paths."""
    root = Path(root)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def write_manifest(root: str | Path, extra: dict | None = None) -> dict:
    """fsync every file under ``root``, then write ``root/manifest.json`` (atomically, LAST)
    listing each file's size and CRC-32 (``crc32_file``; files in parallel threads): a directory
    is complete only once it has one."""
    root = Path(root)

    def entry(name: str) -> dict:
        fsync_file(root / name)
        return {"size": (root / name).stat().st_size, "crc32": crc32_file(root / name)}

    names = [name for name in tree_files(root) if name != MANIFEST_FILE]
    files = dict(zip(names, _parallel(entry, names)))
    for directory in {(root / name).parent for name in files} | {root}:
        fsync_dir(directory)
    manifest = {**(extra or {}), "files": files}
    atomic_write_json(root / MANIFEST_FILE, manifest)
    return manifest


def read_manifest(root: str | Path) -> dict | None:
    """The manifest of ``root``, or None when it has none or an unreadable one."""
    try:
        manifest = json.loads((Path(root) / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else None


def manifest_problems(root: str | Path, hashes: bool = True, part: tuple[int, int] = (0, 1)) -> list[str]:
    """What is wrong with ``root`` against its manifest (empty: intact): a missing manifest, a
    missing file, a size or (with ``hashes``) a checksum that differs, naming each file.
    ``part=(k, n)`` checksums only every n-th listed file from the k-th (n processes verifying one
    directory, each its own share); sizes are checked for all. A manifest written before the
    CRC-32 (``sha256`` entries) is checked with sha256."""
    root = Path(root)
    manifest = read_manifest(root)
    if manifest is None:
        return [f"{root / MANIFEST_FILE} is missing or unreadable (the directory was never completed)"]
    problems = []
    for name, entry in manifest["files"].items():
        path = root / name
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != entry.get("size"):
            problems.append(
                f"{path} has {path.stat().st_size} bytes, the manifest says {entry.get('size')} "
                "(truncated or overwritten)"
            )
    if hashes and not problems:
        mine = [item for i, item in enumerate(manifest["files"].items()) if i % part[1] == part[0]]
        mine = [(root / name, entry) for name, entry in mine]
        for (path, _entry), matches in zip(mine, _parallel(_matches_checksum, mine)):
            if not matches:
                problems.append(f"{path} does not match its checksum in the manifest (corrupted)")
    return problems


def _matches_checksum(item: tuple[Path, dict]) -> bool:
    path, entry = item
    if "crc32" in entry:
        return crc32_file(path) == entry["crc32"]
    return sha256_file(path) == entry.get("sha256")
