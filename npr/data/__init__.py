"""Problems for training and evaluation: benchmarks, reasoning-gym tasks, JSONL files, the hub.

``load_problems(spec)`` is the entry point; ``split_specs`` reads a comma-separated list.
"""

from npr.data.benchmarks import BENCHMARKS, DATA_DIR_ENV, Benchmark, get_benchmark, load_benchmark
from npr.data.errors import DataError, DataFileError, MissingBenchmarkError, UnknownSpecError
from npr.data.gym import load_rg_spec, parse_rg_spec
from npr.data.jsonl import read_problems_jsonl
from npr.data.loader import load_problems, split_specs
from npr.data.problems import Problem

__all__ = [
    "BENCHMARKS",
    "DATA_DIR_ENV",
    "Benchmark",
    "DataError",
    "DataFileError",
    "MissingBenchmarkError",
    "Problem",
    "UnknownSpecError",
    "get_benchmark",
    "load_benchmark",
    "load_problems",
    "load_rg_spec",
    "parse_rg_spec",
    "read_problems_jsonl",
    "split_specs",
]
