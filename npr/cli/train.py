"""``npr train stage1|stage2|stage3``: the three NPR training stages (docs/training.md).

    npr train stage1 --preset tiny --out runs/tiny/stage1
    npr train stage2 --preset tiny --model runs/tiny/stage1/final --train-data runs/tiny/sample --out runs/tiny/stage2
    npr train stage3 --preset tiny --model runs/tiny/stage2/final --out runs/tiny/stage3

Every config field is a flag (``--learning-rate 1e-5``); ``--config x.yaml`` sets several;
the order is defaults < --preset < --config < flags. ``--show-config`` prints the resolved
config with each field's source and exits (``npr train stage1 --preset qwen3-4b --show-config``).
On several processes:
``accelerate launch --num_processes 2 --cpu -m npr.cli.main train stage2 …``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

STAGES = {
    "stage1": "NPR-Zero: DAPO with the format + accuracy reward, plain decoding (paper §3.1)",
    "stage2": "NPR-Beta: parallel SFT on rejection-sampled traces, tree attention mask (paper §3.2)",
    "stage3": "NPR: PAPO with rollouts from the parallel engine, schema filter, accuracy reward (paper §3.3)",
}


class ConfigArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose unknown flags are reported as unknown config fields, with the
    closest valid name, instead of argparse's bare "unrecognized arguments"."""

    config_class: type | None = None

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras and self.config_class is not None:
            from npr.train.overrides import unknown_flag_error

            self.error(str(unknown_flag_error(extras, self.config_class, self.prog)))
        return namespace, extras


def add_run_arguments(p: argparse.ArgumentParser, stage: str, out_help: str) -> None:
    from npr.train.presets import PRESETS

    p.add_argument(
        "--preset",
        choices=sorted(PRESETS[stage]),
        default=None,
        help="smoke (tiny random model, seconds: CI), tiny (embedded SmolLM2, minutes on a CPU), "
        "qwen3-4b (the paper's settings, GPUs)",
    )
    p.add_argument(
        "--config",
        default=None,
        metavar="YAML",
        help="YAML file of `field: value` lines (e.g. a run's config.yaml); overrides the preset, flags override it",
    )
    from npr.cli.args import out_path

    p.add_argument(
        "--out", default=None, metavar="DIR", type=out_path, help=out_help + " (required unless --show-config)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress display or per-step lines")
    p.add_argument(
        "--show-config",
        action="store_true",
        help="print the resolved config as YAML (usable with --config), each field's source (default, "
        "preset, file, flag) in a comment, and exit without loading a model or data",
    )


def add_parser(sub, name: str, help_text: str):
    from npr.train.config import STAGE_CONFIGS
    from npr.train.overrides import add_config_flags

    p = sub.add_parser(name, help=help_text, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    stages = p.add_subparsers(dest="stage", metavar="STAGE", required=True, parser_class=ConfigArgumentParser)
    for stage, stage_help in STAGES.items():
        sp = stages.add_parser(stage, help=stage_help, description=stage_help, allow_abbrev=False)
        sp.config_class = STAGE_CONFIGS[stage]
        add_run_arguments(sp, stage, "run directory: config.yaml, metrics.jsonl, checkpoints/, final/")
        sp.add_argument(
            "--resume",
            action="store_true",
            help="continue the run in --out from its latest checkpoint (model, optimizer, schedule, RNG, "
            "data position); its config.yaml is the base config",
        )
        add_config_flags(sp, STAGE_CONFIGS[stage])
    return p


def show_config(stage: str, cls: type, args, command: str) -> int:
    """``--show-config``: the resolved config with each field's source on stdout; nothing is loaded.
    With ``--resume`` the run's saved config.yaml is the base layer."""
    from npr.train.config import ConfigError
    from npr.train.overrides import (
        config_to_annotated_yaml,
        flags_from_args,
        read_yaml_overrides,
        resolve_config_with_sources,
    )

    base = None
    if getattr(args, "resume", False):
        if args.out is None:
            raise ConfigError("--resume --show-config needs --out DIR, the run to be resumed")
        base = {**read_yaml_overrides(Path(args.out) / "config.yaml", cls), "stop_after": None}
    values, sources, error = resolve_config_with_sources(
        stage,
        cls,
        args.preset,
        args.config,
        flags_from_args(args),
        base=base,
        base_label=f"run config {args.out}/config.yaml",
    )
    header = (
        f"{command}\nresolved config (--show-config: nothing was loaded or run); sources: default < preset "
        "< file < flag"
    )
    print(config_to_annotated_yaml(values, sources, header), end="")
    if error is not None:  # shown anyway: the flags a run still needs are part of what the user wants to see
        print(f"# not runnable as it stands: {error}")
        print(f"{command}: note: the config above is not runnable as it stands: {error}", file=sys.stderr)
    return 0


def require_out(args, command: str) -> Path:
    from npr.train.config import ConfigError

    if args.out is None:
        raise ConfigError("--out DIR is required (only --show-config runs without it)")
    return Path(args.out)


def run(args) -> int:
    from npr.cli.args import check_out_dir
    from npr.runlock import locked_run_dir
    from npr.train.config import STAGE_CONFIGS
    from npr.validate import check_rollout_memory

    command = args.command_line
    if args.show_config:  # before importing the trainers: nothing heavy is loaded
        return show_config(args.stage, STAGE_CONFIGS[args.stage], args, command)
    from npr.train.overrides import flags_from_args
    from npr.train.session import RunOptions, resolve_run_config
    from npr.train.stage1 import train_stage1
    from npr.train.stage2 import train_stage2
    from npr.train.stage3 import train_stage3

    out = check_out_dir(require_out(args, f"npr train {args.stage}"))
    with locked_run_dir(out):  # before reading the directory's state: a second writer is refused
        config = resolve_run_config(
            args.stage, STAGE_CONFIGS[args.stage], out, args.resume, args.preset, args.config, flags_from_args(args)
        )
        check_rollout_memory(config)
        options = RunOptions(out, resume=args.resume, quiet=args.quiet, command=command)
        trainer = {"stage1": train_stage1, "stage2": train_stage2, "stage3": train_stage3}[args.stage]
        final = trainer(config, options)
    if final is not None and not args.quiet and int(os.environ.get("RANK", "0")) == 0:
        print(f"npr train {args.stage}: final model in {final}")
    return 0
