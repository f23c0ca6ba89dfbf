"""Dynamo graphs of the engine's compiled flex attention: compiled once per engine shape, then never again.

The workload mixes what changes the shapes of a step: prefills of every length (a long prompt among
them), forks and joins in the same steps as decode rows, preemptions and re-prefills, on two engines
of different pool sizes, with CUDA's block layout (128-query blocks for prefills, block tables as
wide as a call's widest row) forced on the CPU. Graphs are counted with the ``aot_eager`` backend:
the same guards as inductor, compiled in seconds.
"""

from __future__ import annotations

import random

import pytest
import torch

import npr.engine.attention as attention
from npr.engine import Engine, EngineConfig, SamplingParams
from tests.test_engine_attention import RandomTrees, staggered


@pytest.fixture
def aot_eager_flex(monkeypatch):
    monkeypatch.setattr(attention, "FLEX_BACKEND", "aot_eager")
    monkeypatch.setattr(attention, "CUDA_LAYOUT", True)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def workload(engine: Engine, tok, seed: int, long_prompt: int) -> list:
    rng = random.Random(seed)
    prompts = [[1] + [rng.randrange(3, 250) for _ in range(rng.randint(2, 60))] for _ in range(5)]
    prompts.insert(2, [1] + [rng.randrange(3, 250) for _ in range(long_prompt)])
    params = SamplingParams(
        max_new_tokens=200, temperature=1.0, n=2, seed=seed, logits_processors=(RandomTrees(tok, seed, len(prompts)),)
    )
    return staggered(engine, prompts, params, every=2)


def test_no_graphs_after_warm_up(tiny_llama, aot_eager_flex):
    model, tok = tiny_llama
    compiled = []
    for pages, long_prompt in ((80, 1000), (300, 3700)):  # a pool that preempts, and a larger one
        engine = Engine(
            model, tok, EngineConfig(attention="flex", kv_cache_tokens=16 * pages, max_num_seqs=8, debug=True)
        )
        before = graphs()
        workload(engine, tok, seed=1, long_prompt=200)  # warm-up
        warm = graphs()
        results = workload(engine, tok, seed=2, long_prompt=long_prompt)  # 3700: the query tables grow
        assert sum(r.stats.preemptions for r in results) > 0 or pages > 100
        assert sum(r.stats.parallel_blocks for r in results) >= 4
        compiled.append((warm - before, graphs() - warm))
    print("graphs (warm-up, after) per engine:", compiled)
    assert [after for _, after in compiled] == [0, 0], compiled
    assert compiled[1][0] <= 1, compiled  # a second pool size: at most one compile
