"""What ``npr serve`` needs from the engine: per-step token deltas and ``Engine.cancel``."""

from __future__ import annotations

import math

import pytest

from npr.engine import Engine, EngineConfig, SamplingParams, StructureForcer

PROMPTS = [[1, 72, 73, 74, 75, 2, 201], [1, 80, 81, 201], [1, 90, 91, 92, 201]]


def make_engine(model_tok, mode="parallel", **kw) -> Engine:
    model, tok = model_tok
    kw.setdefault("kv_cache_tokens", 8192)
    return Engine(model, tok, EngineConfig(mode=mode, debug=True, **kw))


def forced_params(tok, branch_tokens=((5, 9, 3), (4, 4)), n=1, **kw) -> SamplingParams:
    forcer = StructureForcer(tok, [list(b) for b in branch_tokens])
    return SamplingParams(
        max_new_tokens=400, temperature=kw.pop("temperature", 0), n=n, seed=3, logits_processors=(forcer,), **kw
    )


def canonical_order(key: tuple[int, int]) -> tuple[int, float]:
    """Flat order of streams: main line before block 1, branches 1..k of block 1, main line after it, ..."""
    block, branch = key
    return block, branch if branch else math.inf


def rebuild(deltas, field="token_ids") -> dict[tuple[int, int], list]:
    """Per (prompt, sample): the deltas' tokens (or log-probs) laid out segment by segment in canonical order."""
    streams: dict[tuple[int, int], dict[tuple[int, int], list]] = {}
    for d in deltas:
        streams.setdefault((d.prompt_index, d.sample_index), {}).setdefault((d.block, d.branch), []).extend(
            getattr(d, field)
        )
    return {req: [t for key in sorted(segs, key=canonical_order) for t in segs[key]] for req, segs in streams.items()}


@pytest.mark.parametrize("mode", ["parallel", "sequential", "plain"])
def test_deltas_rebuild_every_result(tiny_llama, mode):
    _, tok = tiny_llama
    engine = make_engine(tiny_llama, mode)
    engine.submit(PROMPTS[:2], forced_params(tok, n=2, temperature=1.0))
    deltas, results, steps_with_branch_deltas = [], [], 0
    while engine.scheduler.has_work():
        event = engine.step()
        deltas += event.deltas
        results += event.finished
        steps_with_branch_deltas += any(d.branch for d in event.deltas)
    rebuilt = rebuild(deltas)
    assert len(results) == 4 and all(r.finish_reason == "eos" for r in results)
    logprobs = rebuild(deltas, "logprobs")
    for r in results:
        assert rebuilt[(r.prompt_index, r.sample_index)] == r.token_ids
        assert [None if math.isnan(x) else x for x in logprobs[(r.prompt_index, r.sample_index)]] == [
            None if math.isnan(x) else x for x in r.logprobs
        ]
    if mode == "plain":
        assert {(d.block, d.branch) for d in deltas} == {(0, 0)}
    else:  # two blocks, of 3 and 2 branches, streamed while they decode, not at the end
        assert {(d.block, d.branch) for d in deltas if d.branch} == {(1, 1), (1, 2), (1, 3), (2, 1), (2, 2)}
        assert {(d.block, d.branch) for d in deltas if not d.branch} == {(0, 0), (1, 0), (2, 0)}
        assert steps_with_branch_deltas > 5
        step_open = tok.encode("<step>", add_special_tokens=False)
        first = [d for d in deltas if d.branch == 2 and d.block == 1 and d.prompt_index == 0 and d.sample_index == 0][0]
        assert list(first.token_ids[: len(step_open)]) == step_open  # prefilled scaffold tokens are reported too


def run_all(engine, results):
    while engine.scheduler.has_work():
        results += engine.step().finished
    return results


def cancel(engine, prompt_index, sample_index=None):
    """``Engine.cancel`` frees the KV at once and the next step reports the results: (count, the
    cancelled results, the other results that step finished, pages used right after the cancel)."""
    count = engine.cancel(prompt_index, sample_index)
    used = engine.pool.used_blocks
    finished = engine.step().finished
    mine = [r for r in finished if r.finish_reason == "cancelled"]
    return count, mine, [r for r in finished if r.finish_reason != "cancelled"], used


def test_cancel_running_request_frees_its_kv_now(tiny_llama):
    _, tok = tiny_llama
    params = forced_params(tok, branch_tokens=((30, 30),))
    reference = make_engine(tiny_llama).generate(PROMPTS, params)
    engine = make_engine(tiny_llama)
    engine.submit(PROMPTS, params)
    results = []
    while not any(d.branch for d in engine.step().deltas):  # until the requests are inside their block
        pass
    used = engine.pool.used_blocks
    count, cancelled, results, used_after = cancel(engine, 1)
    assert count == 1 and [(r.prompt_index, r.finish_reason) for r in cancelled] == [(1, "cancelled")]
    assert 0 < len(cancelled[0].token_ids) < len(reference[1].token_ids)
    part, whole = cancelled[0], reference[1]
    assert len(part.blocks) == 1 and len(part.blocks[0]) == 2  # cancelled inside its block: both branches open
    fork = part.blocks[0][0][0]
    assert part.token_ids[:fork] == whole.token_ids[:fork]
    for (start, end), (ref_start, _) in zip(part.blocks[0], whole.blocks[0]):  # each branch a prefix of the full one
        assert part.token_ids[start:end] == whole.token_ids[ref_start : ref_start + end - start]
    assert used_after < used  # freed before any further step
    assert engine.cancel(1) == 0 and engine.cancel(99) == 0
    run_all(engine, results)
    assert all(r.prompt_index != 1 for r in results)  # a cancelled request is not reported again
    assert [r.token_ids for r in sorted(results, key=lambda r: r.prompt_index)] == [
        reference[0].token_ids,
        reference[2].token_ids,
    ]  # the others are untouched
    assert engine.pool.used_blocks == 0


def test_cancel_queued_request(tiny_llama):
    _, tok = tiny_llama
    engine = make_engine(tiny_llama, max_num_seqs=1)
    engine.submit(PROMPTS[:2], forced_params(tok))
    engine.step()
    assert len(engine.scheduler.waiting) == 1
    count, cancelled, others, _ = cancel(engine, 1)
    assert count == 1 and [(r.prompt_index, r.finish_reason, r.token_ids) for r in cancelled] == [(1, "cancelled", [])]
    assert not engine.scheduler.waiting
    assert [r.prompt_index for r in run_all(engine, others)] == [0]
    assert engine.pool.used_blocks == 0


def test_cancel_one_sample_keeps_the_shared_prompt(tiny_llama):
    _, tok = tiny_llama
    params = forced_params(tok, n=2, temperature=1.0)
    reference = make_engine(tiny_llama).generate(PROMPTS[:1], params)
    engine = make_engine(tiny_llama)
    engine.submit(PROMPTS[:1], params)
    for _ in range(3):
        engine.step()
    count, cancelled, others, _ = cancel(engine, 0, sample_index=1)
    assert count == 1 and [r.sample_index for r in cancelled] == [1]
    results = run_all(engine, others)
    assert [(r.sample_index, r.token_ids) for r in results] == [(0, reference[0].token_ids)]
    assert engine.pool.used_blocks == 0


def test_cancel_every_request_then_the_pool_is_empty(tiny_llama):
    _, tok = tiny_llama
    engine = make_engine(tiny_llama, max_num_seqs=2)
    engine.submit(PROMPTS, forced_params(tok, n=2))
    for _ in range(4):
        engine.step()
    assert engine.pool.used_blocks > 0 and engine.scheduler.waiting
    assert sum(engine.cancel(i) for i in range(len(PROMPTS))) == 6
    assert engine.pool.used_blocks == 0  # freed at once
    cancelled = engine.step().finished
    assert len(cancelled) == 6 and {r.finish_reason for r in cancelled} == {"cancelled"}
    assert not engine.scheduler.has_work() and engine.step().finished == []
