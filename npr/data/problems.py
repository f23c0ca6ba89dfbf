"""The unit of every dataset in npr: one problem with its reference answer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Problem:
    """One problem.

    ``id`` is unique within its source; ``answer`` is the reference final answer (LaTeX allowed,
    graded by math-verify) ; ``source`` names where it came from (a benchmark name such as
    ``math500``, a reasoning-gym spec such as ``rg:chain_sum``, or a file path); ``rg_entry`` is
    the reasoning-gym dataset entry (``question``, ``answer``, ``metadata``) when the problem is
    procedural, so that reasoning-gym's own scorer grades it; ``location`` says where it was read
    (``file.jsonl:LINE``, a reasoning-gym spec with its index, a hub dataset row), for messages. ``size`` is the
    number of independent sub-problems of a decomposable generated problem (``npr.data.generated``), None
    elsewhere; the evaluation correlates it with the branches the model opens. ``grader`` names a
    benchmark's own grading when math-verify is not it (``zebralogic-choice``, ``zebralogic-grid``:
    ``npr.data.zebralogic``); None grades with math-verify or reasoning-gym.
    """

    id: str
    problem: str
    answer: str
    source: str
    rg_entry: dict[str, Any] | None = field(default=None, compare=False, repr=False)
    location: str | None = field(default=None, compare=False, repr=False)
    size: int | None = None
    grader: str | None = None

    @property
    def rg_task(self) -> str | None:
        """The reasoning-gym task name (e.g. ``chain_sum``), or None for a math problem."""
        if self.rg_entry is None:
            return None
        return self.rg_entry.get("metadata", {}).get("source_dataset") or self.source.removeprefix("rg:").split("?")[0]
