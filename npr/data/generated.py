"""Problems that npr generates itself: tasks that split into independent sub-problems.

Spec: ``gen:<task>?size=N&seed=S&<param>=<value>&…``, e.g.
``gen:expressions?size=256&seed=1&parts=2-4``. The same spec always gives the same problems;
a training split and a held-out split differ by ``seed``.

Task ``expressions``: work out 2–4 small expressions (``a + b`` or ``a - b``, one-digit
operands and non-negative results by default), each on its own, and give the results in order
as a tuple::

    Work out each expression on its own: 3 + 4, 9 - 5, 2 + 6. Give the results in order as a tuple.
    answer: (7, 4, 8)

The parts are independent (none needs another's result), so a parallel reasoner can give each
its own branch; the number of parts varies from problem to problem and is the problem's
``size``. Within a problem the expressions, and their results, are distinct (so two branches
that agree have duplicated work rather than met by chance). The answer is graded by
math-verify as an ordered tuple: ``(4, 7, 8)`` does not match ``(7, 4, 8)``.

Why a tuple and not, say, the sum of the parts: SmolLM2-135M (the embedded tiny model) adds
two two-digit numbers correctly 7 % of the time and three 0 % (docs/results.md), so a final
sum would make every answer wrong whatever the branches did; listing the results keeps the
combining step within its reach.

``decompose(problem)`` reads a problem's parts back from its text: the plans of the
decomposing cold start (``npr sample --wrap --wrap-mode decompose``) come from it.

Parameters of ``expressions``: ``size`` (default 100), ``seed`` (default 0), ``min_parts`` /
``max_parts`` (default 2 / 4; ``parts=3`` sets both, ``parts=2-4`` sets the range),
``max_operand`` (default 9), ``ops`` (default ``+-``; any of ``+``, ``-``), ``negatives``
(default 0; 1 lets ``a - b`` go below zero: SmolLM2-135M answered 0 of 48 such parts correctly,
against 30 % of additions and 21 % of non-negative differences, so the tiny task leaves them out).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

from npr.data.errors import DataError, UnknownSpecError
from npr.data.problems import Problem

PREFIX = "gen:"
TASKS = ("expressions",)
_DEFAULTS = {"size": 100, "seed": 0, "min_parts": 2, "max_parts": 4, "max_operand": 9, "ops": "+-", "negatives": 0}
_INTRO = "Work out each expression on its own: "
_OUTRO = ". Give the results in order as a tuple."
_EXPRESSION = re.compile(r"^(\d+) ([+-]) (\d+)$")


@dataclass(frozen=True)
class SubProblem:
    """One independent part of a problem: what its plan says, how to ask it alone, its answer."""

    expression: str  # "3 + 4"
    answer: str  # "7"

    @property
    def plan(self) -> str:
        """The plan that names this part, e.g. ``compute 3 + 4``."""
        return f"compute {self.expression}"

    @property
    def question(self) -> str:
        """The part asked on its own (the cold start samples the model on it)."""
        return f"What is {self.expression}?"


def _parse_params(spec: str) -> tuple[str, dict]:
    parts = urlsplit(spec.strip().removeprefix(PREFIX))
    task = parts.path.strip()
    if task not in TASKS:
        raise UnknownSpecError(
            f"{spec!r}: unknown generated task {task!r}; valid: {', '.join(TASKS)} "
            f"(e.g. gen:expressions?size=64&seed=1&parts=2-4)"
        )
    params = dict(_DEFAULTS)
    try:
        pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError as e:
        raise DataError(f"{spec!r}: bad query {parts.query!r} ({e}); write key=value pairs joined by &") from e
    for key, value in pairs:
        if key == "parts":
            low, _, high = value.partition("-")
            params["min_parts"], params["max_parts"] = _int(spec, key, low), _int(spec, key, high or low)
        elif key == "ops":
            params["ops"] = value
        elif key in _DEFAULTS:
            params[key] = _int(spec, key, value)
        else:
            raise UnknownSpecError(
                f"{spec!r}: {task} has no parameter {key!r}; valid: parts (2-4 or 3), {', '.join(_DEFAULTS)}"
            )
    _check(spec, params)
    return task, params


def _int(spec: str, key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DataError(f"{spec!r}: {key} must be an integer, got {value!r}") from None


def _check(spec: str, p: dict) -> None:
    if p["size"] < 1 or p["seed"] < 0:
        raise DataError(f"{spec!r}: size must be >= 1 and seed >= 0, got size={p['size']}, seed={p['seed']}")
    if not 1 <= p["min_parts"] <= p["max_parts"] <= 5:
        raise DataError(
            f"{spec!r}: need 1 <= min_parts <= max_parts <= 5 (NPR's most plans per guideline), "
            f"got {p['min_parts']}-{p['max_parts']}"
        )
    if not 1 <= p["max_operand"] <= 999:
        raise DataError(f"{spec!r}: max_operand must lie in [1, 999], got {p['max_operand']}")
    if p["negatives"] not in (0, 1):
        raise DataError(f"{spec!r}: negatives must be 0 or 1, got {p['negatives']}")
    if not p["ops"] or set(p["ops"]) - set("+-"):
        raise DataError(f"{spec!r}: ops must be made of + and -, got {p['ops']!r}")
    m = p["max_operand"]
    results = {a + b for a in range(m + 1) for b in range(m + 1)} if "+" in p["ops"] else set()
    results |= (
        {a - b for a in range(m + 1) for b in range(m + 1) if p["negatives"] or a >= b} if "-" in p["ops"] else set()
    )
    if p["max_parts"] > len(results):
        raise DataError(
            f"{spec!r}: max_parts={p['max_parts']} distinct results do not exist with max_operand={p['max_operand']}"
        )


def expressions_problem(
    rng: random.Random, parts: int, max_operand: int, ops: str, negatives: bool = False
) -> list[SubProblem]:
    """``parts`` distinct expressions with distinct results, drawn from ``rng`` (``a - b`` with a >= b
    unless ``negatives``)."""
    chosen: list[SubProblem] = []
    while len(chosen) < parts:
        a, b, op = rng.randint(0, max_operand), rng.randint(0, max_operand), rng.choice(ops)
        if op == "-" and a < b and not negatives:
            a, b = b, a
        value = a + b if op == "+" else a - b
        if all(s.answer != str(value) for s in chosen):
            chosen.append(SubProblem(f"{a} {op} {b}", str(value)))
    return chosen


def problem_text(parts: list[SubProblem]) -> str:
    return _INTRO + ", ".join(s.expression for s in parts) + _OUTRO


def tuple_answer(answers: list[str]) -> str:
    """The reference answer of a problem whose parts answer ``answers``: ``(7, 4, 8)``."""
    return "(" + ", ".join(answers) + ")"


def load_generated_spec(spec: str, limit: int | None = None) -> list[Problem]:
    """The problems of a ``gen:`` spec (the first ``limit`` only, when given)."""
    spec = spec.strip()
    task, p = _parse_params(spec)
    rng = random.Random(f"{task}:{p['seed']}")  # a string seed: the same problems on every platform
    count = p["size"] if limit is None else min(limit, p["size"])
    problems = []
    for i in range(count):
        parts = expressions_problem(
            rng, rng.randint(p["min_parts"], p["max_parts"]), p["max_operand"], p["ops"], bool(p["negatives"])
        )
        problems.append(
            Problem(
                id=f"{task}-s{p['seed']}-{i}",
                problem=problem_text(parts),
                answer=tuple_answer([s.answer for s in parts]),
                source=spec,
                size=len(parts),
            )
        )
    return problems


def decompose(problem: Problem) -> list[SubProblem]:
    """The independent parts of a generated problem, read back from its text.

    Raises ``DataError`` for a problem that is not from a decomposable ``gen:`` task (the
    decomposing cold start needs one).
    """
    text = problem.problem
    if not (problem.source.startswith(PREFIX) and text.startswith(_INTRO) and text.endswith(_OUTRO)):
        raise DataError(
            f"problem {problem.id!r} ({problem.source}) does not split into parts: the decomposing cold "
            f"start needs a {PREFIX}expressions problem (e.g. --train-data 'gen:expressions?size=64&seed=1')"
        )
    parts = []
    for expression in text[len(_INTRO) : -len(_OUTRO)].split(", "):
        match = _EXPRESSION.match(expression)
        if match is None:
            raise DataError(f"problem {problem.id!r}: cannot read the expression {expression!r}")
        a, op, b = int(match[1]), match[2], int(match[3])
        parts.append(SubProblem(expression, str(a + b if op == "+" else a - b)))
    return parts
