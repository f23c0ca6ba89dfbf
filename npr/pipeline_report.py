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


def collect_rows(out: Path) -> list[dict]:
    """One dict per evaluated model: its overall metrics (results.json's ``overall``)."""
    rows = []
    for label, step, sub in ROWS:
        path = out / step / sub / "results.json"
        if path.exists():
            overall = json.loads(path.read_text())["overall"]
            rows.append({"model": label, "step": step, **{k: overall.get(k) for k in (
                "avg_at_k", "best_at_k", "format_valid_rate", "trigger_rate", "branches_per_block",
                "tokens_per_second", "token_latency_ratio", "speedup", "tps_ratio", "k", "problems", "samples")}})
    return rows


def collect_curves(out: Path) -> dict[str, list[dict]]:
    """Per training step, the metrics worth plotting, from each stage's metrics.jsonl."""
    curves = {}
    for stage in ("coldstart", "stage1", "stage2", "stage3", "sr"):
        rows = [{"step": r["step"], **{k: r[k] for k in CURVE_METRICS if isinstance(r.get(k), (int, float))}}
                for r in read_jsonl(out / stage / "metrics.jsonl") if "step" in r]
        rows = [r for r in rows if len(r) > 1]
        if rows:
            curves[stage] = rows
    return curves


def _cell(value, kind: str) -> str:
    if value is None:
        return "–"
    return {"pct": f"{100 * value:.1f}%", "x": f"{value:.2f}×", "num": f"{value:.1f}"}[kind]


def table_html(rows: list[dict]) -> str:
    columns = (("avg@k", "avg_at_k", "pct"), ("best@k", "best_at_k", "pct"), ("format valid", "format_valid_rate", "pct"),
               ("trigger", "trigger_rate", "pct"), ("branches/block", "branches_per_block", "num"),
               ("tokens/s", "tokens_per_second", "num"), ("ideal speedup", "token_latency_ratio", "x"),
               ("speedup vs sequential", "speedup", "x"))
    head = "".join(f"<th>{html.escape(name)}</th>" for name, _, _ in columns)
    body = "".join(
        f"<tr><th>{html.escape(r['model'])}</th>" + "".join(f"<td>{_cell(r.get(key), kind)}</td>" for _, key, kind in columns)
        + "</tr>" for r in rows)
    return (f'<section><h2>Results on the held-out split</h2><div class="tbl"><table><thead><tr><th>model</th>{head}'
            f"</tr></thead><tbody>{body}</tbody></table></div></section>")


def write_pipeline_report(run) -> Path:
    """Write DIR/results.json and DIR/report.html for a pipeline run (``npr.pipeline.PipelineRun``)."""
    out = run.out
    rows = collect_rows(out)
    curves = collect_curves(out)
    state = json.loads((out / "pipeline.json").read_text()) if (out / "pipeline.json").exists() else {}
    results = {"preset": run.preset_name, "held_out": run.preset.held_out, "k": run.preset.eval_k, "rows": rows,
               "seconds_per_step": state.get("seconds", {}),
               "total_seconds": round(sum(state.get("seconds", {}).values()), 1)}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    records = []
    for label, step, sub in ROWS:
        for r in read_jsonl(out / step / sub / "samples.jsonl"):
            r["benchmark"] = f"{label}: {r.get('benchmark', '')}"
            records.append(normalize_record(r))
    charts = [bar_chart([(r["model"], r["avg_at_k"]) for r in rows], "accuracy (avg@k)", top=1.0,
                        fmt=lambda v: f"{100 * v:.0f}%", width=640),
              bar_chart([(r["model"], r["format_valid_rate"]) for r in rows], "format-valid rate", top=1.0,
                        fmt=lambda v: f"{100 * v:.0f}%", width=640)]
    note = (f'<p class="notes">preset <b>{html.escape(run.preset_name)}</b>; held-out split '
            f"<code>{html.escape(run.preset.held_out)}</code>, k = {run.preset.eval_k}; total "
            f"{results['total_seconds'] / 60:.1f} min. Tiny-model results: they show the pipeline working, "
            "not the paper's numbers.</p>")
    body = (table_html(rows) + note + f'<section><h2>Plots</h2><div class="charts">{"".join(charts)}</div></section>'
            + curves_section(curves) + viewer_section(records))
    path = out / "report.html"
    path.write_text(page(f"npr pipeline ({run.preset_name})", body, REPORT_CSS), encoding="utf-8")
    return path
