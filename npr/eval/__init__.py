"""Evaluation pieces: metrics over sample records, the HTML report and the trajectory viewer.

The eval runner (which samples the model and writes ``samples.jsonl``) builds on these.
"""

from npr.eval.metrics import avg_at_k, best_at_k, pass_at_k, summarize
from npr.eval.report import build_report, write_report
from npr.eval.viewer import normalize_record, read_records, render_viewer_page

__all__ = [
    "avg_at_k",
    "best_at_k",
    "build_report",
    "normalize_record",
    "pass_at_k",
    "read_records",
    "render_viewer_page",
    "summarize",
    "write_report",
]
