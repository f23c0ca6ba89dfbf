"""The three stages and rejection sampling end to end with the smoke preset (tiny random model),
bit-identical resume, the 2-process update, and bad input caught before any compute."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_util import torchrun

from npr.cli.main import main
from npr.schema import TAGS
from npr.train.tracking import deterministic_fields, read_metrics


def npr(*args: str) -> int:
    return main([*args])


def npr_subprocess(*args: str, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = (launcher or [sys.executable]) + ["-m", "npr.cli.main", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def _check_vanilla_load(final: Path):
    """final/ loads with vanilla transformers, the 8 tags as single special tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    for tag in TAGS:
        ids = tok.encode(tag, add_special_tokens=False)
        assert len(ids) == 1 and ids[0] < model.get_input_embeddings().weight.shape[0], tag
        assert tag in tok.all_special_tokens
    return model, tok


def test_stage1_smoke(tmp_path):
    run = tmp_path / "s1"
    assert npr("train", "stage1", "--preset", "smoke", "--out", str(run), "--quiet") == 0
    metrics = read_metrics(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(m["rollouts"] == 16 for m in metrics)  # 4 prompts x 4 samples
    assert any(m["updated"] == 1.0 and m["grad_norm"] > 0 for m in metrics)  # DAPO trained on kept groups
    assert all(abs(m["logprob_drift"]) < 1e-4 for m in metrics if m["updated"])  # engine == trainer log-probs
    assert (run / "checkpoints" / "step-3" / "trainer_state.pt").is_file()
    assert len((run / "rollouts.jsonl").read_text().splitlines()) == 48
    _check_vanilla_load(run / "final")


def test_stage1_parallel_rollouts_use_the_tree_mask(tmp_path):
    """--rollout-mode parallel: the engine forks and the update recomputes log-probs with the tree
    mask (a causal recompute of forked branches would drift far above 1e-4)."""
    run = tmp_path / "s1p"
    assert (
        npr(
            "train",
            "stage1",
            "--preset",
            "smoke",
            "--out",
            str(run),
            "--quiet",
            "--rollout-mode",
            "parallel",
            "--rollout-forcing",
            "structure",
            "--dynamic-sampling",
            "false",
            "--max-new-tokens",
            "96",
        )
        == 0
    )
    metrics = read_metrics(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(m["trigger_rate"] == 1.0 and m["updated"] == 1.0 and m["dropped_structure"] == 0 for m in metrics)
    assert all(abs(m["logprob_drift"]) < 1e-4 for m in metrics)
    rows = [json.loads(line) for line in (run / "rollouts.jsonl").read_text().splitlines()]
    assert rows and all(r["branches_per_block"] for r in rows)


def test_sample_then_stage2_smoke(tmp_path):
    out = tmp_path / "sample"
    assert npr("sample", "--preset", "smoke", "--out", str(out), "--quiet") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == 8 and summary["kept"] + sum(summary["dropped"].values()) == 8
    run = tmp_path / "s2"
    assert npr("train", "stage2", "--preset", "smoke", "--out", str(run), "--quiet") == 0
    metrics = read_metrics(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3] and metrics[-1]["loss"] < metrics[0]["loss"]
    model, tok = _check_vanilla_load(run / "final")
    assert model.config.architectures == ["LlamaForCausalLM"]


def test_sample_in_parallel_mode_keeps_canonical_forked_traces(tmp_path):
    from npr.schema import parse, render

    out = tmp_path / "sample"
    assert npr("sample", "--preset", "smoke", "--rollout-mode", "parallel", "--out", str(out), "--quiet") == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]
    assert summary["kept"] == len(rows) > 0
    for row in rows:
        assert render(parse(row["response"])) == row["response"] and parse(row["response"]).blocks


def test_stage3_smoke(tmp_path):
    run = tmp_path / "s3"
    assert (
        npr(
            "train",
            "stage3",
            "--preset",
            "smoke",
            "--out",
            str(run),
            "--quiet",
            "--eval-data",
            "rg:chain_sum?size=4&seed=5&terms=2",
            "--eval-limit",
            "2",
        )
        == 0
    )
    metrics = read_metrics(run / "metrics.jsonl")
    steps = [m for m in metrics if "kept_rate" in m]
    assert [m["step"] for m in steps] == [1, 2, 3]
    assert all(m["trigger_rate"] == 1.0 and m["kept_rate"] == 1.0 for m in steps)  # forced, well-formed traces
    assert all(m["logprob_drift"] < 1e-4 for m in steps)  # tree-masked recompute == engine's parallel decode
    # a learning signal: the model's choice of answer varies the rewards within groups, so PAPO's
    # advantages, loss and gradient are not zero at any step
    assert all(0 < m["accuracy"] < 1 and m["loss"] != 0 and m["grad_norm"] > 0 for m in steps)
    rows = [json.loads(line) for line in (run / "rollouts.jsonl").read_text().splitlines()]
    by_group = {}
    for r in rows:
        by_group.setdefault((r["step"], r["problem_id"]), set()).add(r["reward"])
    assert any(len(rewards) == 2 for rewards in by_group.values())
    evals = [m for m in metrics if "eval_accuracy" in m]
    assert [m["step"] for m in evals] == [0, 3] and evals[0]["eval_rollouts"] == 2
    _check_vanilla_load(run / "final")


@pytest.mark.parametrize("stage", ["stage1", "stage2", "stage3"])
def test_resume_is_bit_identical(tmp_path, stage):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert npr("train", stage, "--preset", "smoke", "--out", str(straight), "--quiet") == 0
    assert npr("train", stage, "--preset", "smoke", "--out", str(resumed), "--quiet", "--stop-after", "1") == 0
    assert not (resumed / "final").exists() and (resumed / "checkpoints" / "step-1").is_dir()
    assert npr("train", stage, "--preset", "smoke", "--out", str(resumed), "--quiet", "--resume") == 0
    a, b = _weights(straight / "final"), _weights(resumed / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma = [deterministic_fields(m) for m in read_metrics(straight / "metrics.jsonl")]
    mb = [deterministic_fields(m) for m in read_metrics(resumed / "metrics.jsonl")]
    assert ma == mb and len(ma) == 3


def npr_error(capsys, *args: str) -> str:
    """Run npr in-process expecting a user-input error (exit 2); return its stderr."""
    capsys.readouterr()
    assert npr(*args) == 2
    return capsys.readouterr().err


def test_resume_refuses_a_changed_config(tmp_path, capsys):
    run = tmp_path / "run"
    assert npr("train", "stage2", "--preset", "smoke", "--out", str(run), "--quiet", "--stop-after", "1") == 0
    err = npr_error(
        capsys, "train", "stage2", "--preset", "smoke", "--out", str(run), "--resume", "--learning-rate", "0.5"
    )
    assert "learning_rate: 0.001 -> 0.5" in err


@pytest.mark.parametrize("stage", ["stage2", "stage1", "stage3"])
def test_two_processes_make_the_same_update(tmp_path, stage):
    """Global batch split over two gloo processes (a free port chosen at run time) vs one
    process: the same rollouts (seeded by global prompt index) and the same update. Stage 2: 4
    examples as 2+2; Stages 1 and 3: 4 prompts as 2+2, each rank generating, scoring and
    filtering its own groups; PAPO's advantages use the std of all 16 rewards."""
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["train", stage, "--preset", "smoke", "--max-steps", "2", "--quiet"]
    assert npr(*args, "--out", str(one)) == 0
    out = npr_subprocess(*args, "--out", str(two), launcher=torchrun(2))
    assert out.returncode == 0, out.stderr[-3000:]
    assert (two / "checkpoints" / "step-2" / "rng_state_rank1.pt").is_file()  # really two processes
    m1, m2 = read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl")
    assert len(m1) == len(m2) == 2
    for a, b in zip(m1, m2):
        exact = (
            ("tokens",) if stage == "stage2" else ("rollouts", "reward", "response_length", "kept_rate", "loss_units")
        )
        assert all(a[k] == b[k] for k in exact)
        if stage == "stage3":
            assert a["loss"] != 0 and a["grad_norm"] > 0  # the smoke preset's learning signal
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    w1, w2 = _weights(one / "final"), _weights(two / "final")
    lr = 1e-3
    for k in w1:  # Adam's first steps move each weight by about lr: compare far below that
        assert torch.allclose(w1[k], w2[k], atol=0.02 * lr, rtol=0), k


def test_missing_model_is_a_clear_error_before_compute(tmp_path):
    """In a fresh interpreter: the message, exit status 2 and no traceback."""
    out = npr_subprocess(
        "train",
        "stage3",
        "--preset",
        "smoke",
        "--model",
        str(tmp_path / "nope" / "final"),
        "--out",
        str(tmp_path / "run"),
    )
    assert out.returncode == 2 and "does not exist" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists()


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, capsys):
    err = npr_error(capsys, "train", "stage1", "--preset", "smoke", "--out", str(tmp_path / "empty"), "--resume")
    assert "--resume" in err and "config.yaml does not exist" in err


def test_fresh_run_refuses_an_existing_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert npr("train", "stage2", "--preset", "smoke", "--out", str(run), "--quiet", "--max-steps", "1") == 0
    assert "already holds a run" in npr_error(capsys, "train", "stage2", "--preset", "smoke", "--out", str(run))


def test_empty_dataset_is_a_clear_error(tmp_path, capsys):
    empty = tmp_path / "data.jsonl"
    empty.write_text("\n")
    run = str(tmp_path / "r")
    assert "empty dataset" in npr_error(
        capsys, "train", "stage2", "--preset", "smoke", "--train-data", str(empty), "--out", run
    )
    assert "no problems" in npr_error(
        capsys, "train", "stage1", "--preset", "smoke", "--train-data", str(empty), "--out", run
    )
    assert not Path(run).exists()


@pytest.mark.parametrize("stage", ["stage1", "stage2", "stage3"])
def test_dataset_line_without_answer_names_file_line_field(tmp_path, capsys, stage):
    data = tmp_path / "data.jsonl"
    good = {"id": "a", "problem": "What is 1+1?", "answer": "2", "response": "<guideline>…"}
    bad = {"id": "b", "problem": "What is 2+2?", "response": "x"}
    data.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    err = npr_error(
        capsys, "train", stage, "--preset", "smoke", "--train-data", str(data), "--out", str(tmp_path / "r")
    )
    assert f"{data}:2: field 'answer'" in err
    assert not (tmp_path / "r").exists()


def test_unknown_yaml_field_is_a_clear_error(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_steps: 2\nclip_hihg: 0.3\n")
    err = npr_error(capsys, "train", "stage1", "--preset", "smoke", "--config", str(cfg), "--out", str(tmp_path / "r"))
    assert f"{cfg}:2" in err and "'clip_hihg'" in err and "did you mean 'clip_high'" in err


def test_sft_drops_malformed_samples_and_counts_them(tmp_path):
    from npr.train.sft_data import synthetic_examples

    rows = [
        {"id": e.id, "problem": e.problem, "answer": e.answer, "response": e.response}
        for e in synthetic_examples("synthetic:arith?n=4")
    ]
    rows.append({**rows[0], "id": "tags-out-of-order", "response": "<step>\n1: x\n</step>\n<guideline>\\boxed{1}"})
    rows.append(
        {
            **rows[0],
            "id": "unclosed",
            "response": "<guideline>\n<plan>1: a plan</plan>\n</guideline>\n<step>\n1: never closed\n\\boxed{1}",
        }
    )
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    assert (
        npr(
            "train",
            "stage2",
            "--preset",
            "smoke",
            "--train-data",
            str(data),
            "--out",
            str(run),
            "--quiet",
            "--max-steps",
            "1",
        )
        == 0
    )
    metrics = read_metrics(run / "metrics.jsonl")
    assert metrics[0]["examples"] == 4 and metrics[0]["dropped"] == 2


def test_tensorboard_flag_without_tensorboard_still_trains(tmp_path):
    run = tmp_path / "run"
    assert (
        npr(
            "train",
            "stage2",
            "--preset",
            "smoke",
            "--out",
            str(run),
            "--quiet",
            "--max-steps",
            "1",
            "--tensorboard",
            "true",
        )
        == 0
    )
    assert (run / "final").is_dir()
    shutil.rmtree(run)


def test_rollout_copy_follows_the_policy(tiny_llama):
    """With rollout_dtype bf16 the engine decodes a copy that sync() refreshes after each update."""
    import copy

    from npr.train.config import Stage3Config
    from npr.train.rollout import RolloutWorker

    model, tok = tiny_llama
    policy = copy.deepcopy(model)
    config = Stage3Config(model="m", train_data="x", rollout_dtype="bfloat16", kv_cache_tokens=1024)
    worker = RolloutWorker(policy, tok, config, mode="parallel")
    assert worker.model is not policy and next(worker.model.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.5)
    worker.sync()
    for (name, p), q in zip(policy.named_parameters(), worker.model.parameters()):
        assert torch.equal(q, p.detach().to(torch.bfloat16)), name


@pytest.mark.slow
def test_tiny_presets_on_the_embedded_model(tmp_path, embedded):
    """Stage 2 then Stage 3 on SmolLM2 with the tiny presets' bf16 paths (autocast, bf16 engine
    copy), shrunk to a couple of steps."""
    s2, s3 = tmp_path / "s2", tmp_path / "s3"
    assert (
        npr(
            "train",
            "stage2",
            "--preset",
            "tiny",
            "--model",
            "embedded",
            "--quiet",
            "--out",
            str(s2),
            "--train-data",
            "synthetic:chain_sum?size=4&seed=3&terms=2&digits=1",
            "--batch-size",
            "2",
            "--max-steps",
            "2",
        )
        == 0
    )
    assert all(math.isfinite(m["loss"]) for m in read_metrics(s2 / "metrics.jsonl"))
    assert (
        npr(
            "train",
            "stage3",
            "--preset",
            "tiny",
            "--model",
            str(s2 / "final"),
            "--quiet",
            "--out",
            str(s3),
            "--prompts-per-step",
            "2",
            "--samples-per-prompt",
            "2",
            "--max-new-tokens",
            "96",
            "--max-steps",
            "1",
            "--eval-data",
            "none",
        )
        == 0
    )
    metrics = read_metrics(s3 / "metrics.jsonl")
    assert len(metrics) == 1 and metrics[0]["rollouts"] == 4
    _check_vanilla_load(s3 / "final")
