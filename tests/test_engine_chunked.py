"""Chunked prefill (``EngineConfig.max_num_batched_tokens``): no forward feeds more tokens than the cap, and
cutting prompts, forks, joins and re-prefills across steps changes no token and no log-prob."""

from __future__ import annotations

import random

import pytest

from npr.engine import Engine, EngineConfig, EngineInputError, SamplingParams
from tests.test_engine import flat_logprobs
from tests.test_engine_attention import RandomTrees, staggered


def run(model, tok, cap, kernel="sdpa", pages=40):
    rng = random.Random(5)
    prompts = [[1] + [rng.randrange(3, 250) for _ in range(rng.randint(2, 70))] for _ in range(5)]
    params = SamplingParams(
        max_new_tokens=300, temperature=1.0, n=2, seed=2, logits_processors=(RandomTrees(tok, 6, len(prompts)),)
    )
    engine = Engine(
        model,
        tok,
        EngineConfig(
            attention=kernel, debug=True, kv_cache_tokens=16 * pages, max_num_seqs=8, max_num_batched_tokens=cap
        ),
    )
    fed = []
    real_step = engine.step

    def step():
        event = real_step()
        fed.append(event.tokens)
        return event

    engine.step = step
    return staggered(engine, prompts, params, every=2), fed


@pytest.mark.parametrize(
    "which, kernel",
    [("tiny_llama", "sdpa"), ("tiny_qwen3", "sdpa"), pytest.param("tiny_llama", "flex", marks=pytest.mark.slow)],
)
def test_chunked_prefill_changes_nothing(which, kernel, request):
    model, tok = request.getfixturevalue(which)
    whole, fed_whole = run(model, tok, None, kernel)
    chunked, fed = run(model, tok, 16, kernel)  # a pool of 40 pages also preempts: re-prefills are cut too
    assert max(fed) <= 16 < max(fed_whole)
    assert sum(r.stats.preemptions for r in chunked) > 0 and sum(r.stats.parallel_blocks for r in chunked) >= 6
    assert all(r.finish_reason == "eos" for r in chunked)
    for a, b in zip(whole, chunked):
        assert (a.prompt_index, a.sample_index, a.token_ids, a.position_ids) == (
            b.prompt_index,
            b.sample_index,
            b.token_ids,
            b.position_ids,
        )
        assert max(abs(x - y) for x, y, s in zip(a.logprobs, b.logprobs, a.sampled) if s) <= 1e-4
    worst = 0.0
    for r in chunked:  # and against one training-style flat masked forward
        flat = flat_logprobs(model, tok, r)
        worst = max(worst, max(abs(a - b) for a, b, s in zip(flat, r.logprobs, r.sampled) if s))
    assert worst <= 1e-4


@pytest.mark.parametrize(
    "cap, message", [(8, "max_num_batched_tokens=8 is below one KV block"), (20, "max_num_batched_tokens=20 is below")]
)
def test_a_cap_below_a_block_or_the_streams_is_refused(cap, message):
    with pytest.raises(EngineInputError, match=message):
        EngineConfig(max_num_batched_tokens=cap, max_num_seqs=32)
