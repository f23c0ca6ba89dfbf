"""The engine's KV pool and weight copy freed around the update and rebuilt at the weight sync
(``release_engine_for_update``): the same function on every device, exercised here on CPU with
the setting forced on. Tiny random Llama built locally."""

from __future__ import annotations

import copy

import pytest
import torch

from npr.engine import SamplingParams
from npr.train.config import Stage3Config
from npr.train.rollout import RolloutWorker, release_wanted


def test_release_wanted_follows_the_device():
    assert release_wanted("auto", torch.device("cuda")) and release_wanted("auto", "cuda:1")
    assert not release_wanted("auto", torch.device("cpu"))
    assert release_wanted("on", "cpu") and not release_wanted("off", "cuda")


@pytest.mark.parametrize("rollout_dtype", ["bfloat16", None])
def test_release_frees_the_pool_and_the_copy_and_sync_rebuilds_them(tiny_llama, rollout_dtype):
    """Greedy decoding after release + update + sync equals decoding by a worker that never
    released; the pool and the bf16 copy hold no memory in between; the trained weights
    themselves (no copy) are never freed."""
    model, tok = tiny_llama
    policy = copy.deepcopy(model)
    config = Stage3Config(model="m", train_data="x", rollout_dtype=rollout_dtype, kv_cache_tokens=1024)
    worker = RolloutWorker(policy, tok, config, mode="parallel")
    kept = RolloutWorker(copy.deepcopy(model), tok, config, mode="parallel")
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    prompts = [tok.encode("Q: 2+3?\n", add_special_tokens=False), tok.encode("Q: 7-1?\n", add_special_tokens=False)]
    before = [r.token_ids for r in worker.generate(prompts, 0, params)]
    pool_bytes = worker.engine.pool.keys.numel()

    worker.release_memory()
    assert worker.released and worker.engine.pool.keys.numel() == worker.engine.pool.values.numel() == 0
    if rollout_dtype:
        assert worker.owns_weights and all(p.numel() == 0 for p in worker.model.parameters())
    else:  # the engine decodes the trained weights: only the pool goes
        assert not worker.owns_weights and all(p.numel() > 0 for p in policy.parameters())
    with pytest.raises(RuntimeError, match="released"):
        worker.generate(prompts, 0, params)

    with torch.no_grad():  # an "update" of the trained weights, on both workers' policies
        for p, q in zip(policy.parameters(), kept.policy.parameters()):
            p.mul_(1.5)
            q.mul_(1.5)
    worker.sync()
    kept.sync()
    assert not worker.released and worker.engine.pool.keys.numel() == pool_bytes
    after = [r.token_ids for r in worker.generate(prompts, 0, params)]
    assert after == [r.token_ids for r in kept.generate(prompts, 0, params)]
    assert after != before  # the update reached the engine
    worker.engine.pool.assert_empty()


def test_stage3_with_the_engine_released_trains_bit_identically(tmp_path):
    """Two smoke Stage-3 steps (bf16 engine copy) with release forced on (CPU) vs off: the same metrics and
    weights."""
    from safetensors.torch import load_file

    from npr.cli.main import main
    from npr.train.tracking import deterministic_fields, read_metrics

    runs = {}
    for setting in ("on", "off"):
        out = tmp_path / setting
        assert (
            main(
                [
                    "train",
                    "stage3",
                    "--preset",
                    "smoke",
                    "--out",
                    str(out),
                    "--quiet",
                    "--max-steps",
                    "2",
                    "--release-engine-for-update",
                    setting,
                    "--rollout-dtype",
                    "bfloat16",
                ]
            )
            == 0
        )
        runs[setting] = (
            [deterministic_fields(m) for m in read_metrics(out / "metrics.jsonl")],
            load_file(out / "final" / "model.safetensors"),
        )
    (m_on, w_on), (m_off, w_off) = runs["on"], runs["off"]
    assert m_on == m_off and len(m_on) == 2 and all(m["updated"] == 1.0 for m in m_on)
    assert all(torch.equal(w_on[k], w_off[k]) for k in w_off)
