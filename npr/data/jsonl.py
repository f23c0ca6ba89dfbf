"""Strict reading of problem files: one JSON object per line with ``id``, ``problem``, ``answer``.

The layout is that of the benchmark pack (``/work/shared/benchmarks``, e.g. ``math500.jsonl``):

    {"id": "test/algebra/1.json", "problem": "...", "answer": "...", "source": "..."}

Other keys are allowed and ignored. Blank lines are skipped. Every other irregularity stops
the load with a ``DataFileError`` that names the file, the 1-based line and the field, because
a silently dropped or mangled problem changes every accuracy computed on the file.
"""

from __future__ import annotations

import json
from pathlib import Path

from npr.data.errors import DataError, DataFileError
from npr.data.problems import Problem
from npr.validate import unicode_problem

REQUIRED_FIELDS = ("id", "problem", "answer")


def decode_utf8(data: bytes, path: str) -> str:
    """``data`` as text; a leading BOM is dropped.

    Raises ``DataError`` naming the byte offset (and its line) of the first invalid byte.
    """
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{path} is not UTF-8: byte offset {e.start} (line {line}) is {data[e.start : e.start + 1]!r} "
            f"({e.reason}); re-encode the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 in.jsonl > out.jsonl`"
        ) from e


def parse_problem_line(line: str, path: str, lineno: int, source: str) -> Problem:
    """One non-blank line of a problems file as a ``Problem`` (``source`` is stored on it)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataFileError(
            path, lineno, None, f"not valid JSON ({e.msg} at column {e.colno})", "write one JSON object per line"
        ) from e
    if not isinstance(row, dict):
        raise DataFileError(
            path,
            lineno,
            None,
            f"a JSON {type(row).__name__}, not an object",
            'write one object per line: {"id": …, "problem": …, "answer": …}',
        )
    for name in REQUIRED_FIELDS:
        if name not in row:
            raise DataFileError(path, lineno, name, "missing", f"every line needs {', '.join(REQUIRED_FIELDS)}")
        value = row[name]
        if not isinstance(value, str):
            raise DataFileError(
                path,
                lineno,
                name,
                f"is a JSON {type(value).__name__} ({json.dumps(value)[:40]}), not a string",
                'write it as a string, e.g. "42"',
            )
        if not value.strip():
            raise DataFileError(path, lineno, name, "is empty", "fill it in or delete the line")
        if unicode_problem(value):  # a JSON "\ud800" escape: the tokenizer cannot encode it
            raise DataFileError(path, lineno, name, unicode_problem(value), "write valid Unicode text")
    return Problem(
        id=row["id"], problem=row["problem"], answer=row["answer"], source=source, location=f"{path}:{lineno}"
    )


def parse_problems_text(text: str, path: str, source: str) -> list[Problem]:
    """Every problem of a JSONL text, in file order; ids must be unique within the file."""
    problems: list[Problem] = []
    first_line: dict[str, int] = {}
    # split on "\n" only: str.splitlines would also split on U+2028 inside JSON strings
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        problem = parse_problem_line(line, path, lineno, source)
        if problem.id in first_line:
            raise DataFileError(
                path,
                lineno,
                "id",
                f"duplicate id {problem.id!r} (first on line {first_line[problem.id]})",
                "make ids unique within the file",
            )
        first_line[problem.id] = lineno
        problems.append(problem)
    return problems


def read_problems_jsonl(path: str | Path, source: str | None = None) -> list[Problem]:
    """All problems of the JSONL file at ``path``; ``source`` defaults to the path itself.

    Raises ``DataError`` when the file is missing or not UTF-8 and ``DataFileError`` on a bad
    line (not JSON, not an object, a required field missing, empty or not a string, a duplicate id).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"{path}: no such file; give the path of a .jsonl file with one "
            '{"id", "problem", "answer"} object per line'
        )
    text = decode_utf8(path.read_bytes(), str(path))
    problems = parse_problems_text(text, str(path), source or str(path))
    if not problems:
        raise DataError(f"{path} holds no problems; it needs one JSON object per line")
    return problems
