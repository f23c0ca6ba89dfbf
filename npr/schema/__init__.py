"""The NPR output schema: parse, validate, score and render parallel traces.

Format (arXiv 2512.07461): one or more blocks, each ``<guideline>`` holding one or more
``<plan>k: …</plan>`` then ``</guideline>``, then one ``<step>…</step>`` per plan in the same
order, then ``<takeaway>…</takeaway>``; after the last block, free text with the final answer
in ``\\boxed{…}``. Blocks are flat. ``npr.schema.canonical`` fixes the exact text layout.
"""

from npr.schema.answer import extract_answer, find_boxed
from npr.schema.canonical import (
    GUIDELINE_SEPARATOR,
    MAX_PLANS,
    STEP_SEPARATOR,
    TAGS,
    TAKEAWAY_OPEN,
    plan_label,
    render,
    step_open,
)
from npr.schema.convert import detect_format, from_multiverse, from_parallel_r1
from npr.schema.parse import PENALTIES, SchemaError, SchemaParseError, format_score, parse, validate
from npr.schema.trace import Block, ParallelTrace, Plan, Span, Step

__all__ = [
    "GUIDELINE_SEPARATOR",
    "MAX_PLANS",
    "PENALTIES",
    "STEP_SEPARATOR",
    "TAGS",
    "TAKEAWAY_OPEN",
    "Block",
    "ParallelTrace",
    "Plan",
    "SchemaError",
    "SchemaParseError",
    "Span",
    "Step",
    "detect_format",
    "extract_answer",
    "find_boxed",
    "format_score",
    "from_multiverse",
    "from_parallel_r1",
    "parse",
    "plan_label",
    "render",
    "step_open",
    "validate",
]
