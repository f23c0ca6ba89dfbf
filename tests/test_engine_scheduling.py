"""Admission by use, preemption by recompute, live-stream bounds, cancellation and token deltas."""

from __future__ import annotations

import json
import math

import pytest
import torch

from npr.engine import Engine, EngineConfig, FinishReason, SamplingParams, StructureForcer

PROMPTS = [
    [1, 72, 73, 74, 75, 2, 201],
    [1, 80, 81, 201],
    [1, 90, 91, 92, 201],
    [1, 60, 201],
    [1, 100, 101, 102, 103, 104, 201],
    [1, 110, 201],
]
SHAPES = [[(5, 9, 3), (4, 4)], [(12,), (3, 3, 3)], [(7, 2)], [(2, 2, 2, 2)], [(10, 1), (6,)], [(3, 8)]]


class PerPrompt:
    """A different forced tree per prompt, with a different prefix: forks and joins of one request
    fall in the steps where others decode."""

    def __init__(self, tok, shapes=SHAPES):
        self.forcers = [
            StructureForcer(tok, [list(b) for b in shape], prefix_tokens=i) for i, shape in enumerate(shapes)
        ]

    def __call__(self, stream, logits):
        return self.forcers[stream.prompt_index % len(self.forcers)](stream, logits)


def run(model_tok, params, prompts=PROMPTS, **cfg):
    model, tok = model_tok
    cfg.setdefault("kv_cache_tokens", 8192)
    engine = Engine(model, tok, EngineConfig(debug=True, **cfg))
    results = engine.generate(prompts, params)
    engine.pool.assert_empty()
    return engine, results


def same_outputs(a, b):
    assert [(r.prompt_index, r.sample_index) for r in a] == [(r.prompt_index, r.sample_index) for r in b]
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids and x.position_ids == y.position_ids and x.blocks == y.blocks
        assert x.finish_reason == y.finish_reason
        assert all(
            math.isclose(p, q, abs_tol=1e-4) or (math.isnan(p) and math.isnan(q))
            for p, q in zip(x.logprobs, y.logprobs)
        )


@pytest.mark.parametrize("mode, temperature", [("parallel", 0.0), ("sequential", 1.0)])
def test_tiny_pool_preempts_and_changes_nothing(tiny_llama, mode, temperature):
    """A pool far too small for the batch (but enough for any one request) preempts and recomputes
    requests, and every output equals the ample pool's: prefixes, branches and takeaways re-prefilled
    with their own positions and mask, sampling keyed by counters."""
    _, tok = tiny_llama
    params = SamplingParams(
        max_new_tokens=300, temperature=temperature, top_p=0.9, n=2, seed=5, logits_processors=(PerPrompt(tok),)
    )
    _, ample = run(tiny_llama, params, mode=mode)
    assert all(r.finish_reason == "eos" for r in ample)
    tight, small = run(tiny_llama, params, mode=mode, kv_cache_tokens=16 * 14)
    same_outputs(small, ample)
    assert sum(r.stats.preemptions for r in small) >= 3
    assert max(len(r.prompt_ids) + len(r.token_ids) for r in small) > 16 * 6  # the pool holds ~2 requests at once


def test_a_request_larger_than_the_pool_ends_as_length(tiny_llama):
    _, tok = tiny_llama
    shapes = [[(60, 60, 60)], [(3,)]]
    params = SamplingParams(max_new_tokens=400, temperature=0, logits_processors=(PerPrompt(tok, shapes),))
    engine, results = run(tiny_llama, params, prompts=PROMPTS[:2], kv_cache_tokens=16 * 8)
    big, small = results
    assert big.finish_reason is FinishReason.LENGTH and "cannot hold this request alone" in big.diagnostic
    assert small.finish_reason is FinishReason.EOS
    assert not engine.has_work()
    # the enum is its string wherever results go: comparisons, JSON records, f-strings
    assert small.finish_reason == "eos" and json.dumps({"r": big.finish_reason}) == '{"r": "length"}'
    assert f"{big.finish_reason}" == "length"


def test_max_num_seqs_bounds_live_streams(tiny_llama):
    _, tok = tiny_llama
    params = SamplingParams(max_new_tokens=300, temperature=0, logits_processors=(PerPrompt(tok),))
    _, ample = run(tiny_llama, params, mode="parallel")
    model, tok = tiny_llama
    engine = Engine(model, tok, EngineConfig(mode="parallel", debug=True, kv_cache_tokens=8192, max_num_seqs=3))
    engine.submit(PROMPTS, params)
    results, peak = [], 0
    while engine.has_work():
        results += engine.step().finished
        peak = max(peak, engine.scheduler.live_streams())
    assert peak == 3  # reached, never exceeded: forks wider than the room left start their branches later
    same_outputs(sorted(results, key=lambda r: r.prompt_index), ample)


class EosInABranch:
    """Prompt 0 forks 3 branches and its first branch writes EOS (the request ends as
    invalid_schema with two branches still open); prompt 1 forks 3 branches after ``prefix``
    tokens, so for some prefixes it forks in the very step prompt 0 ends."""

    def __init__(self, tok, prefix: int):
        self.eos = tok.eos_token_id
        self.ending = StructureForcer(tok, [[10, 10, 10]])
        self.other = StructureForcer(tok, [[6, 6, 6]], prefix_tokens=prefix)

    def __call__(self, stream, logits):
        if stream.prompt_index == 1:
            return self.other(stream, logits)
        if stream.kind == "branch" and stream.branch == 1 and len(stream.segment) >= 6:
            out = torch.full_like(logits, float("-inf"))
            out[self.eos] = 0.0
            return out
        return self.ending(stream, logits)


@pytest.mark.parametrize("prefix", range(6))
def test_a_request_ending_with_open_branches_frees_its_stream_rows_at_once(tiny_llama, prefix):
    """Regression (fresh-clone tiny pipeline, zero_eval): a request that ended mid-block held its
    branches' seen-token rows until the end of the step, while the live-stream count had already
    let another request open branches in its place: ``pop from empty list`` at max_num_seqs."""
    model, tok = tiny_llama
    engine = Engine(model, tok, EngineConfig(mode="parallel", debug=True, kv_cache_tokens=4096, max_num_seqs=4))
    params = SamplingParams(max_new_tokens=200, temperature=0, logits_processors=(EosInABranch(tok, prefix),))
    results = engine.generate([[1, 50, 51], [1, 60, 61]], params)
    assert [r.finish_reason for r in results] == ["invalid_schema", "eos"]
    assert results[1].branches_per_block == [3]
    assert sorted(engine.scheduler._free_seen) == list(range(4))
    engine.pool.assert_empty()


def test_cancel_frees_the_kv_and_reports_the_request(tiny_llama):
    model, tok = tiny_llama
    params = SamplingParams(max_new_tokens=300, temperature=0, logits_processors=(PerPrompt(tok),))
    engine = Engine(model, tok, EngineConfig(debug=True, kv_cache_tokens=8192, max_num_seqs=2))
    engine.submit(PROMPTS[:3], params)
    for _ in range(12):
        engine.step()
    assert len(engine.scheduler.running) == 2 and len(engine.scheduler.waiting) == 1  # prompt 2 is queued
    used = engine.pool.used_blocks
    assert engine.cancel(1) == 1 and engine.cancel(2) == 1 and engine.cancel(7) == 0
    assert engine.pool.used_blocks < used
    event = engine.step()
    cancelled = sorted(r.prompt_index for r in event.finished if r.finish_reason == "cancelled")
    assert cancelled == [1, 2]
    rest = [r for r in event.finished if r.finish_reason != "cancelled"]
    while engine.has_work():
        rest += engine.step().finished
    engine.pool.assert_empty()
    _, alone = run(tiny_llama, params, prompts=PROMPTS[:1])
    same_outputs(rest, alone)


def test_deltas_reassemble_the_results(tiny_llama):
    _, tok = tiny_llama
    model, tok = tiny_llama
    params = SamplingParams(max_new_tokens=300, temperature=1.0, n=2, logits_processors=(PerPrompt(tok),))
    engine = Engine(model, tok, EngineConfig(debug=True, kv_cache_tokens=16 * 20))  # preemptions add no deltas
    pieces: dict[tuple[int, int], dict[int, list[int]]] = {}
    where: dict[tuple[int, int, int], tuple[int, int]] = {}
    results = []
    for event in engine.generate_stream(PROMPTS[:4], params):
        results += event.finished
        for d in event.deltas:
            pieces.setdefault((d.prompt_index, d.sample_index), {}).setdefault(d.segment, []).extend(d.token_ids)
            key = (d.prompt_index, d.sample_index, d.segment)
            assert where.setdefault(key, (d.block, d.branch)) == (d.block, d.branch)
    assert len(results) == 8
    for r in results:
        segments = pieces[(r.prompt_index, r.sample_index)]
        assert sum((segments[i] for i in sorted(segments)), []) == r.token_ids
        mine = [(b, k) for (p, s, _), (b, k) in sorted(where.items()) if (p, s) == (r.prompt_index, r.sample_index)]
        branches = [(b, k) for b, k in mine if k]
        assert branches == [(b + 1, k + 1) for b, block in enumerate(r.blocks) for k in range(len(block))]
    assert sum(r.stats.preemptions for r in results) > 0


def test_seeded_sampling_ignores_batch_mode_and_preemption(tiny_qwen3):
    _, tok = tiny_qwen3
    params = SamplingParams(
        max_new_tokens=300, temperature=1.0, top_p=0.8, top_k=40, n=2, seed=11, logits_processors=(PerPrompt(tok),)
    )
    _, reference = run(tiny_qwen3, params, mode="parallel")
    _, sequential = run(tiny_qwen3, params, mode="sequential")
    _, tight = run(tiny_qwen3, params, mode="parallel", kv_cache_tokens=16 * 16, max_num_seqs=4)
    same_outputs(sequential, reference)
    same_outputs(tight, reference)
    _, alone = run(tiny_qwen3, params, prompts=PROMPTS[:2])  # prompt indices 0, 1: same seeds
    same_outputs(alone, reference[:4])


# ----------------------------------------------------------------------------- shared prompt prefixes

HEAD = [1] + [40 + i % 30 for i in range(39)]  # 40 tokens: 2 whole pages of 16 (32 tokens) can be shared
SHARING = [
    HEAD + [72, 73, 201],
    HEAD + [80, 201],
    HEAD[:33],
    HEAD + [90, 91, 92, 93, 94, 201],
    [1, 60, 61, 201],
    HEAD + [110, 201],
]  # the 3rd holds 1 token past the pages; the 5th shares nothing


def fed_tokens(model_tok, params, prompts, **cfg):
    """Results and the tokens fed to the model over the run."""
    model, tok = model_tok
    engine = Engine(model, tok, EngineConfig(debug=True, **{"kv_cache_tokens": 8192, **cfg}))
    engine.submit(prompts, params)
    results, fed = [], 0
    while engine.has_work():
        event = engine.step()
        results += event.finished
        fed += event.tokens
    engine.pool.assert_empty()
    return sorted(results, key=lambda r: (r.prompt_index, r.sample_index)), fed


@pytest.mark.parametrize("mode, temperature", [("parallel", 1.0), ("sequential", 0.0), ("plain", 1.0)])
def test_prompts_sharing_whole_pages_prefill_them_once_and_decode_the_same(tiny_llama, mode, temperature):
    """The pages five prompts begin with are stored and fed once, and every sample equals the one decoded
    with private prompts: 4 x 32 tokens fewer fed, nothing else changed."""
    _, tok = tiny_llama
    params = SamplingParams(
        max_new_tokens=120, temperature=temperature, top_p=0.9, n=2, seed=3, logits_processors=(PerPrompt(tok),)
    )
    private, fed_private = fed_tokens(tiny_llama, params, SHARING, mode=mode, share_prompt_prefix=False)
    shared, fed_shared = fed_tokens(tiny_llama, params, SHARING, mode=mode)
    same_outputs(shared, private)
    assert fed_private - fed_shared == 4 * 32


def test_a_shared_prefix_survives_preemption_and_cancellation(tiny_llama):
    """A pool of 14 pages preempts requests whose prompts share a prefix: the prefix leaves the pool with
    its last resident reader and is fed again for the next; outputs equal the ample pool's, and
    cancelling every reader but one (queued or running) frees all of its pages."""
    _, tok = tiny_llama
    params = SamplingParams(
        max_new_tokens=300, temperature=1.0, top_p=0.9, n=2, seed=5, logits_processors=(PerPrompt(tok),)
    )
    _, ample = run(tiny_llama, params, prompts=SHARING)
    engine, small = run(tiny_llama, params, prompts=SHARING, kv_cache_tokens=16 * 14)
    same_outputs(small, ample)
    assert sum(r.stats.preemptions for r in small) >= 3
    model, _ = tiny_llama
    engine = Engine(model, tok, EngineConfig(debug=True, kv_cache_tokens=8192, max_num_seqs=4))
    engine.submit(SHARING, params)
    for _ in range(8):
        engine.step()
    assert engine.scheduler.waiting  # some prompts are still queued
    for index in (0, 1, 2, 4, 5):
        engine.cancel(index)
    rest = []
    while engine.has_work():
        rest += [r for r in engine.step().finished if r.finish_reason != "cancelled"]
    engine.pool.assert_empty()
    same_outputs(rest, [r for r in ample if r.prompt_index == 3])


def test_prompts_submitted_one_at_a_time_share_with_the_one_before(tiny_llama):
    """Prompts submitted singly (a server's requests) share the whole pages they begin with from the
    second one on, and a later prompt finds the remembered prefix; a prompt that shares no page gets none."""
    model, tok = tiny_llama
    engine = Engine(model, tok, EngineConfig(block_size=16, kv_cache_tokens=8192))
    params = SamplingParams(max_new_tokens=4, temperature=0)
    for i, p in enumerate([SHARING[0], SHARING[1], SHARING[4], SHARING[3]]):
        engine.submit([p], params, first_index=i)
    groups = list(engine.scheduler.waiting)
    assert groups[0].prefix is None and groups[2].prefix is None
    assert groups[1].prefix is groups[3].prefix and groups[1].prefix.tokens == HEAD[:32]
    assert groups[3].prompt.start_pos == 32 and groups[3].prompt.tokens == SHARING[3][32:]
