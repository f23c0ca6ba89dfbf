"""``npr memory`` and its arithmetic (npr.train.memory_plan): a plan computed by hand for a tiny config,
the config -> inputs mapping of the qwen3-4b presets, the settings that make a plan fit, and the CLI's
exit codes and last line. No torch work: the planner is arithmetic."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from npr.cli.main import main
from npr.train.memory_plan import (
    GIB,
    KNOWN_MODELS,
    MemoryPlanError,
    ModelShape,
    PlanInputs,
    activation_bytes,
    fitting_changes,
    inputs_from_config,
    layer_saved_bytes,
    log_prob_bytes,
    plan_memory,
    read_model_shape,
    shape_from_config,
)

# hidden 8, 2 layers, 2 heads of 4 (1 kv head), MLP 16, vocabulary 32, tied embeddings (Llama: no q/k norm)
TINY = ModelShape(
    hidden_size=8,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=4,
    intermediate_size=16,
    vocab_size=32,
    tie_word_embeddings=True,
)
# one process, fp32 without autocast or checkpointing, one sequence of 10 tokens whose last 6 are predicted
ONE = PlanInputs(
    stage="stage2",
    gpus=1,
    fsdp=False,
    device="cuda",
    master_bytes=4,
    autocast_bf16=False,
    gradient_checkpointing=False,
    unit_tokens=10,
    predicted_per_unit=6,
    units_per_pass=1,
    passes_per_step=1,
)


def line(plan, name: str):
    return next(x for x in plan.lines if x.name.startswith(name))


def test_parameters_by_hand():
    # per layer: q 8x8 + k 8x4 + v 8x4 + o 8x8 = 192; MLP 3 x 8 x 16 = 384; two norms of 8 = 16 -> 592
    assert TINY.layer_parameters == 592
    # embedding 32 x 8 (tied: the head is the same matrix) + final norm 8 = 264
    assert TINY.embedding_parameters == 264
    assert TINY.parameters == 264 + 2 * 592 == 1448
    untied = replace(TINY, tie_word_embeddings=False)
    assert untied.parameters == 1448 + 32 * 8


def test_model_state_by_hand():
    plan = plan_memory(TINY, ONE)
    assert line(plan, "parameters").update == 1448 * 4  # fp32 master weights
    assert line(plan, "gradients").update == 1448 * 4  # fp32 gradients
    assert line(plan, "optimizer states").update == 2 * 1448 * 4  # AdamW m and v, fp32
    assert line(plan, "gradients").rollout == 0  # no rollout phase in SFT; gradients are freed after a step
    # FSDP over 2: a half of each (gradients reduce-scattered every pass)
    sharded = plan_memory(TINY, replace(ONE, gpus=2, fsdp=True, passes_per_step=3))
    assert line(sharded, "parameters").update == 1448 * 4 // 2
    assert line(sharded, "optimizer states").update == 1448 * 4
    assert line(sharded, "gradients").update == 1448 * 4 // 2
    # no_sync over 3 passes (npr before issue 26): the unsharded fp32 gradients besides the shards
    no_sync = replace(ONE, gpus=2, fsdp=True, passes_per_step=3, sharded_gradient_accumulation=False)
    assert line(plan_memory(TINY, no_sync), "gradients").update == 1448 * 4 // 2 + 1448 * 4
    one_pass = plan_memory(TINY, replace(ONE, gpus=2, fsdp=True, passes_per_step=1))
    assert line(one_pass, "gradients").update == 1448 * 4 // 2
    assert line(plan_memory(TINY, replace(ONE, gpus=2)), "gradients").update == 2 * 1448 * 4  # DDP: + buckets


def test_logits_by_hand():
    # the full path (npr before chunking): 12 bytes per vocabulary entry per predicted token
    assert log_prob_bytes(TINY, ONE)[0] == 12 * 32 * 6
    # one chunk covering the 6 tokens: max(forward 8 V C, backward 6 V C + 2 V H) = max(1536, 1664)
    assert log_prob_bytes(TINY, replace(ONE, logprob_chunk_tokens=8))[0] == 1664
    # chunks of 4 (two chunks), one alive at a time: max(8 V C, 6 V C + 2 V H) = max(1024, 768 + 512)
    assert log_prob_bytes(TINY, replace(ONE, logprob_chunk_tokens=4))[0] == 1280
    long = replace(ONE, unit_tokens=100_004, predicted_per_unit=100_000, logprob_chunk_tokens=4)
    assert log_prob_bytes(TINY, long)[0] == 1280  # whatever the length


def test_activations_by_hand():
    # fp32 stream, no autocast, flex layout (kv not repeated), per layer and token:
    # norm 1: normalised rows 4H + its output (q, k, v read it) 4H = 64; norm 2 likewise 64;
    # the stream after attention 4H = 32; attention: q 32, k+v 2 x 16, output 32, logsumexp 2 heads x 4 = 8,
    # o_proj's input 32 -> 136; MLP: gate, silu, up, product 4 x 16 x 4 = 256
    assert layer_saved_bytes(TINY, ONE) == 64 + 64 + 32 + 136 + 256 == 552
    # no checkpointing: every layer keeps its ops' tensors and its input (4H), plus the final hidden and norm
    # rows (4 + 4) H, over the 10 tokens, and the head's input 4H over the 6 predicted ones
    body, recompute, _, _ = activation_bytes(TINY, ONE)
    assert body == 10 * (2 * (552 + 32) + 8 * 8) + 6 * 4 * 8
    # the backward's working set: the stream's gradient 2 x 4H and the MLP's 3 x 4I, per token
    assert recompute == 10 * (2 * 4 * 8 + 3 * 4 * 16)
    # checkpointing keeps each layer's input only; one layer is recomputed, with that working set
    body, recompute, _, _ = activation_bytes(TINY, replace(ONE, gradient_checkpointing=True))
    assert body == 10 * (2 * 32 + 8 * 8) + 6 * 4 * 8 and recompute == 10 * (552 + 64 + 192)
    # the CPU's dense layout repeats k and v to every head (2 x 2 x 16 more) and holds the 10 x 10 fp32 mask
    body, _, _, _ = activation_bytes(TINY, replace(ONE, device="cpu"))
    assert body == 10 * (2 * (552 + 32 + 32) + 8 * 8) + 6 * 4 * 8 + 10 * 10 * 4


def test_activations_by_hand_in_bf16():
    # bf16 autocast over fp32 weights: the stream stays fp32, each linear saves its own bf16 cast of its input
    # norm 1: normalised rows 4H + three casts 3 x 2H = 80; norm 2: 4H + 2 x 2H = 64; the stream 4H = 32;
    # attention: q 16, k+v 2 x 8, output 16, logsumexp 8, o_proj's input 16 -> 72; MLP 4 x 16 x 2 = 128
    assert layer_saved_bytes(TINY, replace(ONE, autocast_bf16=True)) == 80 + 64 + 32 + 72 + 128
    # FSDP's bf16 weights (no autocast, a bf16 stream): each norm keeps an fp32 copy 4H, the normalised rows
    # cast back 2H and its output 2H = 64; the bf16 stream itself is not saved; attention and MLP as above
    fsdp = replace(ONE, autocast_bf16=True, fsdp=True, gpus=2)
    assert layer_saved_bytes(TINY, fsdp) == 64 + 64 + 72 + 128
    # Qwen3's q/k norms: an fp32 copy and a bf16 cast of every query and key head, (4 + 2) x (8 + 4)
    assert layer_saved_bytes(replace(TINY, qk_norm=True), fsdp) == 64 + 64 + 72 + 128 + 6 * 12


def test_peak_and_what_dominates():
    plan = plan_memory(TINY, replace(ONE, device="cpu"))  # no CUDA reserve
    activations = 10 * (2 * (552 + 32 + 32) + 8 * 8) + 6 * 4 * 8 + 10 * 10 * 4
    # the backward's working set (2560) exceeds the 2304 bytes of logits, so it is what is live at the peak
    assert line(plan, "log-prob logits").update == 0 and line(plan, "layer backward").update == 2560
    assert plan.total("update") == 1448 * 4 * 4 + activations + 2560
    # AdamW's step on the CPU: one tensor at a time, two temporaries of the largest (the embedding: 32 x 8 x 4 B)
    assert plan.total("step") == 1448 * 4 * 4 + 2 * 32 * 8 * 4
    assert plan.peak_phase == "update" and plan.peak == plan.total("update")
    assert plan.dominant.name == "activations"
    assert plan.fits(plan.peak) and not plan.fits(plan.peak - 1)


def test_engine_lines():
    rl = replace(
        ONE, stage="stage3", engine_weight_bytes=2, kv_pool_bytes=1000, decode_rows=4, engine_released_for_update=False
    )
    plan = plan_memory(TINY, rl)
    assert line(plan, "engine weights").rollout == 1448 * 2 == line(plan, "engine weights").update
    assert line(plan, "engine KV pool").update == 1000
    assert line(plan, "engine decode step").rollout == 4 * 32 * 13 and line(plan, "engine decode step").update == 0
    released = plan_memory(TINY, replace(rl, engine_released_for_update=True))
    assert line(released, "engine KV pool").update == 0 and line(released, "engine KV pool").rollout == 1000


def stage_config(stage: str, **flags):
    from npr.train.config import STAGE_CONFIGS
    from npr.train.overrides import resolve_config

    base = {"train_data": "x", "model": "Qwen/Qwen3-4B-Instruct-2507"}
    return resolve_config(
        stage, STAGE_CONFIGS[stage], "qwen3-4b", None, {k: str(v) for k, v in flags.items()}, base=base
    )


def test_inputs_of_the_qwen3_4b_stage3_preset():
    shape, _ = read_model_shape("Qwen/Qwen3-4B")
    assert shape.parameters == 4_022_468_096  # Qwen3-4B's 4.02 B (tied embeddings)
    inputs = inputs_from_config("stage3", stage_config("stage3", fsdp="true"), shape, gpus=8, prompt_tokens=1000)
    # 2 responses of 30,000 tokens per pass, each behind its 1,000-token prompt; mini_batch_size 1: one group's
    # worth of 16 responses per step, 2 on each of the 8 ranks: 1 pass
    assert (inputs.units_per_pass, inputs.unit_tokens, inputs.predicted_per_pass) == (2, 31000, 60000)
    assert inputs.passes_per_step == 1 and inputs.fsdp and inputs.engine_weight_bytes == 2
    assert inputs.engine_released_for_update  # release_engine_for_update auto on a CUDA plan
    assert inputs.kv_pool_bytes == 20 * GIB and inputs.decode_rows == 256
    capped = inputs_from_config(
        "stage3", stage_config("stage3", micro_batch_tokens=31000), shape, 8, prompt_tokens=1000
    )
    assert capped.units_per_pass == 1 and capped.passes_per_step == 2 and capped.engine_weight_bytes == 2
    kept = inputs_from_config("stage3", stage_config("stage3", release_engine_for_update="off"), shape, 8)
    assert not kept.engine_released_for_update
    sft = inputs_from_config("stage2", stage_config("stage2"), shape, gpus=8, prompt_tokens=1000)
    assert (sft.unit_tokens, sft.predicted_per_unit, sft.decode_rows) == (32768, 31768, 0)


def test_fitting_changes_name_a_setting_that_fits():
    shape, _ = read_model_shape("Qwen/Qwen3-4B")
    inputs = inputs_from_config("stage3", stage_config("stage3", fsdp="false"), shape, gpus=8)  # DDP: > 80 GiB
    assert plan_memory(shape, inputs).peak > 80 * GIB
    changes, fits = fitting_changes(shape, inputs, 80 * GIB, frozenset({"logprob_chunk_size"}))
    assert fits and changes[0][0].setting == "fsdp true"
    assert plan_memory(shape, changes[-1][0].inputs).peak == changes[-1][1] <= 80 * GIB
    assert [after for _, after in changes] == sorted((after for _, after in changes), reverse=True)


@pytest.mark.parametrize("spec", ["tiny-random-llama", "tiny-random-qwen3"])
def test_tiny_models_are_known_as_npr_builds_them(spec):
    """The listed shapes of npr's tiny random models are the models npr.models builds (parameters counted)."""
    from npr.models import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(spec)
    shape, _ = read_model_shape(spec)
    assert shape.parameters == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "name", ["Qwen/Qwen3-0.6B", "Qwen/Qwen3-4B", "Qwen/Qwen3-8B", "HuggingFaceTB/SmolLM2-135M-Instruct"]
)
def test_known_shapes_count_what_transformers_builds(name):
    """Each listed config, built by transformers on the meta device (no memory), has the parameters the
    planner counts (Qwen3-4B: 4.02 B, tied; Qwen3-8B: untied)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(KNOWN_MODELS[name])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert read_model_shape(name)[0].parameters == sum(p.numel() for p in model.parameters())


def test_without_checkpointing_the_fix_named_first_is_checkpointing():
    shape, _ = read_model_shape("Qwen/Qwen3-4B")
    inputs = inputs_from_config(
        "stage1", stage_config("stage1", gradient_checkpointing="false", fsdp="true"), shape, gpus=8
    )
    changes, fits = fitting_changes(shape, inputs, 80 * GIB, frozenset())
    assert fits and changes[0][0].setting == "gradient_checkpointing true"


def test_model_configs(tmp_path):
    assert read_model_shape("Qwen/Qwen3-4B-Instruct-2507")[0] == read_model_shape("Qwen/Qwen3-4B")[0]
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(dict(KNOWN_MODELS["Qwen/Qwen3-0.6B"])))
    shape, where = read_model_shape(str(tmp_path / "m"))
    assert shape.hidden_size == 1024 and shape.qk_norm and where.endswith("config.json")
    nested = shape_from_config({"text_config": KNOWN_MODELS["Qwen/Qwen3-0.6B"]}, "x")
    assert nested == shape
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(MemoryPlanError, match="cannot read it as JSON"):
        read_model_shape(str(tmp_path / "bad"))
    with pytest.raises(MemoryPlanError, match="no usable hidden_size"):
        shape_from_config({"num_hidden_layers": 2}, "x")
    with pytest.raises(MemoryPlanError, match="no config.json found"):
        read_model_shape("nobody/no-such-model")


# ----------------------------------------------------------------------------- the CLI


def run_cli(capsys, *argv):
    try:
        code = main(["memory", *argv])
    except SystemExit as e:  # argparse
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


QWEN = ["--preset", "qwen3-4b", "--gpu-memory", "80"]


@pytest.mark.parametrize("stage", ["stage1", "stage3"])
def test_qwen3_4b_fits_8_x_80_gb(capsys, stage):
    """The issue's goal: Stage 1 and Stage 3 of the qwen3-4b preset fit 8 x 80 GB, sharded (the preset's fsdp
    true), with the preset's two 30k-token responses per pass and with one; without FSDP the plan names the
    setting."""
    for extra in ([], ["--micro-batch-tokens", "31024"]):
        code, out, err = run_cli(capsys, *QWEN, "--stage", stage, "--gpus", "8", *extra)
        last = out.strip().splitlines()[-1]
        assert code == 0 and last.startswith("peak per GPU: ") and last.endswith(" GiB of 80 GiB (fits)"), out + err
        assert "parameters" in out and "engine KV pool" in out and "log-prob logits" in out
    code, out, _ = run_cli(capsys, *QWEN, "--stage", stage, "--gpus", "8", "--fsdp", "false")
    last = out.strip().splitlines()[-1]
    assert code == 0 and "(does not fit: " in last and "fits with fsdp true" in last


def test_what_does_not_fit_on_one_24_gb_gpu(capsys):
    code, out, _ = run_cli(
        capsys, "--preset", "qwen3-4b", "--stage", "stage1", "--gpus", "1", "--gpu-memory", "24", "--fsdp", "false"
    )  # the preset shards, which one process refuses
    last = out.strip().splitlines()[-1]
    assert code == 0 and last.startswith("peak per GPU: ") and " GiB of 24 GiB (does not fit: " in last
    assert "parameters, gradients and AdamW states alone take 59.9 GiB" in last
    assert "fsdp true over --gpus 2" in last


def test_stage2_tiny_fits_and_reads_a_yaml(capsys, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("max_seq_len: 2048\nmicro_batch_size: 2\n")
    code, out, _ = run_cli(
        capsys, "--preset", "tiny", "--stage", "stage2", "--config", str(config), "--gpus", "1", "--gpu-memory", "24"
    )
    assert code == 0 and out.strip().splitlines()[-1].endswith("(fits)"), out
    assert "a pass: 2 x 2,048 tokens" in out and "model: embedded (0.13 B parameters" in out


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--model", "nobody/no-such-model"], "model 'nobody/no-such-model': no config.json found"),
        (["--model", "@BAD"], "cannot read it as JSON"),
        (["--micro-batch-tokenz", "5"], "unknown config field 'micro_batch_tokenz'"),
        (["--fsdp", "true", "--gpus", "1"], "--fsdp true shards over processes and --gpus is 1"),
    ],
)
def test_bad_input_is_one_line_exit_2(capsys, tmp_path, argv, words):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    argv = [str(bad) if a == "@BAD" else a for a in argv]
    code, out, err = run_cli(capsys, "--preset", "qwen3-4b", "--stage", "stage3", *argv)
    assert code == 2 and words in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("npr memory: error: ") and out == ""


def test_help_names_the_flags(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    for flag in ("--stage", "--preset", "--config", "--model", "--gpus", "--gpu-memory", "--prompt-tokens"):
        assert flag in out


@pytest.mark.slow
def test_the_benchmark_runs_a_real_update_and_plans_it():
    """benchmarks/memory_plan_check.py end to end on a tiny case: one child process, a measured peak, a plan."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "memory_plan_check.py"
    spec = importlib.util.spec_from_file_location("memory_plan_check", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    measured = bench.run_case(1, 64, 48, 16, True, None, vocab=256)
    assert measured["peak"] > 0 and measured["baseline"] > 0
    plan = bench.predicted(1, 64, 48, 16, True, vocab=256)
    assert plan.peak > 0 and line(plan, "log-prob logits").note.startswith("one [16, 256] chunk")
