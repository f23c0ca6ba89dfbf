"""The tree of a parallel trace: blocks of plans, steps and a takeaway, then the final text.

Every element keeps the character span it came from (``start`` inclusive, ``end`` exclusive,
offsets into the text that was parsed), so a viewer or an error message can point at it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Span:
    start: int
    end: int


@dataclass(frozen=True)
class Plan:
    """One ``<plan>k: text</plan>``; ``label`` is k (None when the plan has no ``k:`` label)."""

    label: int | None
    text: str
    span: Span


@dataclass(frozen=True)
class Step:
    """One ``<step>k: text</step>``, the execution of the plan with the same index."""

    label: int | None
    text: str
    span: Span


@dataclass(frozen=True)
class Block:
    """``<guideline>`` plans ``</guideline>``, one step per plan, ``<takeaway>``.

    ``preamble`` is the text between the previous block (or the start) and this block's
    guideline. It is empty in a valid NPR trace; the Multiverse converter keeps that
    format's sequential text there.
    """

    plans: tuple[Plan, ...]
    steps: tuple[Step, ...]
    takeaway: str
    span: Span
    preamble: str = ""
    takeaway_span: Span | None = None


@dataclass(frozen=True)
class ParallelTrace:
    """A parsed response: zero or more blocks, then the final text with the answer.

    ``source_format`` says which format the trace was read from: ``"npr"``,
    ``"multiverse"`` or ``"parallel-r1"``.
    """

    blocks: tuple[Block, ...]
    final: str
    answer: str | None
    final_span: Span
    source_format: str = "npr"
    errors: tuple = field(default=(), compare=False)

    @property
    def prefix(self) -> str:
        """Text before the first block (empty in a valid trace)."""
        return self.blocks[0].preamble if self.blocks else ""

    @property
    def num_branches(self) -> list[int]:
        """Steps per block: the branching factor of each parallel block."""
        return [len(b.steps) for b in self.blocks]

    def to_dict(self) -> dict:
        """A JSON-ready view (used by samples.jsonl and the trajectory viewer)."""
        return {
            "source_format": self.source_format,
            "blocks": [
                {
                    "preamble": b.preamble,
                    "plans": [{"label": p.label, "text": p.text} for p in b.plans],
                    "steps": [{"label": s.label, "text": s.text} for s in b.steps],
                    "takeaway": b.takeaway,
                }
                for b in self.blocks
            ],
            "final": self.final,
            "answer": self.answer,
        }
