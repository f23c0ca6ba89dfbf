"""KV pool sizing: ``kv_cache_tokens`` > ``kv_cache_gib`` > ``gpu_memory_utilization`` (CUDA) / 2 GiB (CPU)."""

from __future__ import annotations

import pytest

from npr.engine import Engine, EngineConfig, EngineInputError
from npr.engine.engine import kv_pool_bytes

GIB = 2**30


def test_the_pool_takes_what_the_utilization_leaves():
    # an 80 GiB card at 0.9: 72 GiB, less 1 GiB of other processes, 8 GiB of weights, 3 GiB of a forward
    assert kv_pool_bytes(80 * GIB, 1 * GIB, 8 * GIB, 3 * GIB, 0.9) == int(80 * GIB * 0.9) - 12 * GIB
    with pytest.raises(EngineInputError, match=r"gpu_memory_utilization=0.1 leaves no memory for the KV pool"):
        kv_pool_bytes(80 * GIB, 1 * GIB, 8 * GIB, 3 * GIB, 0.1)


@pytest.mark.parametrize("value", [0.0, -0.5, 1.5])
def test_a_utilization_outside_0_1_is_refused(value):
    with pytest.raises(EngineInputError, match=f"gpu_memory_utilization must be in \\(0, 1\\], got {value}"):
        EngineConfig(gpu_memory_utilization=value)


def test_explicit_sizes_win_and_a_cpu_pool_defaults_to_2_gib(tiny_llama):
    model, tok = tiny_llama
    per_token = 2 * 2 * 2 * 16 * 4  # layers x (K, V) x kv heads x head dim x fp32 bytes
    assert Engine(model, tok, EngineConfig(kv_cache_tokens=1600)).pool.num_blocks == 100
    assert Engine(model, tok, EngineConfig(kv_cache_gib=0.01)).pool.num_blocks == int(0.01 * GIB // per_token) // 16
    engine = Engine(model, tok, EngineConfig(gpu_memory_utilization=0.01))  # a CPU: no device memory to read
    assert engine.pool.num_blocks == 2 * GIB // per_token // 16
    with pytest.raises(EngineInputError, match="kv_cache_gib must be > 0"):
        EngineConfig(kv_cache_gib=0)
