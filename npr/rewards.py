"""Rewards: pure functions of a response text and its ``Problem``; they never print.

NPR's rewards (arXiv 2512.07461): Stage 1 adds the format signal to accuracy, so a response
whose format is invalid gets its format penalty in [-2, 0) and a valid one gets +1 / -1 for a
correct / wrong final answer (``stage1_reward``); later stages use ``accuracy_reward``.

The final answer is the content of the last balanced ``\\boxed{}`` (``npr.schema.extract_answer``);
a response without one falls back to its last number, as NPR's released reward does
(``extract_answer(..., use_last_number=True)``), so a base model that answers in words is graded
fairly. The format reward, not the grader, insists on the box. Math answers are compared with
math-verify; procedural (reasoning-gym) problems with reasoning-gym's own scorer for their task.

Thread safety: math-verify's timeouts use ``signal.alarm``, which raises outside the main
thread, so both timeouts are disabled here and the functions can run in a thread pool. To keep
a comparison from running forever without that timeout, a predicted answer whose exact value
would have an astronomical number of digits (a power tower, a huge factorial) is judged wrong
before sympy sees it; see ``is_unbounded``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import sympy
from math_verify import parse as mv_parse
from math_verify import verify as mv_verify

from npr.data.problems import Problem
from npr.schema import extract_answer, format_score

# Largest |exponent| and factorial argument a predicted answer may hold: beyond them sympy's
# exact arithmetic (e.g. 9^{9^9}, (10^{10})!) does not finish. Competition answers stay far below.
MAX_EXPONENT = 100_000
MAX_FACTORIAL = 10_000

# Exceptions sympy's numeric evaluation raises on expressions it cannot bound.
_EVALF_ERRORS = (ArithmeticError, NotImplementedError, TypeError, ValueError)

Reward = Callable[[str, Problem], float]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def final_answer(response: str) -> str | None:
    """The graded answer of a response: its last balanced ``\\boxed{}``, else its last number
    (NPR's fallback), else None. An empty box is no answer."""
    boxed = extract_answer(response)
    if boxed is not None:
        return boxed or None
    numbers = _NUMBER.findall(response)
    return numbers[-1].replace(",", "") if numbers else None


# ---------------------------------------------------------------- math answers


def _as_boxed(latex: str) -> str:
    """``latex`` wrapped in ``\\boxed{}`` (math-verify extracts a boxed answer first), dropping
    surrounding ``$``; an answer that is already boxed is passed as it is."""
    latex = latex.strip()
    if len(latex) > 1 and latex.startswith("$") and latex.endswith("$") and not latex.endswith("\\$"):
        latex = latex.strip("$").strip()
    return latex if "\\boxed{" in latex else f"\\boxed{{{latex}}}"


def _parse(latex: str) -> list[Any]:
    """math-verify parse without its signal-based timeout. With ``raise_on_error=False``
    math-verify turns every parsing exception into ``[]``, and with the timeout off it raises
    neither ``TimeoutException`` nor its main-thread ``ValueError``: nothing to catch here."""
    return mv_parse(_as_boxed(latex), parsing_timeout=None, raise_on_error=False)


def is_unbounded(parsed: list[Any]) -> bool:
    """True when a parsed answer holds a power with |exponent| > ``MAX_EXPONENT`` or a
    factorial of more than ``MAX_FACTORIAL``, or such a quantity that sympy cannot bound."""
    for item in parsed:
        if not isinstance(item, (sympy.Basic, sympy.MatrixBase)):
            continue
        for node in sympy.preorder_traversal(item):
            if isinstance(node, sympy.Pow):
                argument, limit = node.exp, MAX_EXPONENT
            elif isinstance(node, (sympy.factorial, sympy.factorial2, sympy.subfactorial)):
                argument, limit = node.args[0], MAX_FACTORIAL
            else:
                continue
            if not argument.is_number:
                continue
            try:
                magnitude = sympy.N(abs(argument), 5)
                if magnitude.is_extended_real and magnitude > limit:
                    return True
            except _EVALF_ERRORS:
                return True
    return False


def answers_match(predicted: str, gold: str) -> bool:
    """Whether the answer ``predicted`` equals the reference ``gold`` by math-verify.

    Both are LaTeX or plain text (``57``, ``\\frac{1}{2}``, ``0.5``, ``(1, 2)``); equal strings
    match without parsing. Either side failing ``is_unbounded`` matches only by string.
    Raises ValueError for an empty gold answer (a dataset bug).
    """
    if not gold.strip():
        raise ValueError("the reference answer is empty; fix the problem's 'answer' field in the dataset")
    if predicted.strip() == gold.strip():
        return True
    parsed_pred = _parse(predicted)
    if not parsed_pred or is_unbounded(parsed_pred):
        return False
    parsed_gold = _parse(gold)
    if is_unbounded(parsed_gold):  # only its exact string can match it safely
        return False
    return mv_verify(parsed_gold, parsed_pred, timeout_seconds=None, raise_on_error=False)


def math_correct(response: str, answer: str) -> bool:
    """Whether the final answer of ``response`` (``final_answer``) equals ``answer`` by
    math-verify. An empty box is not correct. Safe to call from threads.
    """
    predicted = final_answer(response)
    return bool(predicted) and answers_match(predicted, answer)


# ---------------------------------------------------------------- reasoning-gym answers


@functools.cache
def _rg_scorer(task: str) -> Callable[[str | None, dict[str, Any]], float]:
    """reasoning-gym's ``score_answer`` for ``task``, built once per task."""
    from npr.extras import require

    reasoning_gym = require("reasoning_gym", "gym")  # lazily: it takes most of a second; math-only runs never need it

    try:
        return reasoning_gym.get_score_answer_fn(task)
    except ValueError as err:
        raise ValueError(
            f"reasoning-gym has no task {task!r} ({err}); check the problem's source "
            "('rg:<task>') or rg_entry['metadata']['source_dataset']"
        ) from err


def rg_score(response: str, problem: Problem) -> float:
    """reasoning-gym's score in [0, 1] of the final answer of ``response`` for ``problem``.

    The string scored is ``final_answer(response)``: the last balanced ``\\boxed{}``, else the
    last number; none scores 0. ``problem.rg_entry`` must be set.
    """
    if problem.rg_entry is None or problem.rg_task is None:
        raise ValueError(
            f"problem {problem.id!r} from {problem.source!r} has no reasoning-gym entry; score it with math_correct"
        )
    predicted = final_answer(response)
    if not predicted:
        return 0.0
    return float(_rg_scorer(problem.rg_task)(predicted, problem.rg_entry))


# ---------------------------------------------------------------- rewards

# name -> reward, filled by @register_reward; a config's ``reward`` field names one (npr.train.config)
REWARDS: dict[str, Reward] = {}


def register_reward(name: str) -> Callable[[Reward], Reward]:
    """Decorator adding a pure ``(response, problem) -> float`` reward to ``REWARDS`` as ``name``."""

    def register(reward: Reward) -> Reward:
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is already registered ({REWARDS[name].__qualname__})")
        REWARDS[name] = reward
        return reward

    return register


def is_correct(response: str, problem: Problem) -> bool:
    """Whether ``response`` answers ``problem``: reasoning-gym's scorer at full credit (>= 1.0;
    partial credit such as 0.3 for ``"153 apples"`` counts as wrong) for a procedural problem,
    math-verify against ``problem.answer`` otherwise."""
    if problem.rg_entry is not None:
        return rg_score(response, problem) >= 1.0
    if problem.grader is not None:
        return _benchmark_correct(response, problem)
    return math_correct(response, problem.answer)


def _benchmark_correct(response: str, problem: Problem) -> bool:
    """ZebraLogic's own grading (``npr.data.zebralogic``): the boxed letter, or every cell of the grid."""
    from npr.data import zebralogic

    if problem.grader == zebralogic.CHOICE:
        return zebralogic.choice_correct(final_answer(response), problem.answer)
    if problem.grader == zebralogic.GRID:
        right, total = zebralogic.grid_cells(response, problem.answer)
        return right == total > 0
    raise ValueError(f"problem {problem.id}: unknown grader {problem.grader!r}")


@register_reward("accuracy")
def accuracy_reward(response: str, problem: Problem) -> float:
    """NPR's accuracy reward: +1.0 correct, -1.0 wrong, 0.0 for an empty (whitespace) response."""
    if not response.strip():
        return 0.0
    return 1.0 if is_correct(response, problem) else -1.0


@register_reward("stage1")
def stage1_reward(response: str, problem: Problem) -> float:
    """NPR Stage-1 (NPR-Zero) reward, arXiv 2512.07461 §3.1: the format penalty in [-2, 0)
    (``npr.schema.format_score``) when the format is invalid, else ``accuracy_reward``."""
    penalty = format_score(response)
    return penalty if penalty < 0 else accuracy_reward(response, problem)


def get_reward(name: str) -> Reward:
    """The reward registered as ``name``; ValueError listing the names otherwise."""
    try:
        return REWARDS[name]
    except KeyError:
        raise ValueError(f"unknown reward {name!r}; choose one of {sorted(REWARDS)}") from None
