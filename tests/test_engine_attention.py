"""Both attention kernels (flex reading the paged pool in place, SDPA over gathered pages) against one
flat masked training forward, on random trees whose forks and joins fall in the same steps as other
requests' decode rows; and the mask rule against ``npr.masks`` directly.

The flex kernel is compiled once per process (dynamic shapes, padded calls): ~30 s on a busy 2-core
CPU, the bulk of this file's time.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from npr.engine import Engine, EngineConfig, SamplingParams, StructureForcer
from npr.engine.attention import tree_rule
from npr.masks import parallel_mask_and_positions
from tests.test_engine import flat_logprobs

TOL = 1e-4


class RandomTrees:
    """Per prompt, a random forced tree: 1-2 blocks of 1-4 branches of 1-12 tokens, a random prefix."""

    def __init__(self, tok, seed: int, prompts: int):
        rng = random.Random(seed)
        self.forcers = [
            StructureForcer(
                tok,
                [[rng.randint(1, 12) for _ in range(rng.randint(1, 4))] for _ in range(rng.randint(1, 2))],
                prefix_tokens=rng.randint(0, 9),
            )
            for _ in range(prompts)
        ]

    def __call__(self, stream, logits):
        return self.forcers[stream.prompt_index](stream, logits)


def staggered(engine: Engine, prompts, params, every: int = 3) -> list:
    """Submit one prompt every ``every`` steps, so prefills, forks and joins meet decode rows.
    ``params``: one ``SamplingParams`` for all prompts, or a list of one per prompt."""
    results, pending, step = [], list(enumerate(prompts)), 0
    while pending or engine.has_work():
        if pending and step % every == 0:
            index, prompt = pending.pop(0)
            engine.submit([prompt], params[index] if isinstance(params, list) else params, first_index=index)
        results += engine.step().finished
        step += 1
    return sorted(results, key=lambda r: (r.prompt_index, r.sample_index))


@pytest.mark.parametrize("kernel", ["sdpa", "flex"])
@pytest.mark.parametrize("which", ["tiny_llama", "tiny_qwen3"])
def test_kernels_equal_the_flat_masked_forward(which, kernel, request):
    model, tok = request.getfixturevalue(which)
    rng = random.Random(17)
    prompts = [[1] + [rng.randrange(3, 250) for _ in range(rng.randint(2, 40))] for _ in range(5)]
    params = SamplingParams(
        max_new_tokens=300, temperature=1.0, n=2, seed=1, logits_processors=(RandomTrees(tok, 4, len(prompts)),)
    )
    # a pool of 40 pages also preempts: re-prefills join the mix
    engine = Engine(model, tok, EngineConfig(attention=kernel, debug=True, kv_cache_tokens=16 * 40, max_num_seqs=8))
    results = staggered(engine, prompts, params)
    assert len(results) == 10 and all(r.finish_reason == "eos" for r in results)
    assert sum(r.stats.parallel_blocks for r in results) >= 10
    worst = 0.0
    for r in results:
        flat = flat_logprobs(model, tok, r)
        worst = max(worst, max(abs(a - b) for a, b, s in zip(flat, r.logprobs, r.sampled) if s))
    assert worst <= TOL, f"max abs diff {worst:.2e}"


def test_flex_and_sdpa_decode_the_same_tokens(tiny_qwen3):
    model, tok = tiny_qwen3
    params = SamplingParams(max_new_tokens=300, temperature=0, logits_processors=(RandomTrees(tok, 9, 3),))
    prompts = [[1, 70, 71], [1, 80, 81, 82, 83], [1, 90]]
    out = {
        k: Engine(model, tok, EngineConfig(attention=k, kv_cache_tokens=16 * 40, max_num_seqs=8)).generate(
            prompts, params
        )
        for k in ("flex", "sdpa")
    }
    assert [r.token_ids for r in out["flex"]] == [r.token_ids for r in out["sdpa"]]


def test_the_rule_is_the_training_mask():
    """``tree_rule`` over a hand-built page table equals ``npr.masks`` on the flat sequence.

    Segments (id: tokens): prompt 1: 3, main 2: 6 (frozen at the fork), branches 3: 4 and 4: 2
    (fork threshold 3), takeaway 5: 3. Pages of 4 tokens."""
    page_size = 4
    lengths = {1: 3, 2: 6, 3: 4, 4: 2, 5: 3}
    fork = {1: 1, 2: 2, 3: 3, 4: 3, 5: 5}
    page_seg, page_start, page_valid, slot_of = [], [], [], []
    for seg, n in lengths.items():  # flat order = creation order = canonical order
        for start in range(0, n, page_size):
            page_seg.append(seg)
            page_start.append(start)
            page_valid.append(min(page_size, n - start))
        slot_of += [
            (len(page_seg) - math.ceil(n / page_size) + i // page_size) * page_size + i % page_size for i in range(n)
        ]
    tables = [torch.tensor(t, dtype=torch.int32) for t in (page_seg, page_start, page_valid)]
    segs = torch.tensor([seg for seg, n in lengths.items() for _ in range(n)])
    offs = torch.tensor([i for n in lengths.values() for i in range(n)])
    forks = torch.tensor([fork[seg] for seg, n in lengths.items() for _ in range(n)])
    allowed = tree_rule(
        *tables, page_size, segs[:, None], offs[:, None], forks[:, None], torch.tensor(slot_of)[None, :]
    )
    tags = {
        t: 100 + i
        for i, t in enumerate(
            ["<guideline>", "</guideline>", "<plan>", "</plan>", "<step>", "</step>", "<takeaway>", "</takeaway>"]
        )
    }
    ids = [
        7,
        7,
        7,
        tags["<guideline>"],
        tags["<plan>"],
        tags["</plan>"],
        tags["<plan>"],
        tags["</plan>"],
        tags["</guideline>"],
        tags["<step>"],
        8,
        8,
        tags["</step>"],
        tags["<step>"],
        tags["</step>"],
        tags["<takeaway>"],
        tags["</takeaway>"],
        9,
    ]
    reference, _ = parallel_mask_and_positions(ids, tags, response_start=3)
    assert torch.equal(allowed, reference)


@pytest.mark.parametrize("seed", range(4))
def test_the_paged_rule_is_the_rule_at_every_slot(seed):
    """``paged_rule`` (per page, then per offset) equals ``tree_rule`` at each slot of each row's pages, dead
    pages (past a row's length) seeing nothing, on random page tables and queries."""
    from npr.engine.attention import paged_rule

    g = torch.Generator().manual_seed(seed)
    pages_total, page_size, rows, width, queries = 24, 4, 5, 7, 3
    page_seg = torch.randint(0, 9, (pages_total,), generator=g, dtype=torch.int32)
    page_start = torch.randint(0, 5, (pages_total,), generator=g, dtype=torch.int32) * page_size
    page_valid = torch.randint(0, page_size + 1, (pages_total,), generator=g, dtype=torch.int32)
    pages = torch.randint(0, pages_total, (rows, width), generator=g, dtype=torch.int32)
    live = torch.arange(width)[None, :] < torch.randint(0, width + 1, (rows, 1), generator=g)
    q_seg, q_fork = (torch.randint(-1, 9, (rows, queries), generator=g, dtype=torch.int32) for _ in range(2))
    q_off = torch.randint(-1, 24, (rows, queries), generator=g, dtype=torch.int32)
    got = paged_rule(page_seg, page_start, page_valid, page_size, pages, live, q_seg, q_off, q_fork)
    slots = (pages[:, :, None].long() * page_size + torch.arange(page_size)).reshape(rows, -1)  # [G, K]
    want = tree_rule(
        page_seg,
        page_start,
        page_valid,
        page_size,
        q_seg[:, :, None],
        q_off[:, :, None],
        q_fork[:, :, None],
        slots[:, None, :],
    )
    want &= live.repeat_interleave(page_size, dim=1)[:, None, :]
    assert got.shape == want.shape and torch.equal(got, want)
    assert want.any() and not want.all()  # the draw exercises both outcomes


def test_dense_calls_split_by_padded_work():
    """SDPA pads every group of a call to its largest query count and page count; groups share a call
    only while the padded work stays within 1.25x the real work. Hand-computed (groups: row, queries,
    pages, first packed row): rows 0, 1 (1 query, 10 pages) share: 2*1*10 = 20 <= 1.25*20. Row 2
    (1 x 30) would make 3*1*30 = 90 > 1.25*50, so it starts a call; row 3 (4 x 10) would make
    2*4*30 = 240 > 1.25*70, so it starts another. Flex (not dense) keeps decode-sized groups in one call."""
    from npr.engine.attention import _buckets

    g0, g1, g2, g3 = [0, 1, 10, 0], [1, 1, 10, 1], [2, 1, 30, 2], [3, 4, 10, 3]
    assert _buckets([g3, g2, g0, g1], 32, dense=True) == [[g0, g1], [g2], [g3]]
    assert _buckets([g3, g2, g0, g1], 32, dense=False) == [[g3, g2, g0, g1]]
    big = [4, 40, 10, 7]  # over small_queries: its own call under flex too
    assert _buckets([g0, big, g1], 32, dense=False) == [[g0, g1], [big]]


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_qwen3"])
def test_shared_prefix_attention_equals_the_flat_masked_forward(which, request, monkeypatch):
    """SDPA calls that attend to the pages a prompt's samples share once per group (``SharedPrefix``),
    merged by log-sum-exp with each row's own pages, against the flat masked forward and against the
    same engine gathering every row's pages. Prompts of 2-6 pages, 3 samples each or 1, staggered so
    that calls mix groups of different prefix lengths with rows that share nothing."""
    from npr.engine import attention

    model, tok = request.getfixturevalue(which)
    plans = []
    plan = attention.SharedPrefix.plan.__func__

    def spy(cls, *args):
        made = plan(cls, *args)
        if made is not None:
            plans.append(made)
        return made

    monkeypatch.setattr(attention.SharedPrefix, "plan", classmethod(spy))
    rng = random.Random(5)
    lengths, samples = (60, 70, 25, 80, 30, 40), (3, 1, 3, 3, 1, 3)  # a lone sample shares nothing
    prompts = [[1] + [rng.randrange(3, 250) for _ in range(n)] for n in lengths]
    forcer = RandomTrees(tok, 6, len(prompts))
    params = [
        SamplingParams(max_new_tokens=300, temperature=1.0, n=n, seed=2, logits_processors=(forcer,)) for n in samples
    ]
    results = {}
    for shared in (True, False):
        engine = Engine(
            model,
            tok,
            EngineConfig(
                attention="sdpa", debug=True, kv_cache_tokens=16 * 80, max_num_seqs=12, shared_prefix_attention=shared
            ),
        )
        results[shared] = staggered(engine, prompts, params, every=4)
    used = len(plans)
    assert used >= 20, f"the shared-prefix split was used in only {used} calls"
    assert any(p.prefix_bias is not None for p in plans)  # groups of different prefix lengths in one call
    assert any(int(p.row_pos.max()) == p.groups * p.per for p in plans)  # rows that share nothing
    worst = 0.0
    for r in results[True]:
        flat = flat_logprobs(model, tok, r)
        worst = max(worst, max(abs(a - b) for a, b, s in zip(flat, r.logprobs, r.sampled) if s))
    assert worst <= TOL, f"max abs diff {worst:.2e}"
    assert [r.token_ids for r in results[True]] == [r.token_ids for r in results[False]]
