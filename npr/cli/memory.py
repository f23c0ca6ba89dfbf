"""``npr memory``: the memory of a training stage per GPU, planned before launch (npr.train.memory_plan).

    npr memory --preset qwen3-4b --stage stage3 --gpus 8 --gpu-memory 80
    npr memory --preset qwen3-4b --stage stage1 --gpus 1 --gpu-memory 24 --fsdp false
    npr memory --config runs/x/stage3/config.yaml --stage stage3 --gpus 8 --gpu-memory 80 --micro-batch-tokens 32000

Reads the stage's config as ``npr train`` resolves it (defaults < --preset < --config YAML < --field flags:
every config field of the stage is accepted as a flag) and the model's config.json (a local directory, a
run's final/, or a known name such as Qwen/Qwen3-4B; nothing is downloaded and no weights are loaded).
Prints one table per GPU: each line's bytes during rollouts, at the update's peak and at AdamW's step;
then ``peak per GPU: X GiB of Y GiB (fits)`` or ``(does not fit: ...)`` with the settings that make it fit.
Lengths are the worst case: every response at max_new_tokens (Stage 1, 3), every example at max_seq_len
(Stage 2). docs/training.md, "Memory per GPU before launch", explains the lines.
"""

from __future__ import annotations

import argparse

from npr.train.memory_plan import GIB

STAGES = ("stage1", "stage2", "stage3")
# for Stage 2 and 3 (which train the previous stage's output, of the same shape) when no --model is given
SEED_MODEL_OF_PRESET = {"qwen3-4b": "Qwen/Qwen3-4B-Instruct-2507", "tiny": "embedded", "smoke": "tiny-random-llama"}


class _ConfigFlagsParser(argparse.ArgumentParser):
    """Keeps the flags it does not know in ``config_args`` (config fields, checked against the stage's
    config class in ``run``) instead of refusing them."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        namespace.config_args = extras
        return namespace, []


def add_parser(sub, name: str, help_text: str):
    from npr.cli.args import positive_float, positive_int
    from npr.train.memory_plan import DEFAULT_PROMPT_TOKENS
    from npr.train.presets import PRESETS

    p = sub.add_parser(name, help=help_text, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.__class__ = _ConfigFlagsParser  # subparsers build plain ArgumentParsers; this one also takes config fields
    p.add_argument("--stage", required=True, choices=STAGES, help="the training stage to plan")
    presets = sorted({name for stage in STAGES for name in PRESETS[stage]})
    p.add_argument("--preset", choices=presets, default=None, help="the stage's preset, as for npr train")
    p.add_argument(
        "--config",
        default=None,
        metavar="YAML",
        help="YAML file of `field: value` lines (e.g. a run's config.yaml), as for npr train",
    )
    p.add_argument(
        "--model",
        default=None,
        metavar="SPEC",
        help="the model whose config.json is read: a local directory or config.json, a run's final/, a "
        "known name (Qwen/Qwen3-4B, Qwen/Qwen3-4B-Instruct-2507, …) or an HF id in the local hub "
        "cache; default: the config's model (Stage 2/3 presets: their Stage 1 seed model)",
    )
    p.add_argument("--gpus", type=positive_int, default=8, help="processes (GPUs) of the launch (default: 8)")
    p.add_argument(
        "--gpu-memory",
        type=positive_float,
        default=80.0,
        metavar="GIB",
        help="memory of one GPU in GiB, as the card is sold (80 for an H100 80GB; default: 80)",
    )
    p.add_argument(
        "--prompt-tokens",
        type=positive_int,
        default=DEFAULT_PROMPT_TOKENS,
        help=f"tokens of one prompt (chat template, instruction, problem); a sequence is the prompt + "
        f"max_new_tokens (default: {DEFAULT_PROMPT_TOKENS})",
    )
    p.epilog = (
        "Any other --field value is a config field of the stage (as for npr train), e.g. --fsdp true, "
        "--micro-batch-tokens 32000, --kv-cache-gib 8."
    )
    return p


def config_flags(extras: list[str], cls: type) -> dict[str, str]:
    """``--field value`` / ``--field=value`` pairs of ``extras`` as config fields of ``cls`` (raw strings)."""
    from npr.train.config import ConfigError
    from npr.train.overrides import check_field

    flags: dict[str, str] = {}
    i = 0
    while i < len(extras):
        flag = extras[i]
        if not flag.startswith("--"):
            raise ConfigError(f"unexpected argument {flag!r}; config fields are given as --field value")
        name, has_value, value = flag[2:].partition("=")
        if not has_value:
            if i + 1 >= len(extras) or extras[i + 1].startswith("--"):
                raise ConfigError(f"{flag} needs a value (--{name} VALUE)")
            value = extras[i + 1]
            i += 1
        field = name.replace("-", "_")
        check_field(cls, field, f"--{name}")
        flags[field] = value
        i += 1
    return flags


def resolve_stage_config(args):
    """The stage's config as ``npr train`` resolves it; Stage 2 and 3 without a model get the seed model of
    their preset (they train the previous stage's output, which has its shape), and no data is read."""
    from npr.train.config import STAGE_CONFIGS
    from npr.train.overrides import resolve_config

    cls = STAGE_CONFIGS[args.stage]
    flags = config_flags(getattr(args, "config_args", []), cls)
    if args.model is not None:
        flags["model"] = args.model
    # npr memory reads no data, and Stage 2/3 train the output of the stage before, of the seed's shape
    base = {"train_data": "(not read by npr memory)"}
    seed = SEED_MODEL_OF_PRESET.get(args.preset or "")
    if seed and args.stage != "stage1":
        base["model"] = seed
    return resolve_config(args.stage, cls, args.preset, args.config, flags, base=base)


def format_table(plan) -> list[str]:
    phases = plan.phases
    width = max(len(line.name) for line in plan.lines) + 2
    head = f"{'':{width}}" + "".join(f"{p:>10}" for p in phases) + "  (GiB)"
    rows = [head]
    for line in plan.lines:
        values = "".join(f"{line.at(p) / GIB:10.2f}" for p in phases)
        rows.append(f"{line.name:{width}}{values}  {line.note}")
    rows.append(
        f"{'total':{width}}"
        + "".join(f"{plan.total(p) / GIB:10.2f}" for p in phases)
        + f"  peak in the {plan.peak_phase} phase; largest line: {plan.dominant.name}"
    )
    return rows


def verdict(shape, inputs, plan, gpu_gib: float, available: frozenset[str]) -> str:
    """The last line: ``peak per GPU: X GiB of Y GiB (fits)`` or ``(does not fit: ...)``."""
    from npr.train.memory_plan import fitting_changes

    peak = plan.peak / GIB
    head = f"peak per GPU: {peak:.1f} GiB of {gpu_gib:g} GiB"
    if plan.fits(gpu_gib * GIB):
        return f"{head} (fits)"
    largest = sorted(plan.lines, key=lambda line: -line.at(plan.peak_phase))[:3]
    why = ", ".join(f"{line.name} {line.at(plan.peak_phase) / GIB:.1f} GiB" for line in largest)
    why = f"at the {plan.peak_phase}'s peak {why}"
    state = sum(
        line.at(plan.peak_phase)
        for line in plan.lines
        if line.name.startswith(("parameters", "gradients", "optimizer states"))
    )
    if state > gpu_gib * GIB:
        why = f"parameters, gradients and AdamW states alone take {state / GIB:.1f} GiB; {why}"
    changes, fits = fitting_changes(shape, inputs, gpu_gib * GIB, available)
    steps = ", then ".join(
        f"{c.setting}{'' if c.available else ' [not in this build: issue 26]'} -> {after / GIB:.1f} GiB"
        for c, after in changes
    )
    if fits:
        return f"{head} (does not fit: {why}; it fits with {steps})"
    if changes:
        return f"{head} (does not fit: {why}; nor with {steps})"
    return f"{head} (does not fit: {why}; no setting npr memory knows lowers it)"


def run(args) -> int:
    from dataclasses import fields

    from npr.train.memory_plan import MemoryPlanError, inputs_from_config, plan_memory, read_model_shape

    config = resolve_stage_config(args)
    if config.fsdp and args.gpus < 2:
        raise MemoryPlanError("--fsdp true shards over processes and --gpus is 1; pass --gpus N >= 2 or --fsdp false")
    if args.stage == "stage2" and args.prompt_tokens >= config.max_seq_len:
        raise MemoryPlanError(
            f"--prompt-tokens {args.prompt_tokens} leaves no response within max_seq_len "
            f"{config.max_seq_len}; pass a smaller --prompt-tokens"
        )
    shape, source = read_model_shape(config.model)
    inputs = inputs_from_config(args.stage, config, shape, args.gpus, prompt_tokens=args.prompt_tokens)
    plan = plan_memory(shape, inputs)
    available = frozenset(f.name for f in fields(type(config)))
    print(
        f"npr memory: {args.stage}"
        + (f", preset {args.preset}" if args.preset else "")
        + (f", {args.config}" if args.config else "")
    )
    print(f"model: {config.model} ({shape.describe()}); read from {source}")
    precision = f"{'fp32' if inputs.master_bytes == 4 else 'bf16'} master" + (
        ", bf16 compute" if inputs.autocast_bf16 else ""
    )
    print(
        f"per GPU of {args.gpus}: {'FSDP' if inputs.fsdp else 'DDP' if args.gpus > 1 else 'one process'}, "
        f"{precision}, {'gradient checkpointing' if inputs.gradient_checkpointing else 'no checkpointing'}, "
        f"flex attention (CUDA); a pass: {inputs.units_per_pass} x {inputs.unit_tokens:,} tokens "
        f"({inputs.predicted_per_pass:,} predicted), {inputs.passes_per_step} pass(es) per optimizer step"
    )
    for row in format_table(plan):
        print(row)
    print(verdict(shape, inputs, plan, args.gpu_memory, available))
    return 0
