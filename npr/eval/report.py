"""``DIR/report.html``: one self-contained page with results, plots and the trajectory viewer.

Everything is inline (CSS, SVG, JS, data): the page opens from disk with no network. Plots are
SVG strings built here by small pure functions; the viewer comes from ``npr.eval.viewer``.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

from npr.eval.metrics import summarize
from npr.eval.viewer import normalize_record, page, viewer_section
from npr.fsio import atomic_write_text

PALETTE = ("#0969da", "#cf222e", "#1a7f37", "#8250df", "#bc4c00", "#0a7480", "#6e7781")
MAX_SCATTER_POINTS = 4000


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _num(value: float) -> str:
    return f"{value:.1f}".rstrip("0").rstrip(".") if value is not None else ""


def nice_max(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 × 10^n that is ≥ ``value`` (an axis top); 1 for value ≤ 0."""
    if value <= 0 or math.isnan(value):
        return 1.0
    base = 10 ** math.floor(math.log10(value))
    return next(m * base for m in (1, 2, 2.5, 5, 10) if m * base >= value - 1e-12)


def _frame(width: int, height: int, title: str, body: str) -> str:
    return (
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{_esc(title)}">'
        f'<text x="{width / 2}" y="16" text-anchor="middle" class="ct">{_esc(title)}</text>{body}</svg>'
    )


def _y_axis(x0: float, y0: float, plot_h: float, plot_w: float, top: float, fmt) -> str:
    parts = []
    for i in range(5):
        value = top * i / 4
        y = y0 - plot_h * i / 4
        parts.append(
            f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + plot_w}" y2="{y:.1f}" class="grid"/>'
            f'<text x="{x0 - 4}" y="{y + 4:.1f}" text-anchor="end" class="tick">{_esc(fmt(value))}</text>'
        )
    return "".join(parts)


def bar_chart(
    items: list[tuple[str, float | None]],
    title: str,
    top: float | None = None,
    fmt=lambda v: f"{v:g}",
    reference: float | None = None,
    width: int = 420,
    height: int = 240,
) -> str:
    """Vertical bars, one per (label, value); None values leave an empty slot marked "n/a".

    ``top`` fixes the axis maximum (e.g. 1 for rates); ``reference`` draws a dashed line (e.g. 1× speedup).
    """
    x0, y0, plot_w, plot_h = 44, height - 48, width - 56, height - 78
    known = [v for _, v in items if v is not None]
    top = top or nice_max(1.08 * max(known + [reference or 0], default=1))  # headroom for the value labels
    slot = plot_w / max(len(items), 1)
    parts = [_y_axis(x0, y0, plot_h, plot_w, top, fmt)]
    for i, (label, value) in enumerate(items):
        x = x0 + i * slot + slot * 0.15
        cx = x0 + (i + 0.5) * slot
        if value is None:
            parts.append(f'<text x="{cx:.1f}" y="{y0 - 4}" text-anchor="middle" class="tick">n/a</text>')
        else:
            h = plot_h * min(value, top) / top
            parts.append(
                f'<rect x="{x:.1f}" y="{y0 - h:.1f}" width="{slot * 0.7:.1f}" height="{h:.1f}" '
                f'fill="{PALETTE[0]}"><title>{_esc(label)}: {_esc(fmt(value))}</title></rect>'
                f'<text x="{cx:.1f}" y="{y0 - h - 3:.1f}" text-anchor="middle" class="val">{_esc(fmt(value))}</text>'
            )
        parts.append(f'<text x="{cx:.1f}" y="{y0 + 14}" text-anchor="middle" class="tick">{_esc(label[:14])}</text>')
    if reference is not None and reference <= top:
        y = y0 - plot_h * reference / top
        parts.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + plot_w}" y2="{y:.1f}" class="ref"/>')
    return _frame(width, height, title, "".join(parts))


def scatter_chart(
    points: list[tuple[float, float, bool | None]],
    title: str,
    x_label: str,
    y_label: str,
    width: int = 420,
    height: int = 280,
) -> str:
    """Points (x, y, correct) coloured green/red/grey, with the y = x diagonal (no parallelism).

    More than ``MAX_SCATTER_POINTS`` points are thinned by a fixed stride, so the page stays small.
    """
    if len(points) > MAX_SCATTER_POINTS:
        stride = math.ceil(len(points) / MAX_SCATTER_POINTS)
        points = points[::stride]
    x0, y0, plot_w, plot_h = 52, height - 44, width - 68, height - 76
    top = nice_max(max([max(x, y) for x, y, _ in points], default=1))
    colour = {True: PALETTE[2], False: PALETTE[1], None: PALETTE[6]}
    parts = [
        _y_axis(x0, y0, plot_h, plot_w, top, _num),
        f'<line x1="{x0}" y1="{y0}" x2="{x0 + plot_w}" y2="{y0 - plot_h}" class="ref"/>',
    ]
    for i in range(5):
        x = x0 + plot_w * i / 4
        parts.append(
            f'<text x="{x:.1f}" y="{y0 + 14}" text-anchor="middle" class="tick">{_esc(_num(top * i / 4))}</text>'
        )
    for x, y, ok in points:
        parts.append(
            f'<circle cx="{x0 + plot_w * x / top:.1f}" cy="{y0 - plot_h * y / top:.1f}" r="2.5" '
            f'fill="{colour[ok]}" fill-opacity="0.6"/>'
        )
    parts.append(
        f'<text x="{x0 + plot_w / 2}" y="{height - 6}" text-anchor="middle" class="tick">{_esc(x_label)}</text>'
        f'<text x="12" y="{y0 - plot_h / 2}" text-anchor="middle" class="tick" '
        f'transform="rotate(-90 12 {y0 - plot_h / 2})">{_esc(y_label)}</text>'
    )
    return _frame(width, height, title, "".join(parts))


def line_chart(points: list[tuple[float, float]], title: str, width: int = 300, height: int = 170) -> str:
    """One metric over training steps: a polyline with its min and max on the y axis."""
    points = sorted(points)
    x0, y0, plot_w, plot_h = 46, height - 30, width - 58, height - 58
    if not points:
        return _frame(
            width,
            height,
            title,
            f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" class="tick">no data</text>',
        )
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_lo, x_hi, y_lo, y_hi = min(xs), max(xs), min(ys), max(ys)
    x_span, y_span = (x_hi - x_lo) or 1.0, (y_hi - y_lo) or 1.0
    coords = " ".join(
        f"{x0 + plot_w * (x - x_lo) / x_span:.1f},{y0 - plot_h * (y - y_lo) / y_span:.1f}" for x, y in points
    )
    body = (
        f'<line x1="{x0}" y1="{y0}" x2="{x0 + plot_w}" y2="{y0}" class="grid"/>'
        f'<line x1="{x0}" y1="{y0 - plot_h}" x2="{x0 + plot_w}" y2="{y0 - plot_h}" class="grid"/>'
        f'<text x="{x0 - 4}" y="{y0 + 4}" text-anchor="end" class="tick">{y_lo:.3g}</text>'
        f'<text x="{x0 - 4}" y="{y0 - plot_h + 4}" text-anchor="end" class="tick">{y_hi:.3g}</text>'
        f'<text x="{x0}" y="{y0 + 14}" class="tick">{x_lo:g}</text>'
        f'<text x="{x0 + plot_w}" y="{y0 + 14}" text-anchor="end" class="tick">step {x_hi:g}</text>'
        f'<polyline points="{coords}" fill="none" stroke="{PALETTE[0]}" stroke-width="1.6"/>'
    )
    if len(points) == 1:
        body += f'<circle cx="{x0}" cy="{y0 - plot_h / 2 if y_hi == y_lo else y0}" r="3" fill="{PALETTE[0]}"/>'
    return _frame(width, height, title, body)


# -- sections -------------------------------------------------------------------------------


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def _fixed(v, digits: int = 2, suffix: str = "") -> str:
    return "–" if v is None else f"{v:.{digits}f}{suffix}"


COLUMNS = (  # (header, tooltip, formatter of a summary group)
    ("samples", "sampled responses", lambda g: str(g["samples"])),
    ("k", "samples per problem (the smallest)", lambda g: str(g["k"])),
    ("avg@k", "mean accuracy over the k samples of each problem", lambda g: _pct(g["avg_at_k"])),
    ("best@k", "unbiased pass@k: at least one of k samples correct", lambda g: _pct(g["best_at_k"])),
    ("format valid", "share of outputs that pass the NPR schema", lambda g: _pct(g["format_valid_rate"])),
    ("trigger", "share of samples with ≥1 block executed as parallel branches", lambda g: _pct(g["trigger_rate"])),
    ("≥2 branches", "share of samples with a block of ≥2 branches", lambda g: _pct(g["multi_branch_rate"])),
    ("branches/block", "mean branches per executed block", lambda g: _fixed(g["branches_per_block"])),
    (
        "plan diversity",
        "distinct plan texts / all plans (numbering stripped); low = the same plans every time",
        lambda g: _pct(g.get("plan_diversity")),
    ),
    (
        "off-mode plans",
        "share of samples whose plans differ from the most common plan set",
        lambda g: _pct(g.get("off_mode_plan_rate")),
    ),
    (
        "redundancy",
        "share of multi-branch blocks whose branches all reach the same result (duplicated work)",
        lambda g: _pct(g.get("branch_redundancy")),
    ),
    (
        "r(size, branches)",
        "correlation of the problem's size with the branches per block the model opened",
        lambda g: _fixed(g.get("size_branch_correlation")),
    ),
    ("invalid schema", "share stopped by the engine as invalid_schema", lambda g: _pct(g["invalid_schema_rate"])),
    ("tokens/s", "all branch tokens / run wall time", lambda g: _fixed(g["tokens_per_second"], 1)),
    (
        "tokens ÷ critical",
        "token-latency ratio: the ideal parallel speedup",
        lambda g: _fixed(g["token_latency_ratio"], 2, "×"),
    ),
)
BASELINE_COLUMNS = (
    (
        "speedup (one run)",
        "baseline wall time / this run's wall time, one unalternated timing (see the speedup "
        "section for the alternated median)",
        lambda g: _fixed(g.get("speedup"), 2, "×"),
    ),
    ("TPS ratio", "this run's tokens/s ÷ the baseline's", lambda g: _fixed(g.get("tps_ratio"), 2, "×")),
)


def results_table(summary: dict, with_baseline: bool) -> str:
    """The results table: one row per benchmark, then the overall row."""
    columns = COLUMNS + (BASELINE_COLUMNS if with_baseline else ())
    head = "".join(f'<th title="{_esc(tip)}">{_esc(name)}</th>' for name, tip, _ in columns)
    rows = []
    for name, group in [*summary["benchmarks"].items(), ("overall", summary["overall"])]:
        cells = "".join(f"<td>{_esc(cell(group))}</td>" for _, _, cell in columns)
        rows.append(
            f'<tr class="{"ov" if name == "overall" else ""}"><th>{_esc(name or "(no benchmark)")}</th>{cells}</tr>'
        )
    notes = []
    for name, group in summary["benchmarks"].items():
        if group["invalid_schema_reasons"]:
            reasons = ", ".join(f"{k} ×{v}" for k, v in group["invalid_schema_reasons"].items())
            notes.append(f"<li>{_esc(name)}: invalid schema: {_esc(reasons)}</li>")
        if with_baseline and group.get("baseline_matches") is False:
            notes.append(f"<li>{_esc(name)}: the baseline covered other problems; no speedup</li>")
    walls = {g["wall_source"] for g in summary["benchmarks"].values()}
    if "sum_of_samples" in walls:
        notes.append(
            "<li>wall time = sum of per-sample times (no run-level time given); exact only for unbatched runs</li>"
        )
    return (
        f'<section><h2>Results</h2><div class="tbl"><table><thead><tr><th>benchmark</th>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
        + (f'<ul class="notes">{"".join(notes)}</ul>' if notes else "")
        + "</section>"
    )


def _range(part: dict) -> str:
    if part.get("speedup_median") is None:
        return "–"
    return (
        f"{part['speedup_median']:.2f}× (range {part['speedup_min']:.2f}–{part['speedup_max']:.2f}, "
        f"{len(part['speedups'])} rounds)"
    )


def speed_section(speed: dict | None) -> str:
    """The alternated timing of the run's mode against its baseline (``runner.time_modes``)."""
    if not speed:
        return ""
    batched, single = speed["batched"], speed.get("batch1")
    rows = [
        (
            "batched",
            f"{batched['problems']} problems, {batched['samples_per_run']} samples per run",
            _range(batched),
            _fixed(batched.get("ideal"), 2, "×"),
        )
    ]
    if single:
        rows.append(
            (
                "batch 1 (latency)",
                f"{single['requests']} single requests, one sample each",
                _range(single),
                _fixed(single.get("ideal"), 2, "×"),
            )
        )
    body = "".join(
        f"<tr><th>{_esc(a)}</th><td>{_esc(b)}</td><td>{_esc(c)}</td><td>{_esc(d)}</td></tr>" for a, b, c, d in rows
    )
    return (
        f"<section><h2>Speedup of {_esc(speed['mode'])} over {_esc(speed['baseline_mode'])}</h2>"
        '<div class="tbl"><table><thead><tr><th>timing</th><th>what</th><th>speedup: median (range)</th>'
        f"<th>ideal (tokens ÷ critical path)</th></tr></thead><tbody>{body}</tbody></table></div>"
        '<p class="notes">The two modes are timed alternately (ABBA over rounds) on the same problems and seeds; '
        "the results table's speedup column is the single, unalternated timing of the recorded runs.</p></section>"
    )


def decomposition_section(summary: dict) -> str:
    """Branches per block by problem size (tasks with a size), and the plan counts."""
    overall = summary["overall"]
    by_size = overall.get("branches_by_size") or {}
    if not by_size and overall.get("plan_diversity") is None:
        return ""
    items = "".join(f"<li>size {_esc(size)}: {value:.2f} branches per block</li>" for size, value in by_size.items())
    return (
        '<section><h2>Decomposition</h2><ul class="notes">'
        f"<li>{_esc(overall.get('distinct_plans'))} distinct plan texts; plan diversity "
        f"{_pct(overall.get('plan_diversity'))}; samples off the most common plan set "
        f"{_pct(overall.get('off_mode_plan_rate'))}; branch redundancy {_pct(overall.get('branch_redundancy'))}; "
        f"spread of branches per block {_fixed(overall.get('branch_count_spread'))}</li>{items}</ul></section>"
    )


def charts_section(summary: dict, records: list[dict], with_baseline: bool) -> str:
    """Accuracy per benchmark, speedup, the branches-per-block histogram, tokens vs critical path."""
    benches = summary["benchmarks"]
    charts = [
        bar_chart(
            [(n or "-", g["avg_at_k"]) for n, g in benches.items()],
            "accuracy (avg@k)",
            top=1.0,
            fmt=lambda v: f"{100 * v:.0f}%",
        )
    ]
    if with_baseline:
        charts.append(
            bar_chart(
                [(n or "-", g.get("speedup")) for n, g in benches.items()],
                "wall-clock speedup over baseline",
                fmt=lambda v: f"{v:.2f}×",
                reference=1.0,
            )
        )
    histogram = summary["overall"]["branch_histogram"]
    charts.append(
        bar_chart(
            [(f"{c} branch" + ("es" if c != 1 else ""), n) for c, n in histogram.items()] or [("no blocks", None)],
            "branches per executed block",
            fmt=lambda v: f"{v:g}",
        )
    )
    points = [
        (r["tokens"], r["critical_path_tokens"], r.get("correct"))
        for r in records
        if isinstance(r.get("tokens"), (int, float)) and isinstance(r.get("critical_path_tokens"), (int, float))
    ]
    if points:
        charts.append(
            scatter_chart(
                points,
                "tokens vs critical path (below the diagonal = parallel)",
                "total tokens",
                "critical-path tokens",
            )
        )
    return f'<section><h2>Plots</h2><div class="charts">{"".join(charts)}</div></section>'


def failures_section(failures: list[dict] | None) -> str:
    """Problems that did not run (samples.jsonl records with a ``failure``): how many of each
    reason, then one row per problem with where it came from and why. Empty without failures."""
    if not failures:
        return ""
    counts: dict[str, int] = {}
    for r in failures:
        counts[str(r.get("failure"))] = counts.get(str(r.get("failure")), 0) + 1
    summary = ", ".join(f"{reason} ×{n}" for reason, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    rows = "".join(
        f'<tr><th>{_esc(r.get("benchmark", ""))}</th><td class="l">{_esc(r.get("problem_id", ""))}</td>'
        f'<td class="l">{_esc(r.get("failure", ""))}</td><td class="l">{_esc(r.get("location") or "")}</td>'
        f'<td class="l">{_esc(r.get("message") or "")}</td></tr>'
        for r in failures
    )
    return (
        f'<section id="failures"><h2>Problems not evaluated ({len(failures)})</h2>'
        f'<p class="notes">{_esc(summary)}. They have no samples, so the metrics above leave them out; '
        "fix the cause (see each message) and run again to include them.</p>"
        '<div class="tbl"><table><thead><tr><th>benchmark</th><th>problem</th><th>reason</th><th>where</th>'
        f"<th>message</th></tr></thead><tbody>{rows}</tbody></table></div></section>"
    )


def curves_section(curves: dict[str, list[dict]] | None) -> str:
    """Training curves: per series (e.g. a stage), one small line chart per numeric metric over ``step``."""
    if not curves:
        return ""
    parts = ["<section><h2>Training curves</h2>"]
    for series, rows in curves.items():
        metrics = list(
            dict.fromkeys(
                k
                for row in rows
                for k, v in row.items()
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
            )
        )
        charts = []
        for metric in metrics:
            pts = [
                (float(row.get("step", i)), float(row[metric]))
                for i, row in enumerate(rows)
                if isinstance(row.get(metric), (int, float)) and not isinstance(row.get(metric), bool)
            ]
            charts.append(line_chart(pts, metric))
        parts.append(f'<h3>{_esc(series)}</h3><div class="charts">{"".join(charts) or "no numeric metrics"}</div>')
    return "".join(parts) + "</section>"


REPORT_CSS = """
.tbl{overflow-x:auto;margin:0 18px}table{border-collapse:collapse;font-size:13px}
th,td{border:1px solid var(--line);padding:3px 8px;text-align:right}thead th{background:var(--bg2);cursor:help}
tbody th{text-align:left}td.l{text-align:left}tr.ov{font-weight:600;background:#f6f8fa}.notes{margin:6px 18px;color:var(--mut);font-size:12.5px}
.charts{display:flex;flex-wrap:wrap;gap:12px;margin:0 18px}.chart{border:1px solid var(--line);border-radius:6px;background:#fff}
.chart .ct{font-size:13px;font-weight:600}.chart .tick{font-size:10.5px;fill:#57606a}.chart .val{font-size:10.5px;fill:#1f2328}
.chart .grid{stroke:#eaeef2}.chart .ref{stroke:#6e7781;stroke-dasharray:4 3}h3{margin:10px 18px 4px;font-size:14px}
"""


def build_report(
    records: list[dict],
    *,
    wall_time_s: dict[str, float] | None = None,
    baseline_records: list[dict] | None = None,
    baseline_wall_time_s: dict[str, float] | None = None,
    curves: dict[str, list[dict]] | None = None,
    speed: dict | None = None,
    title: str = "npr evaluation report",
    failures: list[dict] | None = None,
) -> str:
    """The report page's HTML for sample records (the lines of samples.jsonl).

    ``wall_time_s``: the runner's wall time per benchmark (and ``"overall"``), see
    ``metrics.summarize``. ``baseline_records`` (+ their wall times): a baseline run of the same
    problems, for speedup and TPS ratio. ``curves``: ``{series: [{"step": 1, "reward": …}, …]}``.
    ``failures``: records of problems that did not run (``npr.eval.preflight.failure_record``).
    ``speed``: the alternated timing of ``npr.eval.runner.time_modes`` (results.json's ``speed``).
    """
    normalized = [normalize_record(r) for r in records]
    baseline = None
    if baseline_records:
        baseline = summarize([normalize_record(r) for r in baseline_records], baseline_wall_time_s)
    summary = summarize(normalized, wall_time_s, baseline)
    with_baseline = baseline is not None
    body = (
        results_table(summary, with_baseline)
        + failures_section(failures)
        + speed_section(speed)
        + decomposition_section(summary)
        + charts_section(summary, normalized, with_baseline)
        + curves_section(curves)
        + viewer_section(normalized)
    )
    return page(title, body, REPORT_CSS)


def write_report(out_dir: str | Path, records: list[dict], **options) -> Path:
    """Write ``out_dir/report.html`` (see ``build_report`` for ``options``) and return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.html"
    atomic_write_text(path, build_report(records, **options))
    return path
