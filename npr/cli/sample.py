"""``npr sample``: rejection sampling from the Stage-1 model, the dataset of Stage 2.

    npr sample --preset tiny --model runs/tiny/stage1/final --out runs/tiny/sample

Writes DIR/data.jsonl (correct, format-valid samples in the canonical form, with provenance),
DIR/summary.json (kept and dropped counts by reason) and DIR/config.yaml. ``--show-config``
prints the resolved config with each field's source and exits.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub, name: str, help_text: str):
    from npr.cli.train import add_run_arguments
    from npr.train.config import SampleConfig
    from npr.train.overrides import add_config_flags

    p = sub.add_parser(
        name,
        help=help_text,
        description=__doc__,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_run_arguments(p, "sample", "output directory: data.jsonl, summary.json, config.yaml")
    p.add_argument("--overwrite", action="store_true", help="replace the data.jsonl of an earlier npr sample in --out")
    add_config_flags(p, SampleConfig)
    return p


def _print_summary(summary: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"npr sample: {summary['samples']} samples of {summary['problems']} problems")
    table.add_column("outcome")
    table.add_column("samples", justify="right")
    table.add_row("kept", str(summary["kept"]))
    for reason, count in summary["dropped"].items():
        table.add_row(f"dropped: {reason}", str(count))
    table.add_row("format-valid rate", f"{summary['format_valid_rate']:.1%}")
    table.add_row("accuracy", f"{summary['accuracy']:.1%}")
    table.add_row("problems with a kept sample", str(summary["problems_with_kept"]))
    Console().print(table)
    print(f"wrote {out / 'data.jsonl'} and {out / 'summary.json'}")


def run(args) -> int:
    from npr.cli.args import check_out_dir
    from npr.cli.train import require_out, show_config
    from npr.runlock import locked_run_dir
    from npr.train.config import SampleConfig

    command = args.command_line
    if args.show_config:
        return show_config("sample", SampleConfig, args, command)
    out = check_out_dir(require_out(args, "npr sample"))
    with locked_run_dir(out):
        return _run_locked(args, out, command)


def _run_locked(args, out: Path, command: str) -> int:
    from npr.errors import UsageError
    from npr.train.config import SampleConfig
    from npr.train.overrides import flags_from_args, resolve_config
    from npr.train.sample import run_sample
    from npr.validate import check_rollout_memory

    if (out / "data.jsonl").exists() and not args.overwrite:
        raise UsageError(
            f"{out} already holds sampled data (data.jsonl); pass --overwrite to replace it, or choose another --out"
        )
    config = resolve_config("sample", SampleConfig, args.preset, args.config, flags_from_args(args))
    check_rollout_memory(config)
    if args.quiet or not sys.stdout.isatty():
        summary = run_sample(config, out, command=command)
    else:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(
            TextColumn("[bold]npr sample[/] problems"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()
        ) as progress:
            task = progress.add_task("sample", total=None)
            summary = run_sample(
                config, out, command=command, progress=lambda n, total: progress.update(task, advance=n, total=total)
            )
    if not args.quiet:
        _print_summary(summary, out)
    return 0
