"""The wrap cold start of npr sample: the model's own correct answers as the steps of one trace."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

from npr.data import Problem
from npr.schema import parse, render, validate
from npr.train.config import SampleConfig
from npr.train.sample import select, wrap_trace


def test_wrap_trace_is_canonical_and_valid():
    text = wrap_trace(["3 + 4 is 7.", " Counting up: 4, 5, 6, 7 "], "7")
    assert validate(text) == [] and render(parse(text)) == text
    trace = parse(text)
    assert [s.text for s in trace.blocks[0].steps] == ["3 + 4 is 7.", "Counting up: 4, 5, 6, 7"]
    assert trace.answer == "7" and trace.blocks[0].takeaway == "Both steps give 7."


def _result(prompt_index, sample_index, text, finish="eos"):
    return SimpleNamespace(prompt_index=prompt_index, sample_index=sample_index, text=text, finish_reason=finish)


def test_select_wraps_problems_with_enough_correct_answers():
    problems = [Problem("a", "2+2?", "4", "test"), Problem("b", "3+3?", "6", "test")]
    results = [
        _result(0, 0, "2 plus 2 is 4"),
        _result(0, 1, "wrong: 5"),
        _result(0, 2, "so it is 4"),
        _result(0, 3, "four, 4"),
        _result(1, 0, "6 it is"),
        _result(1, 1, "7"),
    ]
    config = SampleConfig(model="m", train_data="d", wrap=True, wrap_branches=2, wrap_min_branches=2)
    counts = Counter()
    kept = select(results, problems, 0, config, counts, Counter())
    assert [r["problem_id"] for r in kept] == ["a"]  # b has one correct answer: too few to wrap
    assert kept[0]["tries"] == [0, 2] and validate(kept[0]["response"]) == []
    assert counts["wrong"] == 2 and counts["over_quota"] == 1 and counts["unwrapped"] == 1


def test_min_branches_drops_traces_with_a_one_plan_block():
    one = (
        "<guideline>\n<plan>1: add</plan>\n</guideline>\n<step>\n1: 2+2=4\n</step>\n"
        "<takeaway>\nthe sum is 4\n</takeaway>\nSo \\boxed{4}."
    )
    two = (
        "<guideline>\n<plan>1: add</plan>\n<plan>2: count</plan>\n</guideline>\n<step>\n1: 2+2=4\n</step>\n"
        "<step>\n2: 2, 3, 4\n</step>\n<takeaway>\nboth give 4\n</takeaway>\nSo \\boxed{4}."
    )
    problems = [Problem("a", "2+2?", "4", "test")]
    results = [_result(0, 0, one), _result(0, 1, two)]
    for min_branches, kept_tries, dropped in ((1, [0, 1], 0), (2, [1], 1)):
        counts = Counter()
        config = SampleConfig(model="m", train_data="d", min_branches=min_branches)
        kept = select(results, problems, 0, config, counts, Counter())
        assert [r["try"] for r in kept] == kept_tries and counts["too_few_branches"] == dropped
