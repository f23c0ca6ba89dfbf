"""Fault injection: ``kill -9`` an ``npr eval`` at random moments, then ``--resume`` it.

A driver process imports npr once, then forks each ``npr eval`` (the CLI's ``main``, writing
its own run directory) and SIGKILLs it after a random delay: during start-up, model building,
decoding, an append to samples.jsonl, the atomic rewrite of progress.json, or the results.
After every kill the files a reader would trust must parse, and a final ``--resume`` must end
with samples identical (all but their per-sample timings) to an uninterrupted run's.

Run as a script to drive it by hand: ``python tests/test_eval_kill9.py WORKDIR [KILLS] [SEED]``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

RG = "rg:chain_sum?size=12&seed=5&terms=2"
ARGS = [
    "eval",
    "--model",
    "tiny-random-llama",
    "--benchmarks",
    RG,
    "--k",
    "2",
    "--max-new-tokens",
    "48",
    "--temperature",
    "1.0",
    "--top-p",
    "0.9",
    "--dtype",
    "float32",
    "--kv-cache-gib",
    "0.05",
    "--max-num-seqs",
    "6",
    "--quiet",
]


def _spawn(argv: list[str]) -> int:
    """Fork a child that runs ``npr <argv>`` with its output discarded; returns its pid."""
    pid = os.fork()
    if pid == 0:  # the child never returns into the driver
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        try:
            from npr.cli.main import main

            code = main(argv)
        except BaseException:  # noqa: BLE001 - the exit status reports it
            code = 1
        os._exit(code)
    return pid


def _wait(pid: int) -> int:
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _samples(out: Path) -> list[dict]:
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines() if line.strip()]
    key = lambda r: (r["benchmark"], r["problem_id"], r["sample"])  # noqa: E731
    return sorted(({k: v for k, v in r.items() if k != "wall_time_s"} for r in records), key=key)


def _check_readable(out: Path) -> int:
    """The files npr reads back must parse after any kill; returns the problems committed."""
    for name in ("config.json", "progress.json", "results.json"):
        if (out / name).exists():
            json.loads((out / name).read_text())  # raises on a half-written file
    if not (out / "progress.json").exists():
        return 0
    return sum(len(ids) for ids in json.loads((out / "progress.json").read_text())["done"].values())


def drive(work: Path, kills: int = 20, seed: int = 0) -> dict:
    """Kill ``kills`` running evals; returns what happened (see the test for the checks)."""
    import torch

    torch.set_num_threads(1)
    import reasoning_gym  # noqa: F401
    from transformers import LlamaForCausalLM  # noqa: F401

    import npr.cli.eval  # noqa: F401 - import once here; forked children start warm
    import npr.eval.runner  # noqa: F401
    import npr.models  # noqa: F401

    reference = work / "reference"
    start = time.perf_counter()
    assert _wait(_spawn([*ARGS, "--out", str(reference)])) == 0
    full = time.perf_counter() - start
    expected, problems = _samples(reference), 12  # RG's size
    rng = random.Random(seed)
    stats = {
        "reference_s": round(full, 2),
        "kills": 0,
        "kills_after_progress": 0,
        "kills_before_progress": 0,
        "runs_finished": 0,
        "cycles": 0,
    }
    out = None
    while stats["kills"] < kills:
        if out is None:  # a new run directory; each is killed until one of its runs finishes
            stats["cycles"] += 1
            out = work / f"killed-{stats['cycles']}"
        before = _check_readable(out) if out.exists() else 0
        pid = _spawn([*ARGS, "--out", str(out), "--resume"])
        time.sleep(rng.uniform(0.0, 0.7 * full))
        reaped, status = os.waitpid(pid, os.WNOHANG)
        if reaped == 0:
            os.kill(pid, signal.SIGKILL)
            code = _wait(pid)
        else:
            code = os.waitstatus_to_exitcode(status)  # it had ended before the kill
        if code == -signal.SIGKILL:
            stats["kills"] += 1
            committed = _check_readable(out)
            assert before <= committed <= problems  # nothing committed is lost (== : killed writing the results)
            stats["kills_after_progress" if committed > before else "kills_before_progress"] += 1
        else:  # it finished before the kill landed: this directory is complete
            assert code == 0 and _samples(out) == expected, f"{out} (exit {code}) differs from the uninterrupted run"
            stats["runs_finished"] += 1
            out = None
    if out is not None:
        assert _wait(_spawn([*ARGS, "--out", str(out), "--resume"])) == 0
        assert _samples(out) == expected, f"{out} differs from the uninterrupted run"
        stats["runs_finished"] += 1
    stats["samples"] = len(expected)
    return stats


@pytest.mark.slow
def test_eval_survives_kill_9_at_random_moments(tmp_path):
    """20 kills at random moments; every killed run, resumed, gives the uninterrupted samples."""
    seed = int(os.environ.get("NPR_KILL_SEED", "0"))
    proc = subprocess.run(
        [sys.executable, __file__, str(tmp_path), "20", str(seed)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    assert stats["kills"] == 20 and stats["runs_finished"] >= 1
    # kills landed both before a run committed anything (start-up, model, first steps) and after it had
    assert stats["kills_after_progress"] >= 3 and stats["kills_before_progress"] >= 1, stats
    assert stats["samples"] == 12 * 2


if __name__ == "__main__":
    work = Path(sys.argv[1])
    work.mkdir(parents=True, exist_ok=True)
    result = drive(work, int(sys.argv[2]) if len(sys.argv) > 2 else 20, int(sys.argv[3]) if len(sys.argv) > 3 else 0)
    print(json.dumps(result))
