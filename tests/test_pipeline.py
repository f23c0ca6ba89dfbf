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
    assert state["done"] == [
        "base_eval",
        "stage1",
        "zero_eval",
        "sample",
        "stage2",
        "beta_eval",
        "stage3",
        "npr_eval",
        "report",
    ]
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
    assert [r["model"] for r in results["rows"]] == [
        "seed model (plain)",
        "NPR-Zero (parallel)",
        "NPR-Beta (parallel)",
        "NPR (parallel)",
        "NPR (sequential)",
    ]
    rows = {r["model"]: r for r in results["rows"]}
    for key in (
        "plan_diversity",
        "distinct_plans",
        "off_mode_plan_rate",
        "branch_redundancy",
        "branches_by_size",
        "size_branch_correlation",
    ):
        assert all(key in r for r in rows.values()), key
    npr_row = rows["NPR (parallel)"]  # the alternated timing (smoke: 2 rounds) feeds the speedup columns
    assert npr_row["speedup_median"] is not None and npr_row["latency_speedup"] is not None
    assert npr_row["speedup_min"] <= npr_row["speedup_median"] <= npr_row["speedup_max"]
    assert "speedup_median" not in rows["NPR (sequential)"]
    page = (out / "report.html").read_text()
    assert "Training curves" in page and "npr-samples" in page and "plan diversity" in page


def test_finished_steps_are_not_redone_and_from_redoes(smoke_run):
    out, state, _ = smoke_run
    lines = []
    again = run_pipeline("smoke", out, quiet=True, log=lines.append)
    assert lines == [] and again["done"] == state["done"]
    before = (out / "stage1" / "final" / "model.safetensors").stat().st_mtime_ns
    lines = []
    run_pipeline("smoke", out, from_step="stage3", quiet=True, log=lines.append)
    assert [line.split(":")[0] for line in lines if line.startswith("[")] == [
        "[7/9] stage3",
        "[8/9] npr_eval",
        "[9/9] report",
    ]
    assert (out / "stage1" / "final" / "model.safetensors").stat().st_mtime_ns == before


def test_bad_input(tmp_path):
    with pytest.raises(PipelineError, match="unknown preset"):
        run_pipeline("huge", tmp_path / "x")
    with pytest.raises(PipelineError, match="not a step of this pipeline"):
        run_pipeline("smoke", tmp_path / "x", from_step="coldstart")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "npr.cli.main",
            "pipeline",
            "--preset",
            "smoke",
            "--from",
            "nope",
            "--out",
            str(tmp_path / "y"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_baseline_adds_sequential_rl_in_plain_mode(smoke_run, tmp_path, monkeypatch):
    """--baseline: NPR's SR trained with plain rollouts and prompt (even where Stage 1's preset rolls
    out in parallel mode, as tiny's does) and evaluated in plain mode; the report gains its row."""
    import shutil

    import yaml

    from npr.train.presets import PRESETS as TRAIN_PRESETS

    monkeypatch.setitem(
        TRAIN_PRESETS["stage1"], "smoke", dict(TRAIN_PRESETS["stage1"]["smoke"], rollout_mode="parallel")
    )
    out = tmp_path / "smoke"
    shutil.copytree(smoke_run[0], out)
    state = run_pipeline("smoke", out, from_step="report", baseline=True, quiet=True, log=lambda _: None)
    assert state["done"][-3:] == ["sr", "sr_eval", "report"]
    config = yaml.safe_load((out / "sr" / "config.yaml").read_text())
    assert config["rollout_mode"] == "plain" and config["prompt_style"] == "plain" and config["reward"] == "accuracy"
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert rows[-1]["model"] == "sequential RL baseline (plain)" and rows[-1]["trigger_rate"] == 0.0


# ----------------------------------------------------------------------------- ownership (no step runs)


@pytest.fixture
def fake_steps(monkeypatch):
    """Steps that only write a marker file, so ownership is tested in milliseconds."""
    import npr.pipeline as pipeline

    ran = []

    def make(name):
        def step(run):
            ran.append(name)
            run.step_dir(name).mkdir(parents=True, exist_ok=True)
            (run.step_dir(name) / "made").write_text(name)

        return step

    monkeypatch.setattr(pipeline, "STEP_FUNCTIONS", {name: make(name) for name in pipeline.STEPS})
    return ran


def test_foreign_directory_is_refused_and_left_intact(tmp_path, fake_steps):
    """docs/training.md trains by hand into runs/tiny/stage1; the pipeline on runs/tiny must not wipe it."""
    out = tmp_path / "tiny"
    (out / "stage1" / "final").mkdir(parents=True)
    (out / "stage1" / "final" / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(PipelineError, match="did not create.*--overwrite"):
        run_pipeline("smoke", out, log=lambda _: None)
    assert (out / "stage1" / "final" / "model.safetensors").read_bytes() == b"weights"
    assert fake_steps == [] and not (out / "pipeline.json").exists()


def test_pre_manifest_run_is_refused(tmp_path, fake_steps):
    out = tmp_path / "old"
    (out / "stage1").mkdir(parents=True)
    (out / "pipeline.json").write_text(json.dumps({"done": ["base_eval"], "seconds": {}, "preset": "smoke"}))
    with pytest.raises(PipelineError, match="without run manifests"):
        run_pipeline("smoke", out, log=lambda _: None)
    assert (out / "stage1").is_dir()


def test_overwrite_deletes_only_the_pipelines_names(tmp_path, fake_steps):
    out = tmp_path / "run"
    (out / "stage1").mkdir(parents=True)
    (out / "stage1" / "old").write_text("x")
    (out / "notes.txt").write_text("mine")
    state = run_pipeline("smoke", out, log=lambda _: None, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "stage1" / "old").exists() and (out / "stage1" / "made").read_text() == "stage1"
    assert state["done"] == fake_steps and set(state["created"]) == set(state["done"])


def test_owned_run_continues_and_redoes_only_what_it_created(tmp_path, fake_steps):
    out = tmp_path / "run"
    run_pipeline("smoke", out, log=lambda _: None)
    fake_steps.clear()
    run_pipeline("smoke", out, log=lambda _: None, from_step="stage3")
    assert fake_steps == ["stage3", "npr_eval", "report"]
    with pytest.raises(PipelineError, match="preset 'smoke'.*--overwrite"):
        run_pipeline("tiny", out, log=lambda _: None)


def test_interrupted_step_is_owned_and_redone(tmp_path, fake_steps, monkeypatch):
    """A step killed mid-way was recorded as created before it wrote anything, so the next call may
    delete and redo it; a step directory the manifest does not list is refused."""
    import npr.pipeline as pipeline

    out = tmp_path / "run"

    def dies(run):
        run.step_dir("stage1").mkdir()
        (run.step_dir("stage1") / "half").write_text("half")
        raise KeyboardInterrupt

    monkeypatch.setitem(pipeline.STEP_FUNCTIONS, "stage1", dies)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline("smoke", out, log=lambda _: None)
    assert "stage1" in json.loads((out / "pipeline.json").read_text())["created"]
    (out / "zero_eval").mkdir()  # somebody else's directory under a step's name
    monkeypatch.setitem(pipeline.STEP_FUNCTIONS, "stage1", lambda run: run.step_dir("stage1").mkdir())
    with pytest.raises(PipelineError, match="did not create it"):
        run_pipeline("smoke", out, log=lambda _: None)
    assert not (out / "stage1" / "half").exists()  # the half-written step it owned was cleared and redone
    assert (out / "zero_eval").is_dir()


def test_table_cells_by_hand():
    from npr.pipeline_report import by_size_text, cell, speed_fields, speed_text

    assert speed_text(1.3125, 1.2, 1.4, 1.62) == "1.31× [1.20–1.40] (ideal 1.62×)" and speed_text(None, 1, 2, 3) == "–"
    assert by_size_text({"2": 2.0, "3": 2.94, "4": 3.8}) == "2: 2.0, 3: 2.9, 4: 3.8" and by_size_text({}) == "–"
    speed = {
        "batched": {"speedup_median": 1.2, "speedup_min": 1.1, "speedup_max": 1.3, "ideal": 1.6},
        "batch1": {"speedup_median": 1.5, "speedup_min": 1.4, "speedup_max": 1.55, "ideal": 1.7},
    }
    row = {"distinct_plans": 212, "plan_diversity": 0.4, **speed_fields(speed)}
    assert cell(row, "latency_speedup", "latency") == "1.50× [1.40–1.55] (ideal 1.70×)"
    assert cell(row, "distinct_plans", "int") == "212" and cell(row, "plan_diversity", "pct") == "40.0%"
    assert cell(row, "branch_redundancy", "pct") == "–" and speed_fields(None) == {}


def test_results_table_keeps_whole_cells_in_a_log_file(tmp_path):
    """Printed to a file (not a terminal, 80 columns by default) the 14-column table used to cut every
    cell to '0.…'; it must keep them whole."""
    import io

    from rich.console import Console

    from npr.cli.pipeline import print_results

    row = {
        "model": "NPR-Beta (parallel)",
        "avg_at_k": 0.2109375,
        "best_at_k": 0.3125,
        "format_valid_rate": 0.546875,
        "trigger_rate": 0.9921875,
        "branches_per_block": 2.7165,
        "plan_diversity": 0.3568,
        "distinct_plans": 76,
        "branch_redundancy": 0.0,
        "branches_by_size": {"2": 1.9375, "3": 2.8, "4": 3.109},
        "size_branch_correlation": 0.4354,
        "tokens_per_second": 256.7,
        "speedup": None,
    }
    (tmp_path / "results.json").write_text(
        json.dumps({"preset": "tiny", "held_out": "gen:x", "k": 4, "rows": [row], "total_seconds": 60.0})
    )
    buffer = io.StringIO()
    print_results(Console(file=buffer), str(tmp_path), {})
    text = buffer.getvalue()
    assert "NPR-Beta (parallel)" in text and "21.1" in text and "99.2" in text and "…" not in text
