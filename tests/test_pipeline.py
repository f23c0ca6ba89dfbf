"""npr pipeline with the smoke preset: every step runs and leaves artefacts that load."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from npr.pipeline import PipelineError, run_pipeline


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipe") / "smoke"
    lines = []
    state = run_pipeline("smoke", out, quiet=True, log=lines.append)
    return out, state, lines


def test_every_step_leaves_loadable_artefacts(smoke_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from npr.tokens import tag_token_ids

    out, state, _ = smoke_run
    assert state["done"] == ["base_eval", "stage1", "zero_eval", "sample", "stage2", "beta_eval", "stage3",
                             "npr_eval", "report"]
    for stage in ("stage1", "stage2", "stage3"):
        assert not (out / stage / "checkpoints").exists()  # dropped once final/ is written
        model = AutoModelForCausalLM.from_pretrained(out / stage / "final")
        tok = AutoTokenizer.from_pretrained(out / stage / "final")
        assert len(tag_token_ids(tok)) == 8 and model.get_input_embeddings().weight.shape[0] == len(tok)
    kept = [json.loads(line) for line in (out / "sample" / "data.jsonl").read_text().splitlines()]
    assert kept and all(r["response"].startswith("<guideline>") for r in kept)
    for step in ("base_eval", "zero_eval", "beta_eval", "npr_eval", "npr_eval/baseline"):
        assert (out / step / "results.json").is_file() and (out / step / "samples.jsonl").is_file()
    results = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in results["rows"]] == ["seed model (plain)", "NPR-Zero (parallel)", "NPR-Beta (parallel)",
                                                     "NPR (parallel)", "NPR (sequential)"]
    page = (out / "report.html").read_text()
    assert "Training curves" in page and "npr-samples" in page


def test_finished_steps_are_not_redone_and_from_redoes(smoke_run):
    out, state, _ = smoke_run
    lines = []
    again = run_pipeline("smoke", out, quiet=True, log=lines.append)
    assert lines == [] and again["done"] == state["done"]
    before = (out / "stage1" / "final" / "model.safetensors").stat().st_mtime_ns
    lines = []
    run_pipeline("smoke", out, from_step="stage3", quiet=True, log=lines.append)
    assert [line.split(":")[0] for line in lines if line.startswith("[")] == ["[7/9] stage3", "[8/9] npr_eval",
                                                                            "[9/9] report"]
    assert (out / "stage1" / "final" / "model.safetensors").stat().st_mtime_ns == before


def test_bad_input(tmp_path):
    with pytest.raises(PipelineError, match="unknown preset"):
        run_pipeline("huge", tmp_path / "x")
    with pytest.raises(PipelineError, match="not a step of this pipeline"):
        run_pipeline("smoke", tmp_path / "x", from_step="coldstart")
    proc = subprocess.run([sys.executable, "-m", "npr.cli.main", "pipeline", "--preset", "smoke", "--from", "nope",
                           "--out", str(tmp_path / "y")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_baseline_adds_sequential_rl_in_plain_mode(smoke_run, tmp_path, monkeypatch):
    """--baseline: NPR's SR trained with plain rollouts and prompt (even where Stage 1's preset rolls
    out in parallel mode, as tiny's does) and evaluated in plain mode; the report gains its row."""
    import shutil

    import yaml

    from npr.train.presets import PRESETS as TRAIN_PRESETS

    monkeypatch.setitem(TRAIN_PRESETS["stage1"], "smoke", dict(TRAIN_PRESETS["stage1"]["smoke"], rollout_mode="parallel"))
    out = tmp_path / "smoke"
    shutil.copytree(smoke_run[0], out)
    state = run_pipeline("smoke", out, from_step="report", baseline=True, quiet=True, log=lambda _: None)
    assert state["done"][-3:] == ["sr", "sr_eval", "report"]
    config = yaml.safe_load((out / "sr" / "config.yaml").read_text())
    assert config["rollout_mode"] == "plain" and config["prompt_style"] == "plain" and config["reward"] == "accuracy"
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert rows[-1]["model"] == "sequential RL baseline (plain)" and rows[-1]["trigger_rate"] == 0.0
