"""Fault injection: kill -9 tiny-random Stage 1/2/3 runs at random moments (while they start,
roll out, update, append metrics, write checkpoints, write final/), then ``--resume`` until
done: the metrics and weights must be bit-identical to an uninterrupted run. Atomic,
verifiable checkpoints: a truncated file is not complete, a damaged one is named, a missing
RNG file is reported as such."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from npr.cli.main import main
from npr.train.tracking import deterministic_fields, read_metrics

ZYGOTE = Path(__file__).with_name("kill_zygote.py")
KILLS_PER_STAGE = 20


class Zygote:
    """The fork server of kill_zygote.py."""

    def __init__(self):
        self.process = subprocess.Popen(
            [sys.executable, str(ZYGOTE)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert json.loads(self.process.stdout.readline()) == {"ready": True}

    def run(self, args: list[str], log: Path, kill_after: float | None = None) -> dict:
        self.process.stdin.write(json.dumps({"args": args, "log": str(log), "kill_after": kill_after}) + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def close(self):
        self.process.stdin.close()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "final" / "model.safetensors")


def _progress(run: Path) -> tuple:
    from npr.train.checkpoint import checkpoint_steps

    return len(read_metrics(run / "metrics.jsonl")), tuple(checkpoint_steps(run)), (run / "final").exists()


def _killed_until_done(zygote, args: list[str], run: Path, log: Path, rng: random.Random, duration: float) -> int:
    """Start the run, kill -9 it at a random moment within half an uninterrupted run's time,
    ``--resume`` it (or start it again when it was killed before writing its config), and so on
    until it finishes (a resumed run has less left to do, so later kills land in later phases:
    rollouts, updates, metrics appends, checkpoint and final writes); returns the kills. A kill
    that cut a run before it got anywhere widens the next window (a busy machine runs slower
    than the uninterrupted reference did), so every run ends."""
    kills, window = 0, duration / 2
    while not (run / "final").exists():
        before = _progress(run)
        resume = ["--resume"] if (run / "config.yaml").exists() else []
        outcome = zygote.run([*args, *resume, "--out", str(run)], log, kill_after=rng.uniform(0.0, window))
        assert outcome["killed"] or outcome["status"] == 0, log.read_text()[-3000:]
        kills += outcome["killed"]
        window = window * 1.5 if _progress(run) == before else duration / 2
    return kills


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["stage1", "stage2", "stage3"])
def test_kill_9_at_random_moments_then_resume_is_bit_identical(tmp_path, zygote, stage):
    """Runs killed KILLS_PER_STAGE times in all (several runs, each killed until it finishes)
    end bit-identical to an uninterrupted run: weights, metrics and rollout logs."""
    args = ["train", stage, "--preset", "smoke", "--quiet", "--save-every", "1", "--max-steps", "3"]
    straight = tmp_path / "straight"
    started = time.monotonic()
    assert zygote.run([*args, "--out", str(straight)], tmp_path / "straight.log") == {"killed": False, "status": 0}
    duration = time.monotonic() - started
    reference = _weights(straight)
    metrics = [deterministic_fields(m) for m in read_metrics(straight / "metrics.jsonl")]
    rng = random.Random(f"kill-{stage}")
    kills, episode = 0, 0
    while kills < KILLS_PER_STAGE:
        run = tmp_path / f"killed{episode}"
        kills += _killed_until_done(zygote, args, run, tmp_path / f"killed{episode}.log", rng, duration)
        weights = _weights(run)
        assert weights.keys() == reference.keys() and all(torch.equal(weights[k], reference[k]) for k in weights)
        assert [deterministic_fields(m) for m in read_metrics(run / "metrics.jsonl")] == metrics
        if stage != "stage2":  # every step's rollouts once, as in the uninterrupted run
            assert (run / "rollouts.jsonl").read_text() == (straight / "rollouts.jsonl").read_text()
        episode += 1


# ----------------------------------------------------------------------------- verifiable checkpoints


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("ckpt") / "run"
    assert (
        main(
            [
                "train",
                "stage2",
                "--preset",
                "smoke",
                "--quiet",
                "--save-every",
                "1",
                "--stop-after",
                "2",
                "--out",
                str(run),
            ]
        )
        == 0
    )
    return run


def _copy(run: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


def _resume_error(capsys, run: Path) -> str:
    capsys.readouterr()
    assert main(["train", "stage2", "--preset", "smoke", "--quiet", "--resume", "--out", str(run)]) == 2
    return capsys.readouterr().err


def test_a_checkpoint_holds_a_manifest_of_every_file(stopped_run):
    from npr.fsio import crc32_file

    checkpoint = stopped_run / "checkpoints" / "step-2"
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert manifest["step"] == 2 and manifest["num_processes"] == 1 and not manifest["sharded"]
    files = sorted(p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.is_file())
    assert sorted(manifest["files"]) == [f for f in files if f != "manifest.json"]
    for name, entry in manifest["files"].items():
        assert entry["size"] == (checkpoint / name).stat().st_size and entry["crc32"] == crc32_file(checkpoint / name)


def test_truncated_weights_make_a_checkpoint_incomplete(stopped_run, tmp_path):
    from npr.train.checkpoint import checkpoint_steps, latest_checkpoint

    run = _copy(stopped_run, tmp_path)
    weights = run / "checkpoints" / "step-2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert checkpoint_steps(run) == [1] and latest_checkpoint(run).name == "step-1"
    assert (
        main(["train", "stage2", "--preset", "smoke", "--quiet", "--save-every", "1", "--resume", "--out", str(run)])
        == 0
    )  # resumes from step 1
    assert [m["step"] for m in read_metrics(run / "metrics.jsonl")] == [1, 2, 3]


def test_a_corrupted_file_is_named_on_load(stopped_run, tmp_path, capsys):
    run = _copy(stopped_run, tmp_path)
    weights = run / "checkpoints" / "step-2" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # same size, different bytes
    weights.write_bytes(bytes(data))
    err = _resume_error(capsys, run)
    assert f"{weights} does not match its checksum" in err and "delete" in err and "step-1" in err


def test_a_missing_rng_file_is_reported_as_such(stopped_run, tmp_path, capsys):
    run = _copy(stopped_run, tmp_path)
    for step in (1, 2):  # every checkpoint lacks it: nothing to fall back to
        (run / "checkpoints" / f"step-{step}" / "rng_state_rank0.pt").unlink()
    err = _resume_error(capsys, run)
    # the manifest lists it, so the checkpoint is incomplete, and the message names the file
    assert "holds no complete checkpoint" in err and "rng_state_rank0.pt is missing" in err
    assert "process" not in err  # not a process-count mismatch


def test_an_rng_file_missing_from_the_manifest_too_is_named(stopped_run, tmp_path, capsys):
    """Even a checkpoint whose manifest agrees (rewritten without the file) names the missing RNG."""
    from npr.fsio import write_manifest

    run = _copy(stopped_run, tmp_path)
    checkpoint = run / "checkpoints" / "step-2"
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    (checkpoint / "rng_state_rank0.pt").unlink()
    write_manifest(checkpoint, {k: v for k, v in manifest.items() if k != "files"})
    err = _resume_error(capsys, run)
    assert "has no rng_state_rank0.pt (the RNG state of process 0)" in err


def test_checkpoint_without_manifest_is_not_complete(stopped_run, tmp_path):
    from npr.train.checkpoint import checkpoint_steps

    run = _copy(stopped_run, tmp_path)
    (run / "checkpoints" / "step-2" / "manifest.json").unlink()
    assert checkpoint_steps(run) == [1]
