"""Training configs: presets, YAML and flag overrides, clear errors; schedule and data order."""

from __future__ import annotations

import math
from dataclasses import asdict, fields

import pytest

from npr.train.config import STAGE_CONFIGS, ConfigError, Stage1Config, Stage2Config, Stage3Config
from npr.train.data import BatchOrder, rollout_seed, shard
from npr.train.overrides import config_to_yaml, read_yaml_overrides, resolve_config, written_values
from npr.train.presets import PRESETS
from npr.train.schedule import learning_rate_at

REQUIRED = {"model": "tiny-random-llama", "train_data": "rg:chain_sum?size=4&terms=2"}


def test_paper_defaults():
    c = Stage1Config(train_data="x")
    assert (c.learning_rate, c.weight_decay, c.max_grad_norm, c.lr_schedule) == (1e-6, 0.1, 1.0, "cosine")
    assert (c.prompts_per_step, c.samples_per_prompt, c.temperature) == (32, 16, 1.0)
    assert (c.clip_low, c.clip_high, c.loss_agg, c.dynamic_sampling) == (0.2, 0.28, "token-mean", True)
    s2 = Stage2Config(**REQUIRED)
    assert (s2.learning_rate, s2.min_learning_rate, s2.weight_decay) == (1e-6, 5e-7, 0.1)
    s3 = Stage3Config(**REQUIRED)
    assert (s3.learning_rate, s3.prompts_per_step, s3.samples_per_prompt) == (1e-7, 16, 16)
    assert (s3.policy_loss, s3.advantage, s3.loss_on_prefilled) == ("papo", "papo", False)


def test_every_field_has_help():
    for cls in STAGE_CONFIGS.values():
        missing = [f.name for f in fields(cls) if not f.metadata.get("help")]
        assert not missing, f"{cls.__name__} fields without help: {missing}"


@pytest.mark.parametrize("stage", sorted(PRESETS))
@pytest.mark.parametrize("preset", ["smoke", "tiny", "qwen3-4b"])
def test_presets_resolve(stage, preset):
    """Every value a preset sets lands in the config, except where a flag overrides it; fields
    the preset leaves alone keep the dataclass defaults."""
    cls = STAGE_CONFIGS[stage]
    flags = {"model": "runs/x/final", "train_data": "runs/sample/data.jsonl", "seed": "7"}
    config = resolve_config(stage, cls, preset, flags=flags)
    values = PRESETS[stage][preset]
    for name, value in values.items():
        if name not in flags:
            assert getattr(config, name) == value, name
    assert config.seed == 7 and isinstance(config.seed, int)  # a flag beats the preset, typed from its string
    defaults = cls(model="m", train_data="d")
    untouched = [f.name for f in fields(cls) if f.name not in values and f.name not in flags]
    assert untouched and all(getattr(config, n) == getattr(defaults, n) for n in untouched)


def test_order_defaults_preset_yaml_flags(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("learning_rate: 3e-5\nmax_steps: 7\nrollout_dtype: null\n")
    config = resolve_config("stage1", Stage1Config, "tiny", yaml_file, {"max_steps": "9"})
    assert config.model == "embedded"  # preset
    assert config.learning_rate == 3e-5  # yaml over preset (and "3e-5", a YAML string, becomes a float)
    assert config.rollout_dtype is None  # yaml null over the preset's bfloat16
    assert config.max_steps == 9  # flag over yaml
    assert config.weight_decay == 0.1  # default


def test_yaml_round_trip(tmp_path):
    config = resolve_config("stage3", Stage3Config, "smoke", flags={"eval_data": "rg:chain_sum?size=3"})
    path = tmp_path / "config.yaml"
    path.write_text(config_to_yaml(config, "header line"))
    assert path.read_text().startswith("# header line\n")
    assert resolve_config("stage3", Stage3Config, config_path=path) == config


def test_unknown_yaml_field_names_file_line_and_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: embedded\n\nlearning_rat: 1e-5\n")
    with pytest.raises(ConfigError) as err:
        read_yaml_overrides(path, Stage1Config)
    message = str(err.value)
    assert f"{path}:3" in message and "'learning_rat'" in message and "did you mean 'learning_rate'" in message


def test_bad_values_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="'max_steps' must be a int"):
        resolve_config("stage1", Stage1Config, "smoke", flags={"max_steps": "many"})
    with pytest.raises(ConfigError, match="'lr_schedule'.*cosine, linear, constant"):
        resolve_config("stage1", Stage1Config, "smoke", flags={"lr_schedule": "exp"})
    with pytest.raises(ConfigError, match="'dynamic_sampling' must be true or false"):
        resolve_config("stage1", Stage1Config, "smoke", flags={"dynamic_sampling": "maybe"})
    with pytest.raises(ConfigError, match="'train_data': is required"):
        resolve_config("stage1", Stage1Config, "smoke", flags={"train_data": ""})
    with pytest.raises(ConfigError, match="'overlong_buffer'"):
        resolve_config("stage1", Stage1Config, "smoke", flags={"overlong_buffer": "100"})  # > max_new_tokens 48
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        resolve_config("stage1", Stage1Config, "huge")


@pytest.mark.parametrize(
    "text, words",
    [
        (
            "learning_rate: [0.1, 0.2]\n",
            "c.yaml:1: config field 'learning_rate' must be a finite number, got a list "
            "[0.1, 0.2]; write it as one value, e.g. `learning_rate: 1e-06`",
        ),
        ("seed: 1\nmax_steps: {a: 1}\n", "c.yaml:2: config field 'max_steps' must be a int, got a mapping {'a': 1}"),
        ("model: [a, b]\n", "c.yaml:1: config field 'model' must be a str, got a list ['a', 'b']"),
        ("dynamic_sampling: [true]\n", "c.yaml:1: config field 'dynamic_sampling' must be true or false"),
        ("learning_rate: .nan\n", "c.yaml:1: config field 'learning_rate' must be a finite number, got nan"),
        ("max_grad_norm: .inf\n", "c.yaml:1: config field 'max_grad_norm' must be a finite number"),
        ("seed: 1\nseed: 2\n", "c.yaml:2: config field 'seed' is set twice (first at "),
        ("[a, b]: 1\n", "c.yaml:1: a key must be a field name"),
        ("seed: 1\nmax_steps: [1\n", "c.yaml:3: not valid YAML"),
        ("- 1\n- 2\n", "c.yaml:1: expected a mapping"),
        ("seed: 1\nlearning_rate: -1\n", "c.yaml:2: config field 'learning_rate': must be > 0, got -1.0"),
        ("warmup_steps: 500\n", "c.yaml:1: config field 'warmup_steps': must lie in [0, max_steps]"),
    ],
)
def test_yaml_of_the_wrong_shape_names_file_line_and_field(tmp_path, text, words):
    """Found 3: YAML values of the wrong shape were a TypeError traceback; every bad value now is
    a ConfigError naming the file, line and field (and an example of a good value)."""
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        resolve_config("stage1", Stage1Config, "smoke", path)
    assert words.replace("c.yaml", str(path)) in str(info.value)


def test_range_errors_name_where_the_value_came_from(tmp_path):
    with pytest.raises(ConfigError, match="^--learning-rate: config field 'learning_rate': must be > 0"):
        resolve_config("stage1", Stage1Config, "smoke", flags={"learning_rate": "-1"})
    with pytest.raises(ConfigError, match="must be a finite number, got 'nan'"):
        resolve_config("stage1", Stage1Config, "smoke", flags={"learning_rate": "nan"})
    with pytest.raises(ConfigError, match="^--warmup-steps: config field 'warmup_steps'"):
        resolve_config("stage1", Stage1Config, "smoke", flags={"warmup_steps": "1000"})


def saved_run(tmp_path, **flags):
    """A run directory as ``npr train stage1 --preset smoke`` leaves it: its config.yaml."""
    from npr.train.session import CONFIG_FILE

    config = resolve_config("stage1", Stage1Config, "smoke", flags={"max_steps": "4", **flags})
    run = tmp_path / "run"
    run.mkdir()
    (run / CONFIG_FILE).write_text(config_to_yaml(config, "npr stage1: resolved config"))
    return run, config


def resume(run, **flags):
    from npr.train.session import resolve_run_config

    return resolve_run_config("stage1", Stage1Config, run, True, None, None, flags)


def test_config_yaml_records_what_it_wrote(tmp_path):
    run, config = saved_run(tmp_path)
    assert written_values(run / "config.yaml") == asdict(config)
    assert resume(run) == config and resume(run, save_every="2").save_every == 2


@pytest.mark.parametrize(
    "edit, words",
    [
        (
            lambda t: t.replace("learning_rate:", "learning_rat:"),
            r"config.yaml:\d+: unknown config field 'learning_rat'",
        ),
        (
            lambda t: t.replace("max_steps: 4", "max_steps: [4]"),
            r"config.yaml:\d+: config field 'max_steps' must be a int",
        ),
        (
            lambda t: t.replace("max_steps: 4", "max_steps: 40"),
            r"config.yaml:\d+: config field 'max_steps' was changed from 4 to 40 after the run wrote",
        ),
        (
            lambda t: "\n".join(x for x in t.splitlines() if not x.startswith("max_steps:")),
            r"config.yaml: config field 'max_steps' was removed \(it was 4\)",
        ),
        (lambda t: t.replace("max_steps: 4", "max_steps: four"), r"config.yaml:\d+: config field 'max_steps'"),
        (lambda t: t.replace("max_steps: 4", "max_steps: 4\n  bad indent: x"), r"config.yaml:\d+: not valid YAML"),
    ],
)
def test_config_yaml_edited_before_resume_is_a_clear_error(tmp_path, edit, words):
    """Found 3: a config.yaml edited before --resume was a traceback (cls(**yaml)); now every
    edit is read like a --config file, and a changed non-resumable field is refused."""
    run, _ = saved_run(tmp_path)
    path = run / "config.yaml"
    path.write_text(edit(path.read_text()))
    with pytest.raises(ConfigError, match=words):
        resume(run)


def test_resumable_fields_may_be_edited_and_old_files_still_resume(tmp_path):
    run, config = saved_run(tmp_path)
    path = run / "config.yaml"
    path.write_text(path.read_text().replace("save_every: 0", "save_every: 2"))
    assert resume(run).save_every == 2
    old = "\n".join(x for x in path.read_text().splitlines() if not x.startswith("# npr: values as written"))
    path.write_text(old.replace("max_steps: 4", "max_steps: 6"))  # no record: nothing to compare with
    assert resume(run).max_steps == 6


def test_model_is_required_after_stage1():
    with pytest.raises(ConfigError, match="'model': is required"):
        resolve_config("stage3", Stage3Config, "tiny")


def test_unknown_cli_flag_is_a_clear_error(tmp_path, capsys):
    from npr.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "stage1", "--preset", "smoke", "--out", str(tmp_path / "run"), "--learning-rat", "1e-5"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "'--learning-rat'" in err and "did you mean 'learning_rate'" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "schedule,expected",
    [
        ("constant", [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]),
        ("linear", [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]),  # warm-up 2 steps, then peak 1 -> 0 over the 4 left
        ("cosine", [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]),
    ],
)
def test_learning_rate_schedule(schedule, expected):
    got = [learning_rate_at(s, 6, 1.0, 0.0, 2, schedule) for s in range(6)]
    assert got == pytest.approx(expected)


def test_linear_decay_to_final():
    # Stage 2: 1e-6 -> 5e-7, no warm-up, 4 steps: 1e-6, 8.75e-7, 7.5e-7, 6.25e-7
    got = [learning_rate_at(s, 4, 1e-6, 5e-7, 0, "linear") for s in range(4)]
    assert got == pytest.approx([1e-6, 8.75e-7, 7.5e-7, 6.25e-7])


def test_batch_order_is_a_pure_function_of_step():
    order = BatchOrder(num_examples=5, batch_size=2, seed=3)
    batches = [order.batch(s) for s in range(5)]  # 10 indices = exactly two epochs
    flat = [i for b in batches for i in b]
    assert sorted(flat[:5]) == list(range(5)) and sorted(flat[5:]) == list(range(5))
    assert flat[:5] == order.epoch_permutation(0) and flat[5:] == order.epoch_permutation(1)
    assert batches == [BatchOrder(5, 2, 3).batch(s) for s in range(5)]  # no hidden state
    big = BatchOrder(num_examples=50, batch_size=4, seed=3)
    assert big.epoch_permutation(0) != big.epoch_permutation(1)  # reshuffled every epoch
    assert big.epoch_permutation(0) != BatchOrder(50, 4, 4).epoch_permutation(0)  # and per seed


def test_shard_is_contiguous_and_covers():
    items = list(range(8))
    parts = [shard(items, r, 4) for r in range(4)]
    assert [p for p, _ in parts] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert [first for _, first in parts] == [0, 2, 4, 6]


def test_rollout_seeds_differ_per_step():
    seeds = {rollout_seed(0, s) for s in range(100)}
    assert len(seeds) == 100 and min(b - a for a, b in zip(sorted(seeds), sorted(seeds)[1:])) >= 100_000


def test_warmup_ratio_sets_the_warm_up_from_the_run_length():
    import torch

    from npr.train.schedule import build_scheduler

    config = Stage2Config(**REQUIRED, warmup_ratio=0.05, lr_schedule="cosine")
    assert config.warmup_for(100) == 5 and config.warmup_for(37) == 2  # ceil(0.05 * 37), as transformers rounds
    assert Stage2Config(**REQUIRED, warmup_steps=3).warmup_for(100) == 3
    with pytest.raises(ConfigError, match="not both"):
        Stage2Config(**REQUIRED, warmup_steps=3, warmup_ratio=0.05)
    with pytest.raises(ConfigError, match="warmup_ratio"):
        Stage2Config(**REQUIRED, warmup_ratio=1.0)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=config.learning_rate)
    scheduler = build_scheduler(optimizer, config, total_steps=40)  # warm-up: 2 steps
    lrs = []
    for _ in range(40):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:3] == pytest.approx([5e-7, 1e-6, 1e-6]) and lrs[-1] == pytest.approx(5e-7, rel=1e-2)


def test_qwen3_4b_presets_take_the_reference_values():
    """The values of NPR's released launch scripts (cited in npr/train/presets.py), or the paper's."""
    flags = {"model": "m", "train_data": "x"}
    s1 = resolve_config("stage1", Stage1Config, "qwen3-4b", flags=flags)
    assert (s1.max_new_tokens, s1.overlong_buffer, s1.prompts_per_step, s1.samples_per_prompt) == (30000, 10, 32, 16)
    assert (s1.mini_batch_size, s1.ppo_epochs, s1.num_epochs, s1.max_gen_batches) == (1, 1, 1, 0)
    assert (s1.learning_rate, s1.lr_schedule, s1.warmup_steps, s1.clip_low, s1.clip_high) == (
        1e-6,
        "cosine",
        10,
        0.2,
        0.28,
    )
    s2 = resolve_config("stage2", Stage2Config, "qwen3-4b", flags=flags)
    assert (s2.max_seq_len, s2.batch_size, s2.num_epochs, s2.adam_beta2, s2.warmup_ratio) == (32768, 8, 1, 0.95, 0.05)
    assert (s2.learning_rate, s2.min_learning_rate, s2.lr_schedule) == (1e-6, 5e-7, "cosine")  # the paper's 5e-7
    s3 = resolve_config("stage3", Stage3Config, "qwen3-4b", flags=flags)
    assert (s3.max_new_tokens, s3.prompts_per_step, s3.samples_per_prompt, s3.learning_rate) == (30000, 16, 16, 1e-7)
    assert (s3.mini_batch_size, s3.require_parallel, s3.drop_truncated, s3.lr_schedule) == (1, False, False, "constant")
    sample = resolve_config("sample", STAGE_CONFIGS["sample"], "qwen3-4b", flags=flags)
    assert (sample.tries, sample.max_kept_per_problem, sample.stop_when_kept, sample.max_new_tokens) == (
        8,
        1,
        True,
        32768,
    )


def test_new_fields_keep_todays_behaviour_by_default():
    """mini-batches, refill and epochs are opt-in: the smoke and tiny presets run as before."""
    c = Stage1Config(train_data="x")
    assert (c.mini_batch_size, c.ppo_epochs, c.num_epochs, c.max_gen_batches, c.warmup_ratio) == (None, 1, 0, 1, 0.0)
    assert Stage3Config(**REQUIRED).drop_truncated and not STAGE_CONFIGS["sample"](**REQUIRED).stop_when_kept
    with pytest.raises(ConfigError, match="mini_batch_size"):
        Stage1Config(train_data="x", mini_batch_size=0)
    with pytest.raises(ConfigError, match="max_gen_batches"):
        Stage1Config(train_data="x", max_gen_batches=-1)
