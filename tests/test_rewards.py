"""npr.rewards: hand examples for math-verify and reasoning-gym grading, NPR's rewards, threads."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import reasoning_gym

from npr.data.problems import Problem
from npr.rewards import (
    REWARDS,
    accuracy_reward,
    answers_match,
    get_reward,
    is_correct,
    math_correct,
    rg_score,
    stage1_reward,
)
from npr.schema import format_score

VALID_BLOCK = "<guideline><plan>1: abc</plan></guideline><step>1: abcdef</step><takeaway>abcdef</takeaway>"


def math_problem(answer: str) -> Problem:
    return Problem(id="p0", problem="?", answer=answer, source="test")


@pytest.fixture(scope="module")
def chain_sum() -> list[Problem]:
    entries = list(reasoning_gym.create_dataset("chain_sum", size=3, seed=7, min_terms=2, max_terms=2))
    return [
        Problem(id=str(i), problem=e["question"], answer=e["answer"], source="rg:chain_sum", rg_entry=e)
        for i, e in enumerate(entries)
    ]


# ---------------------------------------------------------------- math


@pytest.mark.parametrize(
    "response, answer, correct",
    [
        ("so the answer is \\boxed{\\frac{1}{2}}.", "0.5", True),
        ("\\boxed{0.5}", "\\frac{1}{2}", True),
        ("\\boxed{\\dfrac12}", "$\\frac{1}{2}$", True),
        ("\\boxed{57}", "57", True),
        ("\\boxed{56}", "57", False),
        ("first \\boxed{57} then \\boxed{58}", "57", False),  # the last box counts
        ("\\boxed{3\\sqrt{2}}", "\\sqrt{18}", True),
        ("\\boxed{\\{2, 1\\}}", "\\{1,2\\}", True),
        ("\\boxed{1,000}", "1000", True),
        ("\\boxed{x}", "y", False),
        ("The answer is 57.", "57", True),  # no box: the last number (NPR's fallback)
        ("57 is not it, the answer is 58.", "57", False),  # no box: only the last number counts
        ("\\boxed{}", "57", False),  # empty box
        ("\\boxed{57", "57", True),  # unbalanced box: no box, the last number is 57
        ("\\boxed{5", "57", False),
        ("\\boxed{\\text{yes}}", "\\text{yes}", True),
    ],
)
def test_math_correct(response, answer, correct):
    assert math_correct(response, answer) is correct


def test_power_towers_are_wrong_without_reaching_sympy():
    # sympy never finishes comparing 9^{9^9} with 5; a daemon thread turns a hang into a failure
    results = []
    worker = threading.Thread(
        target=lambda: results.extend(
            [
                math_correct("\\boxed{9^{9^{9}}}", "5"),
                math_correct("\\boxed{(10^{10})!}", "5"),
                math_correct("\\boxed{10^{10^{10}}}", "10^{10^{10}}"),
                math_correct("\\boxed{2^{2024}}", "2^{2024}"),
                math_correct("\\boxed{2^{10}}", "1024"),
                math_correct("\\boxed{5}", "10^{10^{10}}"),
            ]
        ),
        daemon=True,
    )
    worker.start()
    worker.join(timeout=120)
    assert results == [False, False, True, True, True, False]  # equal strings still match


def test_empty_reference_answer_is_a_data_error():
    with pytest.raises(ValueError, match="reference answer is empty"):
        answers_match("1", "  ")


def test_math_grading_is_thread_safe():
    cases = [
        ("\\boxed{\\frac{1}{2}}", "0.5", True),
        ("\\boxed{57}", "57", True),
        ("\\boxed{56}", "57", False),
        ("\\boxed{x^2+1}", "1+x^2", True),
        ("\\boxed{(1,2)}", "(1, 2)", True),
        ("no answer", "3", False),
    ] * 8
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda c: math_correct(c[0], c[1]), cases))
    assert results == [c[2] for c in cases]


# ---------------------------------------------------------------- reasoning-gym


def test_chain_sum_scored_by_reasoning_gym(chain_sum):
    p = chain_sum[0]
    assert p.rg_entry["question"].endswith("60 + 93 =") and p.rg_task == "chain_sum"
    assert rg_score("\\boxed{153}", p) == 1.0
    assert is_correct("60 + 93 = \\boxed{153}", p)
    assert is_correct("\\boxed{ +0153.00 }", p)  # reasoning-gym's decimal tolerance
    assert not is_correct("\\boxed{154}", p)
    assert is_correct("the sum is 153", p)  # no box: the last number is graded (NPR's fallback)
    assert not is_correct("153 is wrong, it is 154", p)
    assert rg_score("the sum is 153", p) == 1.0
    assert rg_score("no number here", p) == 0.0


def test_partial_credit_counts_as_wrong(chain_sum):
    p = chain_sum[0]
    # reasoning-gym gives len("153") / len("153 apples") = 0.3 for a response that contains the answer
    assert rg_score("\\boxed{153 apples}", p) == pytest.approx(0.3)
    assert not is_correct("\\boxed{153 apples}", p)
    assert accuracy_reward("\\boxed{153 apples}", p) == -1.0


def test_rg_score_needs_an_entry_and_a_known_task():
    with pytest.raises(ValueError, match="no reasoning-gym entry"):
        rg_score("\\boxed{1}", math_problem("1"))
    bogus = Problem(
        id="x",
        problem="?",
        answer="1",
        source="rg:no_such_task",
        rg_entry={"question": "?", "answer": "1", "metadata": {}},
    )
    with pytest.raises(ValueError, match="no task 'no_such_task'"):
        rg_score("\\boxed{1}", bogus)


def test_rg_grading_is_thread_safe(chain_sum):
    cases = [(f"\\boxed{{{p.answer}}}", p, True) for p in chain_sum] + [("\\boxed{0}", p, False) for p in chain_sum]
    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(lambda c: is_correct(c[0], c[1]), cases * 4))
    assert results == [c[2] for c in cases] * 4


# ---------------------------------------------------------------- rewards


def test_accuracy_reward():
    p = math_problem("57")
    assert accuracy_reward("\\boxed{57}", p) == 1.0
    assert accuracy_reward("\\boxed{58}", p) == -1.0
    assert accuracy_reward("57", p) == 1.0  # no box: the last number
    assert accuracy_reward("so 58", p) == -1.0
    assert accuracy_reward("", p) == 0.0
    assert accuracy_reward(" \n\t", p) == 0.0


def test_stage1_reward_is_format_penalty_then_accuracy():
    p = math_problem("1")
    # valid format: accuracy decides
    assert format_score(VALID_BLOCK + "\\boxed{1}") == 0.0
    assert stage1_reward(VALID_BLOCK + "\\boxed{1}", p) == 1.0
    assert stage1_reward(VALID_BLOCK + "\\boxed{2}", p) == -1.0
    # invalid format: the penalty, even with a correct answer
    assert stage1_reward("\\boxed{1}", p) == pytest.approx(-1.5)  # no block
    assert stage1_reward(VALID_BLOCK.replace("abcdef</takeaway>", "ok</takeaway>") + "\\boxed{1}", p) == pytest.approx(
        -0.4
    )
    assert stage1_reward(VALID_BLOCK, p) == pytest.approx(-1.0)  # missing answer
    # an empty response: no block, a stop violation (-1.5) that ends the scoring before the
    # missing answer would add its own -1.0; the same as a correct answer without a block
    assert stage1_reward("", p) == pytest.approx(-1.5)
    assert stage1_reward("", p) == stage1_reward("\\boxed{1}", p)
    assert stage1_reward("", p) < stage1_reward(VALID_BLOCK + "\\boxed{2}", p)  # any valid format beats none


def test_reward_registry():
    assert get_reward("stage1") is stage1_reward and get_reward("accuracy") is accuracy_reward
    assert set(REWARDS) == {"accuracy", "stage1"}
    with pytest.raises(ValueError, match="'accuracy', 'stage1'"):
        get_reward("format")
