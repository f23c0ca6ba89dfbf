"""ZebraLogic in both modes, on fixture files in the hub's own field layouts (``WildEval/ZebraLogic``
``mc_mode`` and ``grid_mode`` rows): NPR's multiple-choice prompt and letter grading, ZeroEval's
cell and puzzle accuracy for the grid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from npr.data import load_problems
from npr.data.errors import DataError
from npr.data.zebralogic import choice_letter, grid_cells, last_json_object
from npr.eval.metrics import cell_accuracy
from npr.rewards import is_correct

FIXTURES = Path(__file__).parent / "fixtures" / "zebralogic"


def test_choice_mode_renders_nprs_prompt_and_letter_answer():
    first, second = load_problems("zebralogic", data_dir=FIXTURES)
    row = json.loads((FIXTURES / "zebralogic.jsonl").read_text().splitlines()[0])
    assert first.problem == (
        f"Puzzle: {row['puzzle']}\n\nQuestion: What is Name of the person who lives in House 1?"
        "\n\nChoices: A. Arnold B. Eric \n\nAnswer:"
    )
    assert (first.id, first.answer, first.source, first.grader) == (
        "lgp-test-2x2-10#mc-0",
        "B",
        "zebralogic",
        "zebralogic-choice",
    )
    assert second.answer == "B" and second.location.endswith("zebralogic.jsonl:2")
    assert len(load_problems("zebra_logic", data_dir=FIXTURES, limit=1)) == 1


@pytest.mark.parametrize(
    "response, correct",
    [
        ("House 1 holds Eric, so \\boxed{B}", True),
        ("\\boxed{\\text{B}}", True),
        ("\\boxed{(b)}", True),
        ("\\boxed{B.}", True),
        ("\\boxed{A}", False),
        ("\\boxed{Eric}", False),  # the choice's text, not its letter: NPR compares letters
        ("Eric lives in house 1, B", False),  # no box: the fallback is a number, never a letter
    ],
)
def test_choice_mode_grades_the_boxed_letter(response, correct):
    problem = load_problems("zebralogic", data_dir=FIXTURES)[0]
    assert is_correct(response, problem) is correct


def test_choice_letter():
    assert [choice_letter(x) for x in ("C", " (d) ", "\\textbf{E}", "AB", "", None)] == [
        "C",
        "D",
        "E",
        None,
        None,
        None,
    ]


def test_an_answer_outside_the_choices_names_the_line(tmp_path):
    row = json.loads((FIXTURES / "zebralogic.jsonl").read_text().splitlines()[0])
    (tmp_path / "zebralogic.jsonl").write_text(json.dumps({**row, "answer": "Peter"}) + "\n")
    with pytest.raises(DataError, match=r"zebralogic.jsonl:1: answer 'Peter' is not one of the choices"):
        load_problems("zebralogic", data_dir=tmp_path)
    (tmp_path / "zebralogic.jsonl").write_text(json.dumps({k: v for k, v in row.items() if k != "choices"}) + "\n")
    with pytest.raises(DataError, match=r"zebralogic.jsonl:1: field 'choices' must be a list"):
        load_problems("zebralogic", data_dir=tmp_path)


def _answer(table: dict) -> str:
    return "Let me fill it in.\n" + json.dumps({"reasoning": "clue 1", "solution": table})


def test_grid_mode_prompt_and_cells():
    (problem,) = load_problems("zebralogic-grid", data_dir=FIXTURES)
    assert problem.grader == "zebralogic-grid" and problem.size == 2
    assert json.loads(problem.answer) == {
        "House 1": {"Name": "Eric", "Drink": "tea"},
        "House 2": {"Name": "Arnold", "Drink": "milk"},
    }
    template = json.loads(problem.problem[problem.problem.index("{") :])
    blank = {"Name": "___", "Drink": "___"}
    assert template["solution"] == {"House 1": blank, "House 2": blank}
    right = {"House 1": {"Name": "eric ", "Drink": ["Tea"]}, "House 2": {"Name": "Arnold", "Drink": "milk"}}
    assert grid_cells(_answer(right), problem.answer) == (4, 4) and is_correct(_answer(right), problem)
    three = {"House 1": {"Name": "Eric", "Drink": "milk"}, "House 2": {"Name": "Arnold", "Drink": "milk"}}
    assert grid_cells(_answer(three), problem.answer) == (3, 4) and not is_correct(_answer(three), problem)
    partial = {"House 1": {"Name": "Eric", "Drink": ""}, "House 2": "Arnold"}
    assert grid_cells(_answer(partial), problem.answer) == (1, 4)
    assert grid_cells("no table here", problem.answer) == (0, 4)
    assert grid_cells(_answer(three) + "\nOn second thought:\n" + _answer(right), problem.answer) == (4, 4)


def test_last_json_object():
    assert last_json_object('a {"x": {"y": 1}} b {"z": 2} {broken') == {"z": 2}
    assert last_json_object("[1, 2]") is None


def test_cell_accuracy_counts_cells_over_samples():
    records = [{"cells": [4, 4]}, {"cells": [1, 4]}, {"cells": [0, 6]}, {"correct": True}]
    assert cell_accuracy(records) == pytest.approx(5 / 14)
    assert cell_accuracy([{"correct": True}]) is None


def test_an_eval_run_records_grid_cells_and_summarises_cell_accuracy(tmp_path):
    from npr.cli.main import main
    from npr.eval.metrics import summarize

    out = tmp_path / "run"
    assert (
        main(
            [
                "eval",
                "--model",
                "tiny-random-llama",
                "--benchmarks",
                "zebralogic-grid,zebralogic",
                "--data-dir",
                str(FIXTURES),
                "--k",
                "2",
                "--max-new-tokens",
                "8",
                "--dtype",
                "float32",
                "--kv-cache-gib",
                "0.05",
                "--quiet",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    grid = [r for r in records if r["benchmark"] == "zebralogic-grid"]
    assert len(grid) == 2 and all(r["cells"] == [0, 4] and r["correct"] is False for r in grid)  # 8 random tokens
    assert all("cells" not in r for r in records if r["benchmark"] == "zebralogic")
    summary = summarize(records)["benchmarks"]
    assert summary["zebralogic-grid"]["cell_accuracy"] == 0.0 and summary["zebralogic"]["cell_accuracy"] is None
