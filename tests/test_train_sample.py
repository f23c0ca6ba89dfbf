"""Rejection sampling: which samples are kept, why the others are dropped, what is written."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from npr.data import Problem
from npr.engine import RequestStats, Result
from npr.schema import parse, render, validate
from npr.train.config import ConfigError, SampleConfig
from npr.train.overrides import resolve_config
from npr.train.sample import decomposed_trace, run_sample, select

VALID = (
    "<guideline>\n<plan>1: add the tens</plan>\n<plan>2: add the units</plan>\n</guideline>\n"
    "<step>\n1: 20 + 30 = 50\n</step>\n<step>\n2: 3 + 4 = 7\n</step>\n<takeaway>\n50 + 7 = 57\n</takeaway>\n"
    "The answer is \\boxed{57}."
)
PROBLEMS = [Problem("p0", "What is 23 + 34?", "57", "test"), Problem("p1", "What is 1 + 1?", "2", "test")]


def _result(prompt: int, sample: int, text: str, finish: str = "eos") -> Result:
    stats = RequestStats(
        generated_tokens=3, critical_path_tokens=3, forward_passes=3, wall_time_s=0.0, parallel_blocks=0
    )
    return Result(
        prompt_index=prompt,
        sample_index=sample,
        prompt_ids=[1],
        token_ids=[5, 6, 7],
        position_ids=[1, 2, 3],
        logprobs=[0.0] * 3,
        sampled=[True] * 3,
        text=text,
        finish_reason=finish,
        diagnostic=None,
        mode="plain",
        blocks=[],
        stats=stats,
    )


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
        rows = [
            {
                "id": f"{k}{i}",
                "problem": f"What is {i} - {i if k == 'a' else 0} + {0 if k == 'a' else 5}?",
                "answer": "0" if k == "a" else "5",
            }
            for k in "ab"
            for i in (1, 2)
        ]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = resolve_config(
        "sample",
        SampleConfig,
        "smoke",
        flags={"train_data": str(data), "train_limit": "none", "require_correct": "true", "tries": "3", **flags},
    )
    summary = run_sample(config, tmp_path / name)
    return summary, [json.loads(line) for line in (tmp_path / name / "data.jsonl").read_text().splitlines()]


def test_stop_when_kept_draws_until_the_first_accepted_sample(tmp_path):
    summary, kept = _run(tmp_path, "early", max_kept_per_problem="1", stop_when_kept="true", prompts_per_batch="3")
    # a0, a1: accepted at their first try; b0, b1: wrong 3 times
    assert summary["samples"] == 2 * 1 + 2 * 3 and summary["kept"] == 2
    assert summary["dropped"]["wrong"] == 6 and summary["dropped"]["over_quota"] == 0
    assert summary["problems_with_kept"] == 2
    assert sorted((r["problem_id"], r["try"]) for r in kept) == [("a1", 0), ("a2", 0)]
    again, kept_again = _run(tmp_path, "early2", max_kept_per_problem="1", stop_when_kept="true", prompts_per_batch="3")
    assert kept_again == kept  # reproducible from the seed

    summary_all, kept_all = _run(tmp_path, "all", max_kept_per_problem="1")
    assert summary_all["samples"] == 4 * 3 and summary_all["dropped"]["over_quota"] == 4
    assert [r["problem_id"] for r in kept_all] == ["a1", "a2"] and summary_all["problems_with_kept"] == 2


def test_stop_when_kept_needs_a_quota():
    with pytest.raises(ConfigError, match="stop_when_kept"):
        SampleConfig(model="m", train_data="x", stop_when_kept=True)
    with pytest.raises(ConfigError, match="stop_when_kept"):
        SampleConfig(model="m", train_data="x", stop_when_kept=True, max_kept_per_problem=1, wrap=True)


# -- the decomposing cold start ---------------------------------------------------------------


def test_decomposed_trace_by_hand():
    text = decomposed_trace(["compute 3 + 4", "compute 9 - 5"], ["3 + 4 = 7", "Take 5 from 9: 4"], ["7", "4"])
    assert text == (
        "<guideline>\n<plan>1: compute 3 + 4</plan>\n<plan>2: compute 9 - 5</plan>\n</guideline>\n"
        "<step>\n1: compute 3 + 4\n3 + 4 = 7\n</step>\n<step>\n2: compute 9 - 5\nTake 5 from 9: 4\n</step>\n"
        "<takeaway>\nIn order, the parts give 7 and 4.\n</takeaway>\nThe answer is \\boxed{(7, 4)}."
    )
    assert validate(text) == [] and render(parse(text)) == text


class FakeWorker:
    """Answers each part question with scripted texts, one per try (the model's 'own' answers)."""

    def __init__(self, tokenizer, answers: dict[str, list[str]]):
        self.tokenizer, self.answers, self.calls = tokenizer, answers, []

    def sampling_params(self, n, seed):
        return n

    def generate(self, prompts, first_index, n):
        out = []
        for i, ids in enumerate(prompts):
            question = next(q for q in self.answers if q in self.tokenizer.decode(ids))
            self.calls.append(question)
            for t, text in enumerate(self.answers[question][:n]):
                out.append(_result(first_index + i, t, text, finish="length" if text.endswith("…") else "eos"))
        return out


def test_decompose_wrap_builds_plans_from_the_problem_and_steps_from_own_answers(tiny_llama):
    from npr.train.sample import decompose_wrap

    intro, outro = "Work out each expression on its own: ", ". Give the results in order as a tuple."
    problems = [
        Problem("a", intro + "3 + 4, 9 - 5" + outro, "(7, 4)", "gen:expressions", size=2),
        Problem("b", intro + "9 - 5, 2 + 6, 3 + 4" + outro, "(4, 8, 7)", "gen:expressions", size=3),
        Problem("c", intro + "1 + 1, 3 + 4" + outro, "(2, 7)", "gen:expressions", size=2),
    ]
    worker = FakeWorker(
        tiny_llama[1],
        {
            "What is 3 + 4?": ["3 + 4 = 7", "It is 8", "Adding: 7"],  # two usable answers, one wrong
            "What is 9 - 5?": ["9 - 5 = 4", "9 - 5 = 4 and then some more …"],  # the second hit the budget
            "What is 2 + 6?": ["2 + 6 = 8", "<step> 8"],  # the second carries a tag
            "What is 1 + 1?": ["It is 3", "It is 11"],  # never right: problem c cannot be wrapped
        },
    )
    counts = Counter()
    config = SampleConfig(model="m", train_data="x", wrap=True, wrap_mode="decompose", tries=3, prompts_per_batch=2)
    kept = decompose_wrap(worker, tiny_llama[1], problems, 0, config, counts)
    assert sorted(worker.calls) == sorted(["What is 1 + 1?", "What is 2 + 6?", "What is 3 + 4?", "What is 9 - 5?"])
    assert [r["problem_id"] for r in kept] == ["a", "b"]
    a, b = (parse(r["response"]) for r in kept)
    assert [p.text for p in a.blocks[0].plans] == ["compute 3 + 4", "compute 9 - 5"]
    # problem 0: the first usable answers, each under its restated plan
    assert [s.text for s in a.blocks[0].steps] == ["compute 3 + 4\n3 + 4 = 7", "compute 9 - 5\n9 - 5 = 4"]
    assert [p.text for p in b.blocks[0].plans] == ["compute 9 - 5", "compute 2 + 6", "compute 3 + 4"]
    # problem 1 cycles within the shorter half of each part's usable answers: 3 + 4 has two usable answers, the
    # shorter half is the first (a tie in length keeps their order), so it is used again
    assert [s.text.split("\n")[1] for s in b.blocks[0].steps] == ["9 - 5 = 4", "2 + 6 = 8", "3 + 4 = 7"]
    assert b.answer == "(4, 8, 7)" and "8 and 7" in b.blocks[0].takeaway
    assert all(validate(r["response"]) == [] for r in kept)
    # 3 + 2 + 2 + 2 = 9 part answers drawn; correct: 2 + 2 + 2 + 0 (the truncated one and the tagged one are correct
    # but not usable: truncated, and wrong for carrying a tag, with the two wrong ones of 3 + 4 and 1 + 1)
    assert counts["samples"] == 9 and counts["correct"] == 6
    assert (counts["truncated"], counts["wrong"], counts["unwrapped"], counts["traces"]) == (1, 4, 1, 2)


def test_shorter_half_by_hand():
    from npr.train.sample import shorter_half

    assert shorter_half(["ccc", "a", "bb", "dddd", "e"]) == ["a", "e", "bb"]  # 5 -> 3, ties keep their order
    assert shorter_half(["long answer", "short"]) == ["short"]
    assert shorter_half(["only"]) == ["only"]


def test_decompose_wrap_refuses_problems_without_parts(tiny_llama):
    from npr.data import DataError
    from npr.train.sample import decompose_wrap

    config = SampleConfig(model="m", train_data="x", wrap=True, wrap_mode="decompose")
    with pytest.raises(DataError, match="does not split into parts"):
        decompose_wrap(FakeWorker(tiny_llama[1], {}), tiny_llama[1], PROBLEMS, 0, config, Counter())


def test_decompose_mode_needs_wrap():
    from npr.errors import NprError

    with pytest.raises(NprError, match="wrap_mode"):
        SampleConfig(model="m", train_data="x", wrap_mode="decompose")
