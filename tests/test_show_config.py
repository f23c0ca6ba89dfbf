"""--show-config for every stage and preset (and npr eval): each field's value and source, nothing loaded."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import yaml

from npr.cli.main import main
from npr.train.config import STAGE_CONFIGS
from npr.train.overrides import resolve_config
from npr.train.presets import PRESETS

# A field the preset sets, overridden by a flag (value as typed, as parsed)
OVERRIDE = {
    "stage1": ("max-new-tokens", "77", "max_new_tokens", 77),
    "stage2": ("max-seq-len", "2000", "max_seq_len", 2000),
    "stage3": ("max-new-tokens", "77", "max_new_tokens", 77),
    "sample": ("max-new-tokens", "77", "max_new_tokens", 77),
}
# what a run needs on top of the qwen3-4b presets; a model spec that does not exist: nothing may load it
REQUIRED = ["--model", "no-such-org/no-such-model", "--train-data", "no-such-file.jsonl"]


def _command(stage: str) -> list[str]:
    return ["sample"] if stage == "sample" else ["train", stage]


def _sources(text: str) -> dict[str, str]:
    """field -> the comment after its value (the source)."""
    out = {}
    for line in text.splitlines():
        if not line.startswith("#") and "  # " in line:
            out[line.split(":", 1)[0]] = line.split("  # ", 1)[1]
    return out


@pytest.mark.parametrize("stage", sorted(PRESETS))
@pytest.mark.parametrize("preset", ["smoke", "tiny", "qwen3-4b"])
def test_show_config_every_stage_and_preset(stage, preset, capsys):
    flag, typed, field, value = OVERRIDE[stage]
    assert field in PRESETS[stage][preset], "the override must hit a field the preset sets"
    assert main([*_command(stage), "--preset", preset, "--show-config", f"--{flag}", typed, *REQUIRED]) == 0
    out = capsys.readouterr().out
    shown = yaml.safe_load(out)
    expected = resolve_config(
        stage, STAGE_CONFIGS[stage], preset, flags={"model": REQUIRED[1], "train_data": REQUIRED[3], field: typed}
    )
    assert shown == asdict(expected)  # every field, in YAML that --config reads back
    assert shown[field] == value
    sources = _sources(out)
    assert set(sources) == set(shown)
    assert sources[field] == "flag" and sources["model"] == "flag"
    for name in PRESETS[stage][preset]:
        if name not in (field, "model", "train_data"):
            assert sources[name].startswith(f"preset {preset}"), name
    untouched = [f for f in shown if f not in PRESETS[stage][preset] and f not in (field, "model", "train_data")]
    assert untouched and all(sources[f].startswith("default") for f in untouched)


def test_show_config_without_required_fields_still_shows(capsys):
    """The qwen3-4b presets leave --train-data to the user: the config is shown, with what is missing."""
    assert main(["train", "stage3", "--preset", "qwen3-4b", "--show-config"]) == 0
    captured = capsys.readouterr()
    shown = yaml.safe_load(captured.out)
    assert shown["learning_rate"] == 1e-7 and shown["train_data"] == ""
    assert "not runnable" in captured.out and "train_data" in captured.err


def test_show_config_yaml_file_source_and_round_trip(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rate: 4e-5\nseed: 3\n")
    assert main(["train", "stage1", "--preset", "tiny", "--config", str(cfg), "--seed", "5", "--show-config"]) == 0
    out = capsys.readouterr().out
    sources = _sources(out)
    assert sources["learning_rate"] == f"file {cfg}" and sources["seed"] == "flag"
    assert sources["model"] == "preset tiny" and sources["weight_decay"] == "default"
    # the printed YAML is a config file: read back, it resolves to the same config
    again = tmp_path / "shown.yaml"
    again.write_text(out)
    assert resolve_config("stage1", STAGE_CONFIGS["stage1"], config_path=again) == resolve_config(
        "stage1", STAGE_CONFIGS["stage1"], "tiny", cfg, {"seed": "5"}
    )


def test_show_config_on_resume_uses_the_run_config(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    saved = resolve_config("stage2", STAGE_CONFIGS["stage2"], "smoke", flags={"seed": "9"})
    (run / "config.yaml").write_text(yaml.safe_dump(asdict(saved)))
    assert main(["train", "stage2", "--resume", "--out", str(run), "--save-every", "2", "--show-config"]) == 0
    out = capsys.readouterr().out
    sources = _sources(out)
    assert yaml.safe_load(out)["seed"] == 9 and sources["seed"] == f"run config {run}/config.yaml"
    assert sources["save_every"] == "flag"


def test_bad_flag_value_is_still_an_error(capsys):
    assert main(["train", "stage1", "--preset", "tiny", "--show-config", "--max-steps", "many"]) == 2
    assert "max_steps" in capsys.readouterr().err


def test_out_is_required_without_show_config(capsys):
    assert main(["train", "stage1", "--preset", "smoke"]) == 2
    assert "--out" in capsys.readouterr().err


def test_eval_show_config_sources(capsys):
    # --k 8 is eval's default value, given explicitly: its source is still "flag"
    assert main(["eval", "--show-config", "--k", "8", "--top-p", "0.9", "--benchmarks", "aime25,math500"]) == 0
    out = capsys.readouterr().out
    shown, sources = yaml.safe_load(out), _sources(out)
    assert shown["benchmarks"] == ["aime25", "math500"] and shown["top_p"] == 0.9 and shown["k"] == 8
    assert sources["k"] == sources["top_p"] == sources["benchmarks"] == "flag"
    assert sources["temperature"] == "default" and shown["temperature"] == 1.0
