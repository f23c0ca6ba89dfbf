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


def tree_files(root: str | Path) -> list[str]:
    """Every regular file under ``root`` (hidden ones included), as sorted relative POSIX paths."""
    root = Path(root)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def write_manifest(root: str | Path, extra: dict | None = None) -> dict:
    """fsync every file under ``root``, then write ``root/manifest.json`` (atomically, LAST)
    listing each file's size and sha256: a directory is complete only once it has one."""
    root = Path(root)
    files = {}
    for name in tree_files(root):
        if name == MANIFEST_FILE:
            continue
        fsync_file(root / name)
        files[name] = {"size": (root / name).stat().st_size, "sha256": sha256_file(root / name)}
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


def manifest_problems(root: str | Path, hashes: bool = True) -> list[str]:
    """What is wrong with ``root`` against its manifest (empty: intact): a missing manifest, a
    missing file, a size or (with ``hashes``) a sha256 that differs, naming each file."""
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
            problems.append(f"{path} has {path.stat().st_size} bytes, the manifest says {entry.get('size')} "
                            "(truncated or overwritten)")
        elif hashes and sha256_file(path) != entry.get("sha256"):
            problems.append(f"{path} does not match its sha256 in the manifest (corrupted)")
    return problems
