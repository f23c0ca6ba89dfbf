"""One entry point for every problem source: ``load_problems(spec)``.

A spec is one of

- a benchmark name: ``aime24``, ``aime25``, ``hmmt25``, ``amc23``, ``math500``, ``minerva``,
  ``olympiadbench``, ``zebralogic`` (``npr.data.benchmarks``);
- a reasoning-gym spec: ``rg:chain_sum?size=200&seed=7&terms=2`` (``npr.data.gym``);
- a task npr generates: ``gen:expressions?size=64&seed=1&parts=2-4`` (``npr.data.generated``);
- a path to a ``.jsonl`` file in the benchmark-pack layout (``npr.data.jsonl``);
- ``hf:<owner>/<dataset>[:split]``, read with ``datasets`` when online (``npr.data.hub``).
"""

from __future__ import annotations

from pathlib import Path

from npr.data.benchmarks import load_benchmark
from npr.data.errors import DataError
from npr.data.generated import PREFIX as GENERATED_PREFIX
from npr.data.generated import load_generated_spec
from npr.data.gym import load_rg_spec
from npr.data.hub import load_hf_spec
from npr.data.jsonl import read_problems_jsonl
from npr.data.problems import Problem


def is_path_spec(spec: str) -> bool:
    """True when ``spec`` names a file rather than a benchmark (a .jsonl suffix or a path separator)."""
    return spec.endswith(".jsonl") or "/" in spec or "\\" in spec or Path(spec).is_file()


def load_problems(spec: str, data_dir: str | Path | None = None, limit: int | None = None) -> list[Problem]:
    """The problems named by ``spec`` (see the module docstring), in source order.

    ``data_dir`` (else ``$NPR_DATA_DIR``) is where benchmark files are looked up; ``limit``
    keeps the first N. Raises a ``DataError`` (an ``NprError``) that says how to fix the spec.
    """
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise DataError(f"limit must be a positive integer, got {limit!r}")
    spec = spec.strip()
    if not spec:
        raise DataError("empty problem spec; give a benchmark name, a .jsonl path, rg:<task>… or hf:<dataset>")
    if spec.startswith("rg:"):
        return load_rg_spec(spec, limit)
    if spec.startswith(GENERATED_PREFIX):
        return load_generated_spec(spec, limit)
    if spec.startswith("hf:"):
        return load_hf_spec(spec, limit)
    if is_path_spec(spec):
        problems = read_problems_jsonl(spec)
        return problems if limit is None else problems[:limit]
    return load_benchmark(spec, data_dir, limit)


def split_specs(text: str) -> list[str]:
    """``"aime24, math500,rg:chain_sum?size=5"`` → ``["aime24", "math500", "rg:chain_sum?size=5"]``.

    Empty items are dropped; an empty list is an error. A comma inside the path of a file that exists
    does not split it: ``"runs/a,b/test.jsonl"`` is one spec when that file is there (the longest run of
    comma-joined items that names a file wins).
    """
    pieces, specs, i = text.split(","), [], 0
    while i < len(pieces):
        j = next((j for j in range(len(pieces), i + 1, -1) if Path(",".join(pieces[i:j]).strip()).is_file()), i + 1)
        specs.append(",".join(pieces[i:j]).strip())
        i = j
    specs = [s for s in specs if s]
    if not specs:
        raise DataError(f"no problem spec in {text!r}; give comma-separated benchmark names, .jsonl paths or rg: specs")
    return specs
