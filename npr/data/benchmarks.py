"""Evaluation benchmarks by name: a local JSONL file first, the Hugging Face hub as a fallback.

The local file lives in a data directory (argument, else ``$NPR_DATA_DIR``) as ``<name>.jsonl``
or under the benchmark pack's file name (``minerva`` → ``minerva_math.jsonl``); see
``/work/shared/benchmarks/README.md`` for the pack. With no local file, the benchmark is read
from its hub dataset when ``datasets`` is installed and the hub is online; otherwise
``MissingBenchmarkError`` names both ways to fix it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from npr.data import zebralogic
from npr.data.errors import DataError, MissingBenchmarkError, UnknownSpecError
from npr.data.hub import HubSource, hub_rows, hub_unavailable_reason, load_hub_source
from npr.data.jsonl import read_problems_jsonl
from npr.data.problems import Problem

DATA_DIR_ENV = "NPR_DATA_DIR"


@dataclass(frozen=True)
class Benchmark:
    """A named benchmark: the pack's file name, its expected size and its hub dataset. ``row_problem``
    (row, source, location) -> Problem reads a benchmark whose rows are not ``{id, problem, answer}``:
    its local file then holds the hub's own fields, one row per line."""

    name: str
    pack_file: str
    rows: int | None
    hub: HubSource
    description: str
    row_problem: Callable[[dict, str, str], Problem] | None = None


# Hub ids are public datasets with the same problem sets as the pack (see its README for how
# the pack's rows were made); columns differ per dataset, hence the explicit mapping.
BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark(
            "aime24",
            "aime24.jsonl",
            30,
            HubSource("HuggingFaceH4/aime_2024", "train", "problem", "answer", "id"),
            "AIME 2024 I and II",
        ),
        Benchmark(
            "aime25",
            "aime25.jsonl",
            30,
            HubSource("math-ai/aime25", "test", "problem", "answer", "id"),
            "AIME 2025 I and II",
        ),
        Benchmark(
            "hmmt25",
            "hmmt25.jsonl",
            30,
            HubSource("MathArena/hmmt_feb_2025", "train", "problem", "answer", "problem_idx"),
            "HMMT February 2025",
        ),
        Benchmark(
            "amc23",
            "amc23.jsonl",
            40,
            HubSource("math-ai/amc23", "test", "question", "answer", "id"),
            "AMC 12 2023, 40 problems",
        ),
        Benchmark(
            "math500",
            "math500.jsonl",
            500,
            HubSource("HuggingFaceH4/MATH-500", "test", "problem", "answer", "unique_id"),
            "MATH-500 (PRM800K test subset)",
        ),
        Benchmark(
            "minerva",
            "minerva_math.jsonl",
            272,
            HubSource("math-ai/minervamath", "test", "question", "answer"),
            "Minerva OCWCourses",
        ),
        Benchmark(
            "olympiadbench",
            "olympiadbench.jsonl",
            675,
            HubSource("Hothan/OlympiadBench", "train", "question", "final_answer", "id", config="OE_TO_maths_en_COMP"),
            "OlympiadBench OE_TO_maths_en_COMP",
        ),
        Benchmark(
            "zebralogic",
            "zebralogic.jsonl",
            None,
            HubSource("WildEval/ZebraLogic", "test", "puzzle", "answer", "id", config="mc_mode"),
            "ZebraLogic multiple choice as NPR evaluates it (answer = the gold choice's letter)",
            zebralogic.choice_problem,
        ),
        Benchmark(
            "zebralogic-grid",
            "zebralogic-grid.jsonl",
            None,
            HubSource("WildEval/ZebraLogic", "test", "puzzle", "solution", "id", config="grid_mode"),
            "ZebraLogic grid puzzles, ZeroEval's puzzle and cell accuracy",
            zebralogic.grid_problem,
        ),
    )
}

ALIASES = {
    "minerva_math": "minerva",
    "math-500": "math500",
    "olympiad_bench": "olympiadbench",
    "zebra_logic": "zebralogic",
    "zebralogic_grid": "zebralogic-grid",
}


def row_fields(bench: Benchmark) -> str:
    """What one line of the benchmark's local file holds, for messages."""
    if bench.row_problem is zebralogic.choice_problem:
        return f"one {bench.hub.repo} {bench.hub.config} row {{id, puzzle, question, choices, answer}}"
    if bench.row_problem is zebralogic.grid_problem:
        return f"one {bench.hub.repo} {bench.hub.config} row {{id, size, puzzle, solution: {{header, rows}}}}"
    return 'one {"id", "problem", "answer"} object'


def resolve_data_dir(data_dir: str | Path | None = None) -> Path | None:
    """``data_dir`` if given, else ``$NPR_DATA_DIR``, else None. A given folder must exist."""
    chosen = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV) or None
    if chosen is None:
        return None
    path = Path(chosen).expanduser()
    if not path.is_dir():
        origin = "--data-dir" if data_dir is not None else f"${DATA_DIR_ENV}"
        raise DataError(f"{origin} {path} is not a directory; point it at a folder holding <benchmark>.jsonl files")
    return path


def get_benchmark(name: str) -> Benchmark:
    """The benchmark called ``name`` (case-insensitive, aliases accepted)."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in BENCHMARKS:
        raise UnknownSpecError(
            f"unknown benchmark {name!r}; known benchmarks: {', '.join(BENCHMARKS)}. Other specs: a path to a "
            ".jsonl file, rg:<task>?size=N&seed=S (reasoning-gym) or hf:<owner>/<dataset>[:split]"
        )
    return BENCHMARKS[key]


def local_benchmark_file(bench: Benchmark, data_dir: Path | None) -> Path | None:
    """``<data_dir>/<name>.jsonl`` or ``<data_dir>/<pack file>``, whichever exists first."""
    if data_dir is None:
        return None
    for file_name in dict.fromkeys((f"{bench.name}.jsonl", bench.pack_file)):
        if (data_dir / file_name).is_file():
            return data_dir / file_name
    return None


def load_benchmark(name: str, data_dir: str | Path | None = None, limit: int | None = None) -> list[Problem]:
    """The problems of benchmark ``name`` (``source`` = its canonical name), in file order."""
    bench = get_benchmark(name)
    folder = resolve_data_dir(data_dir)
    path = local_benchmark_file(bench, folder)
    if path is not None and bench.row_problem is not None:
        rows = zebralogic.read_rows_jsonl(path)[:limit]
        return [bench.row_problem(row, bench.name, location) for row, location in rows]
    if path is not None:
        problems = read_problems_jsonl(path, source=bench.name)
        return problems if limit is None else problems[:limit]
    reason = hub_unavailable_reason()
    if reason is None and bench.row_problem is not None:
        rows = hub_rows(bench.hub, bench.name, limit)
        return [bench.row_problem(row, bench.name, location) for row, location in rows]
    if reason is None:
        return load_hub_source(bench.hub, bench.name, limit)
    names = list(dict.fromkeys((f"{bench.name}.jsonl", bench.pack_file)))
    looked = (
        f"{folder} has " + (f"neither {names[0]} nor {names[1]}" if len(names) == 2 else f"no {names[0]}")
        if folder is not None
        else f"no data directory is set (--data-dir or ${DATA_DIR_ENV})"
    )
    raise MissingBenchmarkError(
        f"benchmark {bench.name!r} not found: {looked}, and the hub fallback "
        f"({bench.hub.repo}) is off because {reason}. Fix: point --data-dir or ${DATA_DIR_ENV} at a folder "
        f"with {bench.name}.jsonl ({row_fields(bench)} per line), "
        "or install `datasets` and go online (unset HF_HUB_OFFLINE)."
    )
