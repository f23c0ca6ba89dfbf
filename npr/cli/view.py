"""``npr view``: render sample records or parallel traces as one self-contained HTML viewer."""

from __future__ import annotations

import sys
from pathlib import Path

MAX_SKIPPED_SHOWN = 10


def add_parser(sub, name: str, help_text: str):
    p = sub.add_parser(
        name,
        help=help_text,
        description=help_text + ". Reads samples.jsonl from `npr eval`, "
        "or JSONL/JSON records with an output/text/response field, or a .txt file with one trace, "
        "in the NPR, Multiverse or Parallel-R1 format.",
    )
    p.add_argument(
        "inputs", nargs="+", metavar="FILE", help="samples.jsonl, a .json or a .txt trace file (several allowed)"
    )
    from npr.cli.args import out_path

    p.add_argument(
        "--out", default=None, type=out_path, help="HTML file to write (default: the first input with .html)"
    )
    p.add_argument(
        "--format",
        default="auto",
        choices=("auto", "npr", "multiverse", "parallel-r1"),
        help="trace format of records without a parsed trace (default: detected per record)",
    )
    p.add_argument("--title", default=None, help="page title (default: the input file names)")
    return p


def run(args) -> int:
    from npr.cli.args import check_out_file
    from npr.errors import UsageError
    from npr.eval.viewer import read_records, render_viewer_page
    from npr.fsio import atomic_write_text
    from npr.runlock import locked_output_file

    out = check_out_file(args.out if args.out else Path(args.inputs[0]).with_suffix(".html"))
    if any(Path(p).resolve() == out.resolve() for p in args.inputs):
        raise UsageError(f"--out {out} is one of the inputs; give another file name")
    records, skipped = [], []
    for path in args.inputs:
        records += read_records(path, args.format, skipped)
    for problem in skipped[:MAX_SKIPPED_SHOWN]:  # the readable records are still worth a page
        print(f"npr view: warning: skipped {problem}", file=sys.stderr)
    if len(skipped) > MAX_SKIPPED_SHOWN:
        print(f"npr view: warning: skipped {len(skipped) - MAX_SKIPPED_SHOWN} more record(s)", file=sys.stderr)
    title = args.title or "npr view: " + ", ".join(Path(p).name for p in args.inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    with locked_output_file(out):
        atomic_write_text(out, render_viewer_page(records, title))
    print(
        f"wrote {out} ({len(records)} trace{'s' if len(records) != 1 else ''}"
        + (f"; {len(skipped)} record(s) of another shape skipped, listed above" if skipped else "")
        + ")"
    )
    return 0
