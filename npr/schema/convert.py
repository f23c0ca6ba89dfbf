"""Read-only converters from other parallel-reasoning formats into ``ParallelTrace``.

So that traces of NPR, Multiverse and Parallel-R1 can be compared by one metric (trigger
rate, branches per block) and shown in one viewer.

- Multiverse: ``<Parallel><Goal>…<Outline>k: …</Outline>…</Goal><Path>k: …</Path>…
  <Conclusion>…</Conclusion></Parallel>``; the sequential text between blocks becomes
  each block's ``preamble``.
- Parallel-R1: ``<Parallel><Path>…</Path>…</Parallel><Summary>…</Summary>`` (a
  ``<Summary>`` inside ``<Parallel>`` is read too). It has no plans, so blocks have none.
"""

from __future__ import annotations

import re

from npr.schema.answer import find_boxed
from npr.schema.parse import _split_label
from npr.schema.trace import Block, ParallelTrace, Plan, Span, Step

_PARALLEL_RE = re.compile(r"<Parallel>(.*?)</Parallel>", re.S)


def _elements(name: str, text: str, offset: int) -> list[tuple[str, Span]]:
    return [
        (m.group(1), Span(offset + m.start(), offset + m.end()))
        for m in re.finditer(rf"<{name}>(.*?)</{name}>", text, re.S)
    ]


def _read(text: str, fmt: str, plan_tag: str | None, summary_tag: str) -> ParallelTrace:
    blocks, cursor = [], 0
    for m in _PARALLEL_RE.finditer(text):
        body, body_start, end = m.group(1), m.start(1), m.end()
        summary = _elements(summary_tag, body, body_start)
        if not summary:  # Parallel-R1 writes the summary right after </Parallel>
            after = re.match(rf"\s*<{summary_tag}>(.*?)</{summary_tag}>", text[end:], re.S)
            if after:
                summary = [(after.group(1), Span(end + after.start(), end + after.end()))]
                end += after.end()
        plans = (
            tuple(Plan(*_split_label(c), span=s) for c, s in _elements(plan_tag, body, body_start)) if plan_tag else ()
        )
        steps = tuple(Step(*_split_label(c), span=s) for c, s in _elements("Path", body, body_start))
        blocks.append(
            Block(
                plans=plans,
                steps=steps,
                takeaway=summary[-1][0].strip() if summary else "",
                span=Span(m.start(), end),
                preamble=text[cursor : m.start()].strip(),
                takeaway_span=summary[-1][1] if summary else None,
            )
        )
        cursor = end
    final = text[cursor:]
    return ParallelTrace(
        blocks=tuple(blocks),
        final=final.strip(),
        answer=find_boxed(final),
        final_span=Span(cursor, len(text)),
        source_format=fmt,
    )


def from_multiverse(text: str) -> ParallelTrace:
    """A Multiverse trace (``<Parallel><Goal><Outline>…<Path>…<Conclusion>``) as a ParallelTrace."""
    return _read(text, "multiverse", "Outline", "Conclusion")


def from_parallel_r1(text: str) -> ParallelTrace:
    """A Parallel-R1 trace (``<Parallel><Path>…</Path></Parallel><Summary>``) as a ParallelTrace."""
    return _read(text, "parallel-r1", None, "Summary")


def detect_format(text: str) -> str:
    """``"npr"``, ``"multiverse"`` or ``"parallel-r1"``, by the tags the text uses."""
    if "<guideline>" in text:
        return "npr"
    if "<Outline>" in text or "<Goal>" in text or "<Conclusion>" in text:
        return "multiverse"
    if "<Parallel>" in text or "<Path>" in text:
        return "parallel-r1"
    return "npr"
