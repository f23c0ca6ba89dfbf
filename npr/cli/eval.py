"""``npr eval``: evaluate a model on NPR's benchmarks (or reasoning-gym tasks) through the engine."""

from __future__ import annotations

import sys
import time


def add_parser(sub, name: str, help_text: str):
    p = sub.add_parser(name, help=help_text, description=(
        f"{help_text}. Writes DIR/config.json (every setting, prompt, model hash, versions), samples.jsonl, "
        "results.json and report.html. Defaults follow NPR's protocol: k=8, temperature 1.0, top-p 0.7."))
    p.add_argument("--model", default="embedded", help="embedded, tiny-random-llama, a local dir (e.g. a run's "
                   "final/) or an HF hub id (default: embedded)")
    p.add_argument("--benchmarks", default="aime25", help="comma-separated: aime24, aime25, hmmt25, amc23, math500, "
                   "minerva, olympiadbench, zebralogic, rg:<task>?size=..&seed=.., or a .jsonl path (default: aime25)")
    p.add_argument("--k", type=int, default=8, help="samples per problem (default: 8)")
    p.add_argument("--mode", default="parallel", choices=["parallel", "sequential", "plain"])
    p.add_argument("--baseline-mode", default=None, choices=["parallel", "sequential", "plain"],
                   help="also run the same problems in this mode and report the speedup over it")
    p.add_argument("--limit", type=int, default=None, help="first N problems of each benchmark")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="budget over all branches (default: 1024)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.7)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--style", default="npr", choices=["npr", "plain"], help="prompt style (default: npr)")
    p.add_argument("--data-dir", default=None, help="folder with <benchmark>.jsonl files (default: $NPR_DATA_DIR)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-num-seqs", type=int, default=64, help="requests decoded at once")
    p.add_argument("--kv-cache-gib", type=float, default=2.0, help="KV pool size")
    p.add_argument("--out", required=True, help="run directory")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    group.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    return p


class EvalProgress:
    """A rich progress bar per benchmark: samples done, tokens/s, running accuracy."""

    def __init__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[stats]}"), TimeRemainingColumn(), transient=False)
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


def run(args) -> int:
    from contextlib import nullcontext

    from rich.console import Console

    from npr.data import split_specs
    from npr.eval.runner import EvalConfig, evaluate

    config = EvalConfig(
        model=args.model, benchmarks=tuple(split_specs(args.benchmarks)), k=args.k, mode=args.mode,
        baseline_mode=args.baseline_mode, limit=args.limit, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed, style=args.style,
        data_dir=args.data_dir, dtype=args.dtype, device=args.device, max_num_seqs=args.max_num_seqs,
        kv_cache_gib=args.kv_cache_gib)
    console = Console(stderr=True)
    progress = None if args.quiet or not console.is_terminal else EvalProgress()
    try:
        with progress or nullcontext():
            results = evaluate(config, args.out, resume=args.resume, overwrite=args.overwrite, progress=progress)
    except KeyboardInterrupt:
        console.print(f"interrupted: finished samples are kept in {args.out}/samples.jsonl; "
                      f"continue with the same command plus --resume")
        return 130
    print_summary(results, args.out)
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
        table.add_row(name, fmt(g["avg_at_k"]), fmt(g["best_at_k"]), fmt(g["format_valid_rate"]),
                      fmt(g["trigger_rate"]), fmt(g["branches_per_block"], False), fmt(g["tokens_per_second"], False),
                      fmt(g.get("speedup"), False))
    Console(file=sys.stdout).print(table)
