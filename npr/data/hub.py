"""Problems from the Hugging Face hub, through the optional ``datasets`` package.

``datasets`` is not an npr dependency: the hub is a fallback for a benchmark with no local
file, and the way to read an arbitrary ``hf:<dataset id>[:split]`` spec. Offline
(``HF_HUB_OFFLINE=1``) or without ``datasets`` installed, ``hub_unavailable_reason`` says why,
and nothing is attempted.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from npr.data.errors import DataError
from npr.data.problems import Problem
from npr.extras import install_hint

PROBLEM_COLUMNS = ("problem", "question", "Problem", "Question", "prompt", "puzzle")
# no "solution": in MATH-style sets it is a full worked solution, not a gradable answer
ANSWER_COLUMNS = ("answer", "final_answer", "Answer", "expected_answer")
ID_COLUMNS = ("id", "unique_id", "problem_idx", "ID", "idx")


def answer_text(value: Any) -> str:
    """A hub answer cell as a string: lists are joined with ", " (OlympiadBench's
    ``final_answer``), ``$`` delimiters are dropped, dicts (ZebraLogic's solution grid) become JSON."""
    if isinstance(value, (list, tuple)):
        return ", ".join(answer_text(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    text = str(value).strip()
    return text[1:-1].strip() if len(text) > 1 and text.startswith("$") and text.endswith("$") else text


@dataclass(frozen=True)
class HubSource:
    """Where a benchmark lives on the hub and which columns hold problem, answer and id.

    ``id_column`` None numbers the rows ``<name>-<row index>``.
    """

    repo: str
    split: str
    problem_column: str
    answer_column: str
    id_column: str | None = None
    config: str | None = None
    answer_fn: Callable[[Any], str] = answer_text


def hub_unavailable_reason() -> str | None:
    """None when the hub may be used, otherwise why not (offline, or ``datasets`` missing)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    if importlib.util.find_spec("datasets") is None:
        return f"the `datasets` package is not installed ({install_hint('hub')})"
    return None


def _pick(columns: list[str], preferred: tuple[str, ...], what: str, spec: str) -> str:
    for name in preferred:
        if name in columns:
            return name
    raise DataError(f"{spec}: no {what} column among {columns}; expected one of {list(preferred)}")


def guess_source(repo: str, split: str, config: str | None, columns: list[str], spec: str) -> HubSource:
    """A ``HubSource`` for an arbitrary dataset, picking its columns by common names."""
    id_column = next((c for c in ID_COLUMNS if c in columns), None)
    return HubSource(
        repo,
        split,
        _pick(columns, PROBLEM_COLUMNS, "problem", spec),
        _pick(columns, ANSWER_COLUMNS, "answer", spec),
        id_column,
        config,
    )


def rows_to_problems(rows, source: HubSource, name: str, limit: int | None = None) -> list[Problem]:
    """Hub rows (dicts) as Problems with ``source=name``; ids are the id column or ``name-i``."""
    problems = []
    for i, row in enumerate(rows):
        if limit is not None and i >= limit:
            break
        pid = str(row[source.id_column]) if source.id_column else f"{name}-{i}"
        problems.append(
            Problem(
                id=pid,
                problem=str(row[source.problem_column]),
                answer=source.answer_fn(row[source.answer_column]),
                source=name,
                location=f"{source.repo} {source.split} row {i}",
            )
        )
    return problems


def _load_rows(repo: str, config: str | None, split: str, spec: str):
    reason = hub_unavailable_reason()
    if reason is not None:
        raise DataError(
            f"{spec}: cannot read the Hugging Face hub: {reason}. "
            "Install the hub extra and go online, or use a local .jsonl file instead"
        )
    import datasets

    try:
        return datasets.load_dataset(repo, config, split=split)
    except Exception as e:  # network, auth, unknown split: re-raised with the spec, not swallowed
        raise DataError(
            f"{spec}: loading {repo}"
            + (f" ({config})" if config else "")
            + f" split {split!r} from the hub failed: {type(e).__name__}: {e}"
        ) from e


def hub_rows(source: HubSource, name: str, limit: int | None = None) -> list[tuple[dict, str]]:
    """The first ``limit`` rows (all with None) of a hub dataset, each with its location for messages."""
    rows = _load_rows(source.repo, source.config, source.split, name)
    count = len(rows) if limit is None else min(limit, len(rows))
    return [
        (dict(rows[i]), f"{source.repo} {source.config or ''} {source.split} row {i}".replace("  ", " "))
        for i in range(count)
    ]


def load_hub_source(source: HubSource, name: str, limit: int | None = None) -> list[Problem]:
    """The problems of a known benchmark's hub dataset."""
    rows = _load_rows(source.repo, source.config, source.split, name)
    return rows_to_problems(rows, source, name, limit)


def parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """``hf:owner/name[:split]`` or ``hf:owner/name:config:split`` → (repo, config, split).

    The split defaults to ``test``.
    """
    parts = spec.removeprefix("hf:").split(":")
    if not parts[0] or "/" not in parts[0] or len(parts) > 3 or any(not p for p in parts):
        raise DataError(f"{spec!r}: expected hf:<owner>/<dataset>[:split] or hf:<owner>/<dataset>:<config>:<split>")
    if len(parts) == 1:
        return parts[0], None, "test"
    if len(parts) == 2:
        return parts[0], None, parts[1]
    return parts[0], parts[1], parts[2]


def load_hf_spec(spec: str, limit: int | None = None) -> list[Problem]:
    """The problems of ``hf:<dataset id>[:split]``; columns are picked by common names."""
    repo, config, split = parse_hf_spec(spec)
    rows = _load_rows(repo, config, split, spec)
    source = guess_source(repo, split, config, list(rows.column_names), spec)
    return rows_to_problems(rows, source, spec, limit)
