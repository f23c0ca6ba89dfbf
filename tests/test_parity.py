"""The tree mask realised by the model: a flat masked forward equals separate per-branch forwards.

Tiny random Llama and Qwen3 models built locally, fp32; max abs diff <= 1e-4.
"""

from __future__ import annotations

import random

import pytest
import torch

from npr.masks import attention_bias, parallel_mask_and_positions, scan_blocks
from npr.tokens import tag_token_ids
from tests.test_masks import random_trace

TOL = 1e-4


def _remap(ids, tag_ids):
    """random_trace uses tags 100..107; map them onto the tokenizer's tag ids."""
    from npr.schema import TAGS

    fake = {100 + i: tag_ids[t] for i, t in enumerate(TAGS)}
    return [fake.get(t, t) for t in ids]


def _flat_logits(model, ids, allowed, positions):
    out = model(
        input_ids=ids[None],
        position_ids=positions[None],
        attention_mask=attention_bias(allowed, model.dtype)[None, None],
    )
    return out.logits[0]


def _rng_traces(seed, tags, need_block=True):
    rng = random.Random(seed)
    while True:
        ids, start = random_trace(rng)
        ids = _remap(ids, tags)
        blocks = scan_blocks(ids, tags, start)
        if blocks or not need_block:
            return torch.tensor(ids), start, blocks


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_qwen3"])
@pytest.mark.parametrize("seed", range(6))
def test_flat_masked_forward_equals_per_branch_forwards(which, seed, request):
    model, tok = request.getfixturevalue(which)
    tags = tag_token_ids(tok)
    ids, start, blocks = _rng_traces(seed, tags)
    allowed, positions = parallel_mask_and_positions(ids, tags, start)
    with torch.no_grad():
        flat = _flat_logits(model, ids, allowed, positions)
        worst = 0.0
        for block in blocks:
            for s, e in block.steps:
                # prefix (with its own tree structure) + this branch alone: siblings are physically absent
                keep = torch.cat([torch.arange(block.first_step), torch.arange(s, e)])
                alone = _flat_logits(model, ids[keep], allowed[keep][:, keep], positions[keep])
                worst = max(worst, (alone[block.first_step :] - flat[s:e]).abs().max().item())
    assert worst <= TOL, f"max abs diff {worst:.2e}"


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_qwen3"])
def test_single_block_equals_plain_causal_runs(which, request):
    """Independent of the mask code: each branch run as an ordinary causal sequence."""
    model, tok = request.getfixturevalue(which)
    tags = tag_token_ids(tok)
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    prefix = enc("Q: 2+3? <guideline>\n<plan>1: count</plan>\n<plan>2: add</plan>\n</guideline>\n")
    branches = [enc("<step>\n1: 2, 3, 4, 5\n</step>\n"), enc("<step>\n2: 2+3 is 5, done\n</step>\n")]
    ids = torch.tensor(prefix + branches[0] + branches[1] + enc("<takeaway>5</takeaway>\\boxed{5}"))
    allowed, positions = parallel_mask_and_positions(ids, tags, response_start=0)
    with torch.no_grad():
        flat = _flat_logits(model, ids, allowed, positions)
        offset = len(prefix)
        for branch in branches:
            alone = model(input_ids=torch.tensor([prefix + branch])).logits[0, len(prefix) :]
            diff = (alone - flat[offset : offset + len(branch)]).abs().max().item()
            assert diff <= TOL, f"max abs diff {diff:.2e}"
            offset += len(branch)


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_qwen3"])
def test_takeaway_logits_same_under_sdpa_and_eager(which, request):
    model, tok = request.getfixturevalue(which)
    tags = tag_token_ids(tok)
    ids, start, blocks = _rng_traces(11, tags)
    allowed, positions = parallel_mask_and_positions(ids, tags, start)
    try:
        with torch.no_grad():
            model.set_attn_implementation("sdpa")
            sdpa = _flat_logits(model, ids, allowed, positions)
            model.set_attn_implementation("eager")
            eager = _flat_logits(model, ids, allowed, positions)
    finally:
        model.set_attn_implementation("sdpa")
    t = blocks[-1].takeaway
    assert (sdpa[t:] - eager[t:]).abs().max().item() <= TOL
    assert (sdpa - eager).abs().max().item() <= TOL


def test_mask_changes_the_result(tiny_llama):
    """Guard against a mask that is silently ignored: without it the branches differ."""
    model, tok = tiny_llama
    tags = tag_token_ids(tok)
    ids, start, blocks = _rng_traces(3, tags)
    assert any(len(b.steps) > 1 for b in blocks)
    allowed, positions = parallel_mask_and_positions(ids, tags, start)
    causal = torch.ones_like(allowed).tril()
    with torch.no_grad():
        tree = _flat_logits(model, ids, allowed, positions)
        plain = _flat_logits(model, ids, causal, positions)
    assert (tree - plain).abs().max().item() > 1e-3
