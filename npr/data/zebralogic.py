"""ZebraLogic (Lin et al. 2025, ``WildEval/ZebraLogic``) in its two modes, read from the hub or a local JSONL file
with the hub's fields, and graded as the papers that report them do.

- ``zebralogic``: the multiple-choice mode (config ``mc_mode``; rows ``{id, puzzle, question, choices, answer}``,
  ``answer`` being the text of one choice), as NPR evaluates it (reference repo ``evals/evaluate.py``,
  ``_load_zebra_logic``): the prompt is ``Puzzle: …\\n\\nQuestion: …\\n\\nChoices: A. x B. y \\n\\nAnswer:`` and the
  reference answer is the gold choice's letter; a response is correct when its final answer (the last
  ``\\boxed{}``) is that letter (``choice_correct``).
- ``zebralogic-grid``: the grid mode (config ``grid_mode``; rows ``{id, size, puzzle, solution: {header, rows}}``),
  as ZeroEval scores it (``src/evaluation/zebra_grid_eval.py``): the model fills a JSON table; ``grid_cells``
  counts the cells of the last complete JSON object's ``solution`` equal to the truth (case- and
  space-insensitive); cell accuracy is their share, a puzzle is solved when every cell is right.

Neither mode ships with npr: the puzzles are the benchmark's test set (its authors ask that it not be trained on,
and the grid answers were long kept private), so they are read from the hub or from a file the user provides.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from npr.data.errors import DataError
from npr.data.jsonl import decode_utf8
from npr.data.problems import Problem

CHOICE = "zebralogic-choice"  # Problem.grader of the multiple-choice mode
GRID = "zebralogic-grid"  # Problem.grader of the grid mode
BLANK = "___"


def _field(row: dict, name: str, kind: type, location: str) -> Any:
    value = row.get(name)
    if not isinstance(value, kind):
        raise DataError(f"{location}: field {name!r} must be a {kind.__name__}, got {type(value).__name__}")
    return value


def choice_problem(row: dict, source: str, location: str) -> Problem:
    """A multiple-choice row as NPR renders it: the prompt with lettered choices, the gold letter as the answer."""
    puzzle, question = _field(row, "puzzle", str, location), _field(row, "question", str, location)
    choices = [str(c) for c in _field(row, "choices", list, location)]
    answer = str(row.get("answer"))
    if answer not in choices:
        raise DataError(f"{location}: answer {answer!r} is not one of the choices {choices}")
    if len(choices) > 26:
        raise DataError(f"{location}: {len(choices)} choices; letters run out after Z")
    lettered = "".join(f"{chr(65 + i)}. {c} " for i, c in enumerate(choices))
    text = f"Puzzle: {puzzle}\n\nQuestion: {question}\n\nChoices: {lettered}\n\nAnswer:"
    return Problem(
        id=str(_field(row, "id", str, location)),
        problem=text,
        answer=chr(65 + choices.index(answer)),
        source=source,
        location=location,
        grader=CHOICE,
    )


def solution_table(solution: dict, location: str) -> dict[str, dict[str, str]]:
    """The hub's ``{header: [House, a, b], rows: [[1, x, y], …]}`` as ``{"House 1": {a: x, b: y}, …}``."""
    header, rows = solution.get("header"), solution.get("rows")
    if not isinstance(header, list) or not isinstance(rows, list) or not header or header[0] != "House":
        raise DataError(f"{location}: solution must hold header ['House', …] and rows")
    columns = range(1, len(header))
    return {f"House {i + 1}": {str(header[j]): str(row[j]) for j in columns} for i, row in enumerate(rows)}


def grid_problem(row: dict, source: str, location: str) -> Problem:
    """A grid row: the puzzle and a JSON table to fill as the prompt; the solution table (JSON) as the answer."""
    puzzle = _field(row, "puzzle", str, location)
    table = solution_table(_field(row, "solution", dict, location), location)
    template = {"reasoning": BLANK, "solution": {house: dict.fromkeys(cells, BLANK) for house, cells in table.items()}}
    text = (
        f"{puzzle}\n\nSolve the puzzle. Answer with one JSON object in this form, every {BLANK} filled with "
        f"the right value:\n\n{json.dumps(template, indent=4)}"
    )
    return Problem(
        id=str(_field(row, "id", str, location)),
        problem=text,
        answer=json.dumps(table, sort_keys=True),
        source=source,
        location=location,
        grader=GRID,
        size=len(table),
    )


def read_rows_jsonl(path: Path) -> list[tuple[dict, str]]:
    """The JSON objects of a JSONL file with their ``file:line`` locations (blank lines skipped)."""
    text = decode_utf8(Path(path).read_bytes(), str(path))
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        location = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{location}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{location}: each line must be a JSON object")
        rows.append((row, location))
    return rows


# ----------------------------------------------------------------------------- grading (pure)

_LETTER = re.compile(r"^\(?\s*([A-Za-z])\s*\)?\.?$")
_TEXT = re.compile(r"^\\(?:text|textbf|mathrm)\{(.*)\}$")


def choice_letter(answer: str | None) -> str | None:
    """The letter a final answer names: ``B``, ``(B)``, ``B.`` or ``\\text{B}``; None for anything else."""
    if answer is None:
        return None
    text = answer.strip()
    while (m := _TEXT.match(text)) is not None:
        text = m.group(1).strip()
    m = _LETTER.match(text)
    return m.group(1).upper() if m else None


def choice_correct(final: str | None, letter: str) -> bool:
    """Whether a final answer (the last ``\\boxed{}`` content) names the gold ``letter``."""
    return choice_letter(final) == letter


def last_json_object(text: str) -> dict | None:
    """The last complete top-level JSON object in ``text`` (ZeroEval's ``extract_last_complete_json``), or None."""
    decoder = json.JSONDecoder()
    found = None
    i = text.find("{")
    while i != -1:
        try:
            value, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            i = text.find("{", i + 1)
            continue
        if isinstance(value, dict):
            found = value
        i = text.find("{", end)
    return found


def _cell(value: Any) -> str | None:
    if isinstance(value, list):
        value = value[0] if value else None
    if not isinstance(value, str) or not value.strip():
        return None
    return value.strip().lower()


def grid_cells(response: str, answer_json: str) -> tuple[int, int]:
    """(cells right, cells in all) of the response's table against the solution (``Problem.answer`` of the grid
    mode). A response without a JSON object holding ``solution`` gets 0 cells right."""
    truth = json.loads(answer_json)
    total = sum(len(cells) for cells in truth.values())
    prediction = last_json_object(response)
    table = prediction.get("solution") if prediction is not None else None
    if not isinstance(table, dict):
        return 0, total
    right = 0
    for house, cells in truth.items():
        predicted = table.get(house)
        if not isinstance(predicted, dict):
            continue
        right += sum(_cell(predicted.get(column)) == value.strip().lower() for column, value in cells.items())
    return right, total
