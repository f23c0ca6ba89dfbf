"""The canonical form of an NPR trace: the one exact text layout npr writes and prefills.

    <guideline>
    <plan>1: first plan</plan>
    <plan>2: second plan</plan>
    </guideline>
    <step>
    1: execution of plan 1
    </step>
    <step>
    2: execution of plan 2
    </step>
    <takeaway>
    comparison and synthesis
    </takeaway>
    ...more blocks...
    final text with \\boxed{answer}

Rules (docs/schema.md has the full page):
- one newline after every closing tag and after ``<guideline>``, ``<step>`` and ``<takeaway>``;
  none between ``<plan>`` and its text;
- plans and steps are labelled ``k:`` with k counting from 1 in each block, followed by one
  space and the text; a step's text ends with a newline before ``</step>``;
- nothing between blocks; the final text follows the last ``</takeaway>`` and its newline.

The newline after ``</guideline>`` is shared context (every branch sees it); the newline after
``</step>`` belongs to that step's branch. The engine prefills exactly these strings:
``plan_label(k)`` after the k-th ``<plan>`` the model writes, the shared ``GUIDELINE_SEPARATOR``,
then ``step_open(k)`` in branch k, then ``STEP_SEPARATOR`` when the branch emits ``</step>``,
then ``TAKEAWAY_OPEN`` at the join.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from npr.schema.trace import ParallelTrace

TAGS: tuple[str, ...] = (
    "<guideline>",
    "</guideline>",
    "<plan>",
    "</plan>",
    "<step>",
    "</step>",
    "<takeaway>",
    "</takeaway>",
)
"""The 8 structural tags; npr adds each as one special token (npr.tokens)."""

MAX_PLANS = 5
"""Most plans a block may hold (NPR's engine limit; more is a schema violation)."""

GUIDELINE_SEPARATOR = "\n"
STEP_SEPARATOR = "\n"
TAKEAWAY_OPEN = "<takeaway>"


def plan_label(label: int) -> str:
    """The label the engine prefills after the model opens plan ``label`` (1-based) with ``<plan>``."""
    return f"{label}:"


def step_open(label: int) -> str:
    """The scaffold that opens branch ``label`` (1-based): ``<step>`` plus its label."""
    return f"<step>\n{label}:"


def _labelled(label: int, text: str) -> str:
    return f"{plan_label(label)} {text}" if text else plan_label(label)


def render(trace: ParallelTrace) -> str:
    """Render a trace in the canonical form.

    Labels are renumbered 1..k in each block and surrounding whitespace is normalised;
    block preambles (text outside the NPR structure, e.g. Multiverse's sequential text)
    are dropped. ``render(parse(t)) == t`` for every canonical ``t``.
    """
    parts: list[str] = []
    for block in trace.blocks:
        plans = "".join(f"<plan>{_labelled(i, p.text)}</plan>\n" for i, p in enumerate(block.plans, 1))
        parts.append(f"<guideline>\n{plans}</guideline>{GUIDELINE_SEPARATOR}")
        for i, step in enumerate(block.steps, 1):
            parts.append(f"{step_open(i)}{' ' + step.text if step.text else ''}\n</step>{STEP_SEPARATOR}")
        parts.append(f"{TAKEAWAY_OPEN}\n{block.takeaway}\n</takeaway>\n")
    parts.append(trace.final)
    return "".join(parts)
