"""Checkpoint manifest checksums: sha256 one file after another (npr before issue 30) vs CRC-32
on parallel threads (``npr.fsio.write_manifest``/``manifest_problems`` now).

Files are written first, so they sit in the page cache as at save time; the three ways run
alternated in each round and the table prints each one's median GB/s and its speed-up over the
serial sha256 in the same run.

    OMP_NUM_THREADS=1 python benchmarks/checkpoint_checksum.py --files 4 --mib 256 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from npr.fsio import _parallel, checksum_threads, crc32_file, sha256_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=4, help="files (e.g. shards of one checkpoint)")
    parser.add_argument("--mib", type=int, default=256, help="MiB per file")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp) / f"shard{i}.bin" for i in range(args.files)]
        for p in paths:
            p.write_bytes(os.urandom(args.mib << 20))
        total = args.files * (args.mib << 20)
        ways = {
            "sha256, serial (before)": lambda: [sha256_file(p) for p in paths],
            "crc32, serial": lambda: [crc32_file(p) for p in paths],
            f"crc32, {checksum_threads()} threads (now)": lambda: _parallel(crc32_file, paths),
        }
        seconds: dict[str, list[float]] = {name: [] for name in ways}
        for r in range(args.rounds):
            order = list(ways) if r % 2 == 0 else list(reversed(ways))
            for name in order:
                start = time.perf_counter()
                ways[name]()
                seconds[name].append(time.perf_counter() - start)
    base = statistics.median(seconds["sha256, serial (before)"])
    print(f"{args.files} files x {args.mib} MiB, {os.cpu_count()} CPUs, median of {args.rounds} rounds")
    print(f"{'way':32} {'GB/s':>6} {'speed-up':>9}")
    for name, times in seconds.items():
        median = statistics.median(times)
        print(f"{name:32} {total / median / 1e9:6.2f} {base / median:8.2f}x")


if __name__ == "__main__":
    main()
