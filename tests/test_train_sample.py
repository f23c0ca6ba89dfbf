"""Rejection sampling: which samples are kept, why the others are dropped, what is written."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from npr.data import Problem
from npr.engine import RequestStats, Result
from npr.schema import render, parse, validate
from npr.train.config import ConfigError, SampleConfig
from npr.train.overrides import resolve_config
from npr.train.sample import run_sample, select

VALID = ("<guideline>\n<plan>1: add the tens</plan>\n<plan>2: add the units</plan>\n</guideline>\n"
         "<step>\n1: 20 + 30 = 50\n</step>\n<step>\n2: 3 + 4 = 7\n</step>\n<takeaway>\n50 + 7 = 57\n</takeaway>\n"
         "The answer is \\boxed{57}.")
PROBLEMS = [Problem("p0", "What is 23 + 34?", "57", "test"), Problem("p1", "What is 1 + 1?", "2", "test")]


def _result(prompt: int, sample: int, text: str, finish: str = "eos") -> Result:
    stats = RequestStats(generated_tokens=3, critical_path_tokens=3, forward_passes=3, wall_time_s=0.0,
                         parallel_blocks=0)
    return Result(prompt_index=prompt, sample_index=sample, prompt_ids=[1], token_ids=[5, 6, 7],
                  position_ids=[1, 2, 3], logprobs=[0.0] * 3, sampled=[True] * 3, text=text, finish_reason=finish,
                  diagnostic=None, mode="plain", blocks=[], stats=stats)


def test_keeps_correct_valid_samples_and_counts_the_rest():
    messy = VALID.replace("<plan>1: add", "  <plan>1:   add").replace("\n<step>\n2:", "\n\n<step>\n2:")
    assert validate(VALID) == [] and validate(messy) == []
    results = [
        _result(0, 0, messy),  # kept, re-rendered canonically
        _result(0, 1, VALID.replace("57}", "58}")),  # valid but wrong
        _result(0, 2, "Just 57. \\boxed{57}"),  # correct but no parallel block
        _result(0, 3, VALID, finish="length"),  # hit the budget
        _result(1, 0, VALID),  # valid but wrong for p1
    ]
    counts, errors = Counter(), Counter()
    config = SampleConfig(model="m", train_data="x")
    kept = select(results, PROBLEMS, 0, config, counts, errors)
    assert [r["id"] for r in kept] == ["p0/try0"]
    record = kept[0]
    assert record["response"] == render(parse(messy)) and validate(record["response"]) == []
    assert record["problem"] == PROBLEMS[0].problem and record["answer"] == "57" and record["try"] == 0
    assert record["reward"] == 1.0 and record["problem_id"] == "p0"
    assert (counts["wrong"], counts["format_invalid"], counts["truncated"], counts["over_quota"]) == (2, 1, 1, 0)
    assert counts["samples"] == 5 and counts["correct"] == 3 and counts["format_valid"] == 4
    assert errors == {"no_block": 1} and counts["problems_with_kept"] == 1


def test_max_kept_per_problem():
    results = [_result(0, i, VALID) for i in range(3)]
    counts = Counter()
    config = SampleConfig(model="m", train_data="x", max_kept_per_problem=2)
    kept = select(results, PROBLEMS, 0, config, counts, Counter())
    assert [r["try"] for r in kept] == [0, 1] and counts["over_quota"] == 1


def test_require_correct_off_keeps_valid_wrong_samples():
    counts = Counter()
    config = SampleConfig(model="m", train_data="x", require_correct=False)
    kept = select([_result(1, 0, VALID)], PROBLEMS, 0, config, counts, Counter())
    assert len(kept) == 1 and kept[0]["reward"] == -1.0


# ----------------------------------------------------------------------------- stop_when_kept (NPR's sampling loop)


def _run(tmp_path, name, **flags):
    data = tmp_path / "problems.jsonl"
    if not data.exists():  # the smoke forcer always answers 0: problems a* are solved, b* never
        rows = [{"id": f"{k}{i}", "problem": f"What is {i} - {i if k == 'a' else 0} + {0 if k == 'a' else 5}?",
                 "answer": "0" if k == "a" else "5"} for k in "ab" for i in (1, 2)]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = resolve_config("sample", SampleConfig, "smoke", flags={"train_data": str(data), "train_limit": "none",
                                                                    "require_correct": "true", "tries": "3", **flags})
    summary = run_sample(config, tmp_path / name)
    return summary, [json.loads(line) for line in (tmp_path / name / "data.jsonl").read_text().splitlines()]


def test_stop_when_kept_draws_until_the_first_accepted_sample(tmp_path):
    summary, kept = _run(tmp_path, "early", max_kept_per_problem="1", stop_when_kept="true", prompts_per_batch="3")
    # a0, a1: accepted at their first try; b0, b1: wrong 3 times
    assert summary["samples"] == 2 * 1 + 2 * 3 and summary["kept"] == 2
    assert summary["dropped"]["wrong"] == 6 and summary["dropped"]["over_quota"] == 0
    assert summary["problems_with_kept"] == 2
    assert sorted((r["problem_id"], r["try"]) for r in kept) == [("a1", 0), ("a2", 0)]
    again, kept_again = _run(tmp_path, "early2", max_kept_per_problem="1", stop_when_kept="true",
                             prompts_per_batch="3")
    assert kept_again == kept  # reproducible from the seed

    summary_all, kept_all = _run(tmp_path, "all", max_kept_per_problem="1")
    assert summary_all["samples"] == 4 * 3 and summary_all["dropped"]["over_quota"] == 4
    assert [r["problem_id"] for r in kept_all] == ["a1", "a2"] and summary_all["problems_with_kept"] == 2


def test_stop_when_kept_needs_a_quota():
    with pytest.raises(ConfigError, match="stop_when_kept"):
        SampleConfig(model="m", train_data="x", stop_when_kept=True)
    with pytest.raises(ConfigError, match="stop_when_kept"):
        SampleConfig(model="m", train_data="x", stop_when_kept=True, max_kept_per_problem=1, wrap=True)
