"""``npr eval``: evaluate a model on NPR's benchmarks (or reasoning-gym tasks) through the engine."""

from __future__ import annotations

import argparse
import sys
import time


def add_parser(sub, name: str, help_text: str):
    from npr.cli.args import (
        device_name,
        dtype_name,
        non_empty,
        non_negative_float,
        non_negative_int,
        out_path,
        positive_float,
        positive_int,
        probability,
        seed,
    )

    p = sub.add_parser(
        name,
        help=help_text,
        description=(
            f"{help_text}. Writes DIR/config.json (every setting, prompt, model and data hashes, versions), "
            "samples.jsonl, results.json and report.html. Defaults follow NPR's protocol: k=8, temperature 1.0, "
            "top-p 0.7. Every input is checked before anything is written; a problem that cannot run (e.g. a prompt "
            "longer than the context) is recorded in samples.jsonl and the report, and the run goes on. Interrupted "
            "(Ctrl-C, kill), the same command plus --resume continues from the last finished problem."
        ),
    )
    p.add_argument(
        "--model",
        default="embedded",
        help="embedded, tiny-random-llama, a local dir (e.g. a run's final/) or an HF hub id (default: embedded)",
    )
    p.add_argument(
        "--benchmarks",
        default="aime25",
        type=non_empty,
        help="comma-separated: aime24, aime25, hmmt25, "
        "amc23, math500, minerva, olympiadbench, zebralogic, rg:<task>?size=..&seed=.., or a .jsonl path "
        "(default: aime25)",
    )
    p.add_argument("--k", type=positive_int, default=8, help="samples per problem (default: 8)")
    p.add_argument("--mode", default="parallel", choices=["parallel", "sequential", "plain"])
    p.add_argument(
        "--baseline-mode",
        default=None,
        choices=["parallel", "sequential", "plain"],
        help="also run the same problems in this mode and report the speedup over it",
    )
    p.add_argument("--limit", type=positive_int, default=None, help="first N problems of each benchmark")
    p.add_argument("--max-new-tokens", type=positive_int, default=1024, help="budget over all branches (default: 1024)")
    p.add_argument("--temperature", type=non_negative_float, default=1.0, help="0 = greedy (default: 1.0)")
    p.add_argument("--top-p", type=probability, default=0.7, help="nucleus mass in (0, 1] (default: 0.7)")
    p.add_argument("--top-k", type=non_negative_int, default=0, help="0 = off (default)")
    p.add_argument("--seed", type=seed, default=0, help="0 <= seed < 2**32 (default: 0)")
    p.add_argument("--style", default="npr", choices=["npr", "plain"], help="prompt style (default: npr)")
    p.add_argument(
        "--system-prompt-file",
        default=None,
        metavar="PATH",
        help="text file whose contents replace npr's format instruction, e.g. the prompts/npr.txt that "
        "NPR's released checkpoints were trained with (with --system-prompt-placement user)",
    )
    p.add_argument(
        "--system-prompt-placement",
        default="system",
        choices=["system", "user"],
        help="where the instruction goes: the system message (npr's layout, default) or after the problem "
        "and a blank line in the user message (NPR's released code)",
    )
    p.add_argument("--data-dir", default=None, help="folder with <benchmark>.jsonl files (default: $NPR_DATA_DIR)")
    p.add_argument("--dtype", default="bfloat16", type=dtype_name, help="bfloat16 (default) or float32")
    p.add_argument("--device", default="cpu", type=device_name, help="cpu (default), cuda, cuda:N or mps")
    p.add_argument("--max-num-seqs", type=positive_int, default=64, help="live streams decoded at once")
    p.add_argument(
        "--kv-cache-gib",
        type=positive_float,
        default=None,
        help="KV pool size in GiB (default: on CUDA what --gpu-memory-utilization leaves; 2 on a CPU)",
    )
    p.add_argument(
        "--gpu-memory-utilization",
        type=probability,
        default=0.9,
        help="on CUDA without --kv-cache-gib: the share of the GPU's memory the weights, a forward and "
        "the KV pool may take, as vLLM (default: 0.9)",
    )
    p.add_argument(
        "--backend",
        default="npr",
        choices=["npr", "llamacpp"],
        help="npr's engine (default) or "
        "llama.cpp from the model's GGUF (embedded: the shipped Q4_1 file with the NPR tags; needs "
        "npr[llamacpp])",
    )
    p.add_argument("--out", default=None, type=out_path, help="run directory (required unless --show-config)")
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run in --out (refused when the "
        "settings, the model's weights, the data or the prompt differ from the run's config.json)",
    )
    group.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.add_argument(
        "--show-config",
        action="store_true",
        help="print the resolved settings as YAML, each one's source "
        "(default or flag) in a comment, and exit without loading anything",
    )
    p.set_defaults(eval_parser=p)  # --show-config asks it which flags were given
    return p


class EvalProgress:
    """A rich progress bar per benchmark: samples done, tokens/s, running accuracy."""

    def __init__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeRemainingColumn(),
            transient=False,
        )
        self.tokens, self.start = 0, time.perf_counter()

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def start(self, description: str, total: int):
        self.tokens, self.start = 0, time.perf_counter()
        return self.bar.add_task(description, total=total, stats="")

    def advance(self, task, event, records) -> None:
        self.tokens += event.tokens
        rate = self.tokens / max(1e-9, time.perf_counter() - self.start)
        acc = sum(bool(r["correct"]) for r in records) / len(records) if records else 0.0
        self.bar.update(task, completed=len(records), stats=f"{rate:.0f} tok/s · acc {acc:.1%}")


# EvalConfig field -> argparse dest, for the fields that are flags
FLAG_FIELDS = {
    "model": "model",
    "benchmarks": "benchmarks",
    "k": "k",
    "mode": "mode",
    "baseline_mode": "baseline_mode",
    "limit": "limit",
    "max_new_tokens": "max_new_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "seed": "seed",
    "style": "style",
    "data_dir": "data_dir",
    "dtype": "dtype",
    "device": "device",
    "max_num_seqs": "max_num_seqs",
    "kv_cache_gib": "kv_cache_gib",
    "gpu_memory_utilization": "gpu_memory_utilization",
    "backend": "backend",
    "system_prompt_file": "system_prompt_file",
    "system_prompt_placement": "system_prompt_placement",
}


def build_config(args):
    from npr.data import split_specs
    from npr.eval.runner import EvalConfig

    values = {name: getattr(args, dest) for name, dest in FLAG_FIELDS.items()}
    return EvalConfig(**{**values, "benchmarks": tuple(split_specs(args.benchmarks))})


def given_flags(parser, argv: list[str]) -> set[str]:
    """Destinations of the flags present in ``argv``: argparse fills in a default only for a
    destination missing from the namespace, so one pre-filled with a sentinel tells them apart."""
    unset = object()
    namespace = argparse.Namespace(**{a.dest: unset for a in parser._actions if a.dest != argparse.SUPPRESS})
    parsed = parser.parse_args(argv, namespace=namespace)
    return {dest for dest, value in vars(parsed).items() if value is not unset}


def show_config(args, command: str) -> int:
    from dataclasses import asdict

    from npr.train.overrides import config_to_annotated_yaml

    config = build_config(args)
    argv = args.argv[args.argv.index("eval") + 1 :] if "eval" in args.argv else []
    given = given_flags(args.eval_parser, argv)
    sources = {name: "flag" if dest in given else "default" for name, dest in FLAG_FIELDS.items()}
    if config.system_prompt is not None:
        sources["system_prompt"] = f"read from {config.system_prompt_file}"
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}
    header = f"{command}\nresolved settings (--show-config: nothing was loaded or run); sources: default < flag"
    print(config_to_annotated_yaml(values, sources, header), end="")
    return 0


def run(args) -> int:
    from contextlib import nullcontext

    from rich.console import Console

    from npr.cli.args import check_out_dir
    from npr.eval.runner import EvalError, evaluate
    from npr.runlock import locked_run_dir

    if args.show_config:
        return show_config(args, args.command_line)
    if args.out is None:
        raise EvalError("--out DIR is required (only --show-config runs without it)")
    config = build_config(args)
    console = Console(stderr=True)
    progress = None if args.quiet or not console.is_terminal else EvalProgress()
    check_out_dir(args.out)
    try:
        with locked_run_dir(args.out), progress or nullcontext():
            results = evaluate(config, args.out, resume=args.resume, overwrite=args.overwrite, progress=progress)
    except KeyboardInterrupt:
        console.print(
            f"interrupted: finished problems are kept in {args.out}/samples.jsonl; "
            f"continue with the same command plus --resume"
        )
        return 130
    print_summary(results, args.out)
    failed = results.get("failures", {})
    if failed.get("problems"):
        console.print(
            f"[yellow]{failed['problems']} problem(s) not evaluated[/] ({failed['by_reason']}); "
            f"see {args.out}/report.html#failures"
        )
    return 0


def print_summary(results: dict, out: str) -> None:
    from rich.console import Console
    from rich.table import Table

    fmt = lambda v, pct=True: "-" if v is None else (f"{v:.1%}" if pct else f"{v:.2f}")  # noqa: E731
    table = Table(title=f"npr eval ({results.get('mode')}) → {out}/report.html")
    for col in ("benchmark", "avg@k", "best@k", "format valid", "trigger", "branches/block", "tok/s", "speedup"):
        table.add_column(col, justify="right")
    rows = list(results["benchmarks"].items()) + [("overall", results["overall"])]
    for name, g in rows:
        table.add_row(
            name,
            fmt(g["avg_at_k"]),
            fmt(g["best_at_k"]),
            fmt(g["format_valid_rate"]),
            fmt(g["trigger_rate"]),
            fmt(g["branches_per_block"], False),
            fmt(g["tokens_per_second"], False),
            fmt(g.get("speedup"), False),
        )
    Console(file=sys.stdout).print(table)
