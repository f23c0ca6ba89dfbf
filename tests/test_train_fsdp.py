"""FSDP2 (accelerate's plugin) on two and three gloo CPU processes: the same loss trajectory as
one process, sharded checkpoints that re-shard on resume, a plain final model, and invalid
setups refused before any compute."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from distributed_util import torchrun

from npr.cli.main import main
from npr.train.tracking import deterministic_fields, read_metrics

# one process vs FSDP over 2 (and, resumed, 3) processes: the same global batch of 6 examples;
# only the order of float reductions differs
LOSS_REL = 1e-5
# Adam moves a weight by ~lr = 1e-3 per step, and by ~lr whatever the size of its gradient, so a near-zero gradient
# element's rounding shows: 1 vs 2 processes differed by 5.6e-7 at most with the full-logits head, 1.5e-6 (one element
# of layer 0's gate_proj; losses within 1e-5, grad norms within 1e-4) with the chunked head's other summation order
WEIGHT_ATOL = 2e-6


def launch(nproc: int, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*torchrun(nproc), "-m", "npr.cli.main", *args], capture_output=True, text=True, timeout=600, env=env, cwd=cwd
    )


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


STAGE2 = ["train", "stage2", "--preset", "smoke", "--batch-size", "6", "--quiet"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process; FSDP over two processes (a checkpoint every step); its step-1 checkpoint
    resumed on three processes."""
    root = tmp_path_factory.mktemp("fsdp")
    one, two, three = root / "one", root / "two", root / "three"
    assert main([*STAGE2, "--out", str(one)]) == 0
    out = launch(2, *STAGE2, "--fsdp", "true", "--save-every", "1", "--keep-checkpoints", "0", "--out", str(two))
    assert out.returncode == 0, out.stderr[-3000:]
    shutil.copytree(two, three)
    shutil.rmtree(three / "final")
    for step in (2, 3):
        shutil.rmtree(three / "checkpoints" / f"step-{step}")
    out = launch(3, *[a for a in STAGE2 if a != "--quiet"], "--resume", "--out", str(three))
    assert out.returncode == 0, out.stderr[-3000:]
    return one, two, three, out.stdout + out.stderr


def test_fsdp_follows_the_single_process_loss_trajectory(runs):
    one, two, _, _ = runs
    m1, m2 = read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl")
    assert [m["step"] for m in m2] == [1, 2, 3]
    for a, b in zip(m1, m2):
        assert a["tokens"] == b["tokens"]
        assert b["loss"] == pytest.approx(a["loss"], rel=LOSS_REL)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    w1, w2 = _weights(one / "final"), _weights(two / "final")
    assert w1.keys() == w2.keys()
    assert all(torch.allclose(w1[k], w2[k], atol=WEIGHT_ATOL, rtol=0) for k in w1)


def test_fsdp_checkpoints_are_sharded_and_the_final_model_is_plain(runs):
    from transformers import AutoModelForCausalLM

    _, two, _, _ = runs
    checkpoint = two / "checkpoints" / "step-1"
    shards = sorted(p.name for p in (checkpoint / "sharded").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # one file per process
    assert not (checkpoint / "model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(two / "final")  # vanilla transformers
    assert model.config.architectures == ["LlamaForCausalLM"]


def test_a_sharded_checkpoint_resumes_on_another_process_count(runs):
    """Two processes wrote step-1; three resume it (torch.distributed.checkpoint re-shards) and
    end where the two-process run ended."""
    _, two, three, log = runs
    assert "written by 2 process(es), this run has 3" in log
    m2 = [deterministic_fields(m) for m in read_metrics(two / "metrics.jsonl")]
    m3 = [deterministic_fields(m) for m in read_metrics(three / "metrics.jsonl")]
    assert m3[0] == m2[0]  # step 1 is the one written by two processes
    for a, b in zip(m2[1:], m3[1:]):
        assert b["loss"] == pytest.approx(a["loss"], rel=LOSS_REL)
    w2, w3 = _weights(two / "final"), _weights(three / "final")
    assert all(torch.allclose(w2[k], w3[k], atol=WEIGHT_ATOL, rtol=0) for k in w2)


@pytest.mark.parametrize(
    "extra",
    [[], ["--cpu-offload", "true", "--release-engine-for-update", "on"]],
    ids=["resident", "offloaded-and-released"],
)
def test_fsdp_stage3_with_bf16_and_checkpointing_matches_one_process(tmp_path, extra):
    """The RL path under FSDP: the engine decodes a gathered copy refreshed after each update;
    PAPO's batch statistics over both processes; bf16 mixed precision and gradient
    checkpointing. bf16 compute differs in kind between FSDP's policy (bf16 parameters) and
    one process's autocast (fp32 parameters, bf16 matmuls), so losses agree to 2% only. Also with
    the shards offloaded to host memory and the gathered copy and KV pool freed for each update
    (rebuilt and re-gathered after it)."""
    args = ["train", "stage3", "--preset", "smoke", "--max-steps", "2", "--quiet", "--mixed-precision", "bf16"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    out = launch(2, *args, "--fsdp", "true", "--gradient-checkpointing", "true", *extra, "--out", str(tmp_path / "two"))
    assert out.returncode == 0, out.stderr[-3000:]
    m1, m2 = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    for a, b in zip(m1, m2):
        assert (a["rollouts"], a["reward"], a["kept_rate"]) == (b["rollouts"], b["reward"], b["kept_rate"])
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-2) and b["loss"] != 0
        # the engine decodes the gathered fp32 copy; the trainer's forward runs in bf16
        assert b["logprob_drift"] < 0.05


def test_fsdp_on_one_process_is_refused_before_compute(tmp_path, capsys):
    capsys.readouterr()
    assert main(["train", "stage2", "--preset", "smoke", "--fsdp", "true", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "FSDP shards the model over processes and this launch has one" in err and "--nproc_per_node" in err
    assert not (tmp_path / "r").exists()


def test_cpu_offload_follows_the_single_process_loss_trajectory(runs, tmp_path):
    """accelerate's FSDP2 CPU offload (CPUOffloadPolicy, unpinned without an accelerator) runs on gloo CPU
    processes: the same losses and weights as one process."""
    one = runs[0]
    out = launch(2, *STAGE2, "--fsdp", "true", "--cpu-offload", "true", "--out", str(tmp_path / "off"))
    assert out.returncode == 0, out.stderr[-3000:]
    m1, m2 = read_metrics(one / "metrics.jsonl"), read_metrics(tmp_path / "off" / "metrics.jsonl")
    assert len(m1) == len(m2) == 3
    for a, b in zip(m1, m2):
        assert b["loss"] == pytest.approx(a["loss"], rel=LOSS_REL)
    w1, w2 = _weights(one / "final"), _weights(tmp_path / "off" / "final")
    assert all(torch.allclose(w1[k], w2[k], atol=WEIGHT_ATOL, rtol=0) for k in w1)


def test_cpu_offload_without_fsdp_is_refused_before_compute(tmp_path, capsys):
    capsys.readouterr()
    assert main(["train", "stage2", "--preset", "smoke", "--cpu-offload", "true", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "cpu_offload" in err and "needs fsdp true" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_a_layer_class_fsdp_cannot_wrap_is_refused_before_compute(tmp_path):
    out = launch(
        2,
        "train",
        "stage2",
        "--preset",
        "smoke",
        "--fsdp",
        "true",
        "--fsdp-layer-class",
        "NoSuchLayer",
        "--out",
        str(tmp_path / "r"),
    )
    message = "has no module of class NoSuchLayer, so FSDP cannot wrap it"
    assert out.returncode != 0 and message in out.stderr
    assert "exitcode  : 2" in out.stderr  # each process: one line and exit 2; torchrun's own report follows
    assert out.stderr.index(message) < out.stderr.find("Traceback")
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_fsdp_run_killed_mid_step_resumes_bit_identical(runs, tmp_path):
    """kill -9 every process of an FSDP run (the whole process group) at a random moment after
    its first sharded checkpoint, then --resume on two processes: the same metrics and weights
    as the uninterrupted FSDP run."""
    import random
    import signal
    import time

    from npr.train.checkpoint import checkpoint_steps

    _, two, _, _ = runs
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    rng = random.Random(0)
    for attempt in range(4):  # on an idle machine the short run may finish before the kill lands: try again sooner
        run = tmp_path / f"killed{attempt}"
        args = [*STAGE2, "--fsdp", "true", "--save-every", "1", "--keep-checkpoints", "0", "--out", str(run)]
        process = subprocess.Popen(
            [*torchrun(2), "-m", "npr.cli.main", *args],
            env=env,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 300
        while not checkpoint_steps(run) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 1.0) / 4**attempt)
        killed = process.poll() is None
        os.killpg(process.pid, signal.SIGKILL)  # the launcher and both workers at once
        process.wait()
        if killed and not (run / "final").exists():
            break
    assert killed and not (run / "final").exists()
    out = launch(2, *args, "--resume")
    assert out.returncode == 0, out.stderr[-3000:]
    assert [deterministic_fields(m) for m in read_metrics(run / "metrics.jsonl")] == [
        deterministic_fields(m) for m in read_metrics(two / "metrics.jsonl")
    ]
    a, b = _weights(two / "final"), _weights(run / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)
