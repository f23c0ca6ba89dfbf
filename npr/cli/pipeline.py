"""``npr pipeline``: all of NPR end to end (see npr.pipeline)."""

from __future__ import annotations

import time


def add_parser(sub, name: str, help_text: str):
    import argparse

    from npr import pipeline
    from npr.cli.args import device_name, out_path
    from npr.pipeline import PRESETS, STEPS

    p = sub.add_parser(
        name, help=help_text, description=pipeline.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--preset",
        default="tiny",
        choices=sorted(PRESETS),
        help="tiny: the embedded SmolLM2-135M on problems of 2-4 independent one-digit expressions (default; "
        "docs/results.md has its measured wall time); "
        "smoke: a tiny random model, seconds per step (CI); qwen3-4b: the paper's setting on GPUs",
    )
    p.add_argument(
        "--out",
        default=None,
        type=out_path,
        help="run directory (default: runs/<preset>); a non-empty "
        "directory that npr pipeline did not create is refused",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="take over --out even if another run or a foreign directory is there: its step directories "
        "(and pipeline.json, results.json, report.html) are deleted, other files are left alone",
    )
    p.add_argument(
        "--from",
        dest="from_step",
        default=None,
        choices=STEPS,
        metavar="STEP",
        help=f"redo this step and every later one ({', '.join(STEPS)})",
    )
    p.add_argument(
        "--baseline",
        action="store_true",
        help="also train and evaluate a sequential-RL baseline on the same data and budget (NPR's SR)",
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="benchmark folder for presets that evaluate on NPR's benchmarks (default: $NPR_DATA_DIR)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        type=device_name,
        help="device of the evaluations: cpu (default), cuda, cuda:N or mps (training follows accelerate)",
    )
    p.add_argument("--quiet", action="store_true", help="no per-step progress from the stages")
    return p


def run(args) -> int:
    from rich.console import Console

    from npr.cli.args import check_device, check_out_dir
    from npr.data import load_problems, split_specs
    from npr.data.benchmarks import resolve_data_dir
    from npr.pipeline import PRESETS, run_pipeline
    from npr.runlock import locked_run_dir

    console = Console()
    out = args.out or f"runs/{args.preset}"
    check_out_dir(out)  # whether --out belongs to this pipeline is run_pipeline's first check
    check_device(args.device)
    if args.data_dir is not None:
        resolve_data_dir(args.data_dir)  # given, it must exist, even if this preset reads no benchmark file
    for spec in split_specs(PRESETS[args.preset].held_out):  # the held-out data, before any step writes
        load_problems(spec, data_dir=args.data_dir, limit=1)
    start = time.perf_counter()

    def log(line: str) -> None:
        elapsed = time.perf_counter() - start
        console.print(f"[dim]{elapsed / 60:5.1f} min[/] {line}", highlight=False)

    with locked_run_dir(out):
        state = run_pipeline(
            args.preset,
            out,
            from_step=args.from_step,
            baseline=args.baseline,
            data_dir=args.data_dir,
            device=args.device,
            quiet=args.quiet,
            log=log,
            overwrite=args.overwrite,
        )
    print_results(console, out, state)
    return 0


def print_results(console, out: str, state: dict) -> None:
    import json
    from pathlib import Path

    from rich.table import Table

    from npr.pipeline_report import cell

    results = json.loads((Path(out) / "results.json").read_text())
    columns = (
        ("avg@k", "avg_at_k", "pct"),
        ("best@k", "best_at_k", "pct"),
        ("format valid", "format_valid_rate", "pct"),
        ("trigger", "trigger_rate", "pct"),
        ("branches/block", "branches_per_block", "num"),
        ("by size", "branches_by_size", "by_size"),
        ("r(size,br.)", "size_branch_correlation", "r"),
        ("plans", "distinct_plans", "int"),
        ("plan div.", "plan_diversity", "pct"),
        ("redundancy", "branch_redundancy", "pct"),
        ("tok/s", "tokens_per_second", "num"),
        ("speedup", "speedup_median", "speed"),
        ("batch-1 speedup", "latency_speedup", "latency"),
    )
    table = Table(title=f"npr pipeline ({results['preset']}): held-out {results['held_out']}, k={results['k']}")
    table.add_column("model")
    for name, _, _ in columns:
        table.add_column(name, justify="right")
    for r in results["rows"]:
        table.add_row(r["model"], *(cell(r, key, kind) for _, key, kind in columns))
    if not console.is_terminal:  # a log file or pipe has no width to fit: 80 columns would cut every cell to "0.…"
        from rich.console import Console

        console = Console(file=console.file, width=max(console.width, 220))
    console.print(table)
    console.print(f"steps took {results['total_seconds'] / 60:.1f} min in all; report: {out}/report.html")
