"""``--report-to``: experiment trackers through accelerate get the config once and, each step,
the same numeric metrics as metrics.jsonl (MLflow's local file store and Trackio's local
database, no network); a missing tracker package is a one-line error naming the extra."""

from __future__ import annotations

import json
import math
import os
import sqlite3
import subprocess
import sys

import pytest

from npr.train.config import ConfigError, Stage2Config
from npr.train.trackers import parse_report_to, tracked_values
from npr.train.tracking import read_metrics


def test_parse_report_to():
    assert parse_report_to("none") == () and parse_report_to("") == ()
    assert parse_report_to(" MLflow, trackio,mlflow ") == ("mlflow", "trackio")
    with pytest.raises(ValueError, match=r"unknown tracker\(s\) \['neptune'\]"):
        parse_report_to("wandb,neptune")
    with pytest.raises(ConfigError, match="config field 'report_to'"):
        Stage2Config(model="tiny-random-llama", train_data="x", report_to="all")


def test_tracked_values_are_the_numeric_fields():
    record = {
        "stage": "stage1",
        "step": 3,
        "loss": 0.5,
        "tokens": 7,
        "updated": True,
        "grad_norm": None,
        "ratio_max": math.inf,
    }
    assert tracked_values(record) == {"loss": 0.5, "tokens": 7}


def test_missing_tracker_package_names_the_extra_before_any_write(monkeypatch, capsys, tmp_path):
    from npr.cli.main import main

    monkeypatch.setitem(sys.modules, "mlflow", None)
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # absent either way: named first, whatever is installed
    run = tmp_path / "run"
    assert (
        main(
            ["train", "stage2", "--preset", "smoke", "--out", str(run), "--quiet", "--report-to", "mlflow,tensorboard"]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs the package 'mlflow'" in err[0] and "npr[trackers]" in err[0]
    assert not run.exists()


@pytest.mark.slow
def test_mlflow_and_trackio_get_the_jsonl_metrics_and_the_config_once(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    pytest.importorskip("trackio")
    run = tmp_path / "myrun"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "MLFLOW_ALLOW_FILE_STORE": "true",
        "MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri(),
        "TRACKIO_DIR": str(tmp_path / "trackio"),
    }
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "npr.cli.main",
            "train",
            "stage2",
            "--preset",
            "smoke",
            "--out",
            str(run),
            "--quiet",
            "--max-steps",
            "3",
            "--report-to",
            "mlflow,trackio",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in lines] == [1, 2, 3]
    expected = {(r["step"], k): v for r in lines for k, v in tracked_values(r).items()}
    assert {k for _, k in expected} >= {"loss", "grad_norm", "lr", "tokens"}

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3's local file store, for reading back
    client = mlflow.tracking.MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("npr")
    (mlflow_run,) = client.search_runs([experiment.experiment_id])
    assert mlflow_run.info.run_name == "myrun-stage2"
    logged = {
        (m.step, key): m.value
        for key in mlflow_run.data.metrics
        for m in client.get_metric_history(mlflow_run.info.run_id, key)
    }
    assert logged == pytest.approx(expected)
    params = mlflow_run.data.params
    assert params["learning_rate"] == "0.001" and params["report_to"] == "mlflow,trackio"

    db = sqlite3.connect(tmp_path / "trackio" / "npr.db")
    rows = db.execute("select run_name, step, metrics from metrics").fetchall()
    assert {name for name, _, _ in rows} == {"myrun-stage2"}
    logged = {(step, k): v for _, step, metrics in rows for k, v in json.loads(metrics).items()}
    assert logged == pytest.approx(expected)
    configs = db.execute("select config from configs").fetchall()
    assert len(configs) == 1 and json.loads(configs[0][0])["learning_rate"] == 0.001
