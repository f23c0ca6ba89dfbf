"""The pipeline's report: DIR/results.json and DIR/report.html.

One table (seed model vs NPR-Zero vs NPR-Beta vs NPR, in parallel and sequential mode, and the
sequential-RL baseline when it ran), the training curves of every stage, and the trajectory
viewer over all their samples (the viewer's benchmark filter picks a model).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from npr.eval.report import REPORT_CSS, bar_chart, curves_section
from npr.eval.viewer import normalize_record, page, viewer_section
from npr.train.tracking import read_metrics as read_jsonl  # every line a JSON object; [] when the file is absent

# (row label, eval step, subdirectory holding the run)
ROWS = (
    ("seed model (plain)", "base_eval", ""),
    ("NPR-Zero (parallel)", "zero_eval", ""),
    ("NPR-Beta (parallel)", "beta_eval", ""),
    ("NPR (parallel)", "npr_eval", ""),
    ("NPR (sequential)", "npr_eval", "baseline"),
    ("sequential RL baseline (plain)", "sr_eval", ""),
)
CURVE_METRICS = ("reward", "accuracy", "format_valid_rate", "trigger_rate", "loss", "kept_rate")


ROW_METRICS = (
    "avg_at_k",
    "best_at_k",
    "format_valid_rate",
    "trigger_rate",
    "branches_per_block",
    "plan_diversity",
    "distinct_plans",
    "off_mode_plan_rate",
    "branch_redundancy",
    "branch_count_spread",
    "branches_by_size",
    "size_branch_correlation",
    "tokens_per_second",
    "token_latency_ratio",
    "speedup",
    "tps_ratio",
    "k",
    "problems",
    "samples",
)


def speed_fields(speed: dict | None) -> dict:
    """The alternated timing (results.json's ``speed``) as flat row fields: the batched speedup
    (``speedup_median``/``_min``/``_max``, ``speedup_ideal``) and the batch-1 latency speedup
    (``latency_speedup``/``_min``/``_max``, ``latency_ideal``); {} without a timing."""
    if not speed:
        return {}
    batched, single = speed["batched"], speed.get("batch1") or {}
    return {
        "speedup_median": batched.get("speedup_median"),
        "speedup_min": batched.get("speedup_min"),
        "speedup_max": batched.get("speedup_max"),
        "speedup_ideal": batched.get("ideal"),
        "latency_speedup": single.get("speedup_median"),
        "latency_min": single.get("speedup_min"),
        "latency_max": single.get("speedup_max"),
        "latency_ideal": single.get("ideal"),
    }


def collect_rows(out: Path) -> list[dict]:
    """One dict per evaluated model: its overall metrics (results.json's ``overall``) and, for a run
    with a baseline, its alternated timing (``speed_fields``)."""
    rows = []
    for label, step, sub in ROWS:
        path = out / step / sub / "results.json"
        if path.exists():
            results = json.loads(path.read_text())
            overall = results["overall"]
            rows.append(
                {
                    "model": label,
                    "step": step,
                    **{k: overall.get(k) for k in ROW_METRICS},
                    **(speed_fields(results.get("speed")) if not sub else {}),
                }
            )
    return rows


def collect_curves(out: Path) -> dict[str, list[dict]]:
    """Per training step, the metrics worth plotting, from each stage's metrics.jsonl."""
    curves = {}
    for stage in ("coldstart", "stage1", "stage2", "stage3", "sr"):
        rows = [
            {"step": r["step"], **{k: r[k] for k in CURVE_METRICS if isinstance(r.get(k), (int, float))}}
            for r in read_jsonl(out / stage / "metrics.jsonl")
            if "step" in r
        ]
        rows = [r for r in rows if len(r) > 1]
        if rows:
            curves[stage] = rows
    return curves


def speed_text(value, low, high, ideal) -> str:
    """``1.31× [1.20–1.40] (ideal 1.62×)``; "–" without a timing."""
    if value is None:
        return "–"
    spread = f" [{low:.2f}–{high:.2f}]" if low is not None and high is not None else ""
    return f"{value:.2f}×{spread}" + (f" (ideal {ideal:.2f}×)" if ideal is not None else "")


def by_size_text(by_size: dict | None) -> str:
    """``2: 2.0, 3: 2.9, 4: 3.8`` (problem size: mean branches per block); "–" without sizes."""
    return ", ".join(f"{size}: {value:.1f}" for size, value in by_size.items()) if by_size else "–"


def cell(row: dict, key: str, kind: str) -> str:
    """One table cell of a pipeline row, as text (shared by report.html and the CLI table)."""
    value = row.get(key)
    if kind == "speed":
        return speed_text(
            row.get("speedup_median"), row.get("speedup_min"), row.get("speedup_max"), row.get("speedup_ideal")
        )
    if kind == "latency":
        return speed_text(
            row.get("latency_speedup"), row.get("latency_min"), row.get("latency_max"), row.get("latency_ideal")
        )
    if kind == "by_size":
        return by_size_text(value)
    if value is None:
        return "–"
    formats = {
        "pct": lambda v: f"{100 * v:.1f}%",
        "x": lambda v: f"{v:.2f}×",
        "num": lambda v: f"{v:.1f}",
        "r": lambda v: f"{v:.2f}",
        "int": lambda v: f"{v:d}",
    }
    return formats[kind](value)


# (header, row key, kind): the pipeline's table in report.html and in the CLI's summary
TABLE_COLUMNS = (
    ("avg@k", "avg_at_k", "pct"),
    ("best@k", "best_at_k", "pct"),
    ("format valid", "format_valid_rate", "pct"),
    ("trigger", "trigger_rate", "pct"),
    ("branches/block", "branches_per_block", "num"),
    ("branches by size", "branches_by_size", "by_size"),
    ("r(size, branches)", "size_branch_correlation", "r"),
    ("distinct plans", "distinct_plans", "int"),
    ("plan diversity", "plan_diversity", "pct"),
    ("redundancy", "branch_redundancy", "pct"),
    ("tokens/s", "tokens_per_second", "num"),
    ("speedup, batched [range] (ideal)", "speedup_median", "speed"),
    ("latency speedup, batch 1 [range] (ideal)", "latency_speedup", "latency"),
)


def table_html(rows: list[dict]) -> str:
    head = "".join(f"<th>{html.escape(name)}</th>" for name, _, _ in TABLE_COLUMNS)
    body = "".join(
        f"<tr><th>{html.escape(r['model'])}</th>"
        + "".join(f"<td>{html.escape(cell(r, key, kind))}</td>" for _, key, kind in TABLE_COLUMNS)
        + "</tr>"
        for r in rows
    )
    return (
        f'<section><h2>Results on the held-out split</h2><div class="tbl"><table><thead><tr><th>model</th>{head}'
        f"</tr></thead><tbody>{body}</tbody></table></div>"
        '<p class="notes">plan diversity: distinct plan texts / all plans; redundancy: share of multi-branch blocks '
        "whose branches all reach the same result; branches by size: problem size → mean branches per block; "
        "speedups: parallel over sequential mode, timed alternately, median [min–max] over rounds "
        "(docs/evaluation.md).</p></section>"
    )


def write_pipeline_report(run) -> Path:
    """Write DIR/results.json and DIR/report.html for a pipeline run (``npr.pipeline.PipelineRun``)."""
    out = run.out
    rows = collect_rows(out)
    curves = collect_curves(out)
    state = json.loads((out / "pipeline.json").read_text()) if (out / "pipeline.json").exists() else {}
    results = {
        "preset": run.preset_name,
        "held_out": run.preset.held_out,
        "k": run.preset.eval_k,
        "rows": rows,
        "seconds_per_step": state.get("seconds", {}),
        "total_seconds": round(sum(state.get("seconds", {}).values()), 1),
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    records = []
    for label, step, sub in ROWS:
        for r in read_jsonl(out / step / sub / "samples.jsonl"):
            r["benchmark"] = f"{label}: {r.get('benchmark', '')}"
            records.append(normalize_record(r))
    charts = [
        bar_chart(
            [(r["model"], r["avg_at_k"]) for r in rows],
            "accuracy (avg@k)",
            top=1.0,
            fmt=lambda v: f"{100 * v:.0f}%",
            width=640,
        ),
        bar_chart(
            [(r["model"], r["format_valid_rate"]) for r in rows],
            "format-valid rate",
            top=1.0,
            fmt=lambda v: f"{100 * v:.0f}%",
            width=640,
        ),
    ]
    note = (
        f'<p class="notes">preset <b>{html.escape(run.preset_name)}</b>; held-out split '
        f"<code>{html.escape(run.preset.held_out)}</code>, k = {run.preset.eval_k}; total "
        f"{results['total_seconds'] / 60:.1f} min. Tiny-model results: they show the pipeline working, "
        "not the paper's numbers.</p>"
    )
    body = (
        table_html(rows)
        + note
        + f'<section><h2>Plots</h2><div class="charts">{"".join(charts)}</div></section>'
        + curves_section(curves)
        + viewer_section(records)
    )
    path = out / "report.html"
    path.write_text(page(f"npr pipeline ({run.preset_name})", body, REPORT_CSS), encoding="utf-8")
    return path
