"""npr.data.generated: the decomposable task of the tiny pipeline, its spec and its parts."""

from __future__ import annotations

import pytest

from npr.data import DataError, Problem, UnknownSpecError, load_problems
from npr.data.generated import SubProblem, decompose, load_generated_spec
from npr.rewards import is_correct

SPEC = "gen:expressions?size=40&seed=1&parts=2-4"


def test_problems_are_reproducible_sized_and_answerable():
    problems = load_problems(SPEC)
    assert problems == load_generated_spec(SPEC) and len(problems) == 40
    assert {p.size for p in problems} == {2, 3, 4}
    assert problems[0].id == "expressions-s1-0" and problems[0].source == SPEC
    for p in problems:
        parts = decompose(p)
        assert len(parts) == p.size
        assert len({s.expression for s in parts}) == p.size and len({s.answer for s in parts}) == p.size
        assert p.answer == "(" + ", ".join(s.answer for s in parts) + ")"
        for s in parts:
            a, op, b = s.expression.split()
            assert (
                0 <= int(a) <= 9
                and 0 <= int(b) <= 9
                and int(s.answer) == (int(a) + int(b) if op == "+" else int(a) - int(b))
            )
            assert int(s.answer) >= 0  # no negative results unless negatives=1
    other = load_problems("gen:expressions?size=40&seed=2&parts=2-4")
    assert [p.problem for p in other] != [p.problem for p in problems]  # the held-out split differs
    assert load_problems(SPEC, limit=3) == problems[:3]


def test_hand_example_and_grading():
    problem = Problem(
        "x",
        "Work out each expression on its own: 3 + 4, 9 - 5, 2 + 6. Give the results in order as a tuple.",
        "(7, 4, 8)",
        "gen:expressions",
        size=3,
    )
    assert decompose(problem) == [SubProblem("3 + 4", "7"), SubProblem("9 - 5", "4"), SubProblem("2 + 6", "8")]
    assert decompose(problem)[0].plan == "compute 3 + 4" and decompose(problem)[1].question == "What is 9 - 5?"
    assert is_correct("so \\boxed{(7, 4, 8)}", problem) and is_correct("\\boxed{7, 4, 8}", problem)
    assert not is_correct("\\boxed{(4, 7, 8)}", problem)  # order matters
    assert not is_correct("\\boxed{(7, 4)}", problem) and not is_correct("8", problem)


def test_parameters():
    fixed = load_problems("gen:expressions?size=10&seed=0&parts=3&ops=%2B&max_operand=5")
    assert all(p.size == 3 and "-" not in p.problem.split(":")[1] for p in fixed)
    signed = load_problems("gen:expressions?size=40&seed=0&ops=-&negatives=1")
    assert any(int(s.answer) < 0 for p in signed for s in decompose(p))


@pytest.mark.parametrize(
    "spec, words",
    [
        ("gen:sums?size=3", "unknown generated task"),
        ("gen:expressions?size=3&colour=red", "no parameter 'colour'"),
        ("gen:expressions?size=0", "size must be >= 1"),
        ("gen:expressions?parts=1-7", "max_parts <= 5"),
        ("gen:expressions?parts=x", "parts must be an integer"),
        ("gen:expressions?ops=*", "ops must be made of"),
        ("gen:expressions?negatives=2", "negatives must be 0 or 1"),
        ("gen:expressions?max_operand=1&parts=4&ops=%2B", "distinct results do not exist"),
    ],
)
def test_bad_specs_are_clear_errors(spec, words):
    with pytest.raises((DataError, UnknownSpecError), match=words):
        load_problems(spec)


def test_decompose_refuses_a_problem_without_parts():
    with pytest.raises(DataError, match="does not split into parts"):
        decompose(Problem("c", "What is 3 + 4?", "7", "rg:chain_sum"))
