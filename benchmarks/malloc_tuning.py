"""``npr``'s allocator settings (npr.cli.main.tune_malloc) off vs on: SFT step times, measured in one run.

Runs ``npr train stage2`` for ``--steps`` steps as separate processes with ``NPR_MALLOC_TUNING=0``
and ``=1``, alternated (off, on, on, off, …) so drift falls on both, and prints each run's step
times (from its metrics.jsonl), wall time, system time and peak RSS, then the ratio of the medians
of the summed step times.

    python benchmarks/malloc_tuning.py --train-data runs/tiny/coldstart/data --dtype float32 \\
        --mixed-precision bf16 --batch-size 8 --pack-tokens 2048
    python benchmarks/malloc_tuning.py            # synthetic arithmetic traces, no run needed
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_once(args, tuning: bool, out: Path) -> dict:
    env = {**os.environ, "NPR_MALLOC_TUNING": "1" if tuning else "0", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "npr.cli.main",
        "train",
        "stage2",
        "--model",
        args.model,
        "--train-data",
        args.train_data,
        "--max-steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--pack-tokens",
        str(args.pack_tokens),
        "--dtype",
        args.dtype,
        "--mixed-precision",
        args.mixed_precision,
        "--out",
        str(out),
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    steps = [json.loads(line)["time_step_s"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"steps": steps, "wall": wall, "sys": after.ru_stime - before.ru_stime, "rss_gb": after.ru_maxrss / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--train-data", default="synthetic:arith?n=64&seed=0")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--pack-tokens", type=int, default=2048)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--mixed-precision", default="bf16")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    sums = {False: [], True: []}
    print(
        "| round | tuning | step seconds | sum | wall s | sys s | max RSS GB (children so far) |\n"
        "|---|---|---|---|---|---|---|"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for tuning in (False, True) if r % 2 == 0 else (True, False):
                got = run_once(args, tuning, Path(tmp) / f"{r}-{tuning}")
                sums[tuning].append(sum(got["steps"]))
                print(
                    f"| {r + 1} | {'on' if tuning else 'off'} | {', '.join(f'{t:.1f}' for t in got['steps'])} | "
                    f"{sum(got['steps']):.1f} | {got['wall']:.1f} | {got['sys']:.1f} | {got['rss_gb']:.1f} |",
                    flush=True,
                )
    off, on = statistics.median(sums[False]), statistics.median(sums[True])
    print(f"\nmedian summed step seconds: off {off:.1f}, on {on:.1f}; off / on = {off / on:.2f}")


if __name__ == "__main__":
    main()
