"""Tree attention without a dense mask: flex_attention with a BlockMask built from the tree
ids (npr.masks.tree_block_mask) against today's dense path, on seeded random trees, one
sequence per row and several packed in one row (document ids, members behind a shared
prefix). fp32 forward on CPU (torch 2.13's flex_attention has no CPU backward; the GPU check
runs the backward: benchmarks/gpu_train_check.sh)."""

from __future__ import annotations

import random

import pytest
import torch

from npr.masks import TreeIds, dense_tree_mask, tree_block_mask, tree_ids_and_positions, tree_visible
from npr.tokens import tag_token_ids
from npr.train.logprobs import (
    causal_sequence,
    concat_documents,
    pack_shared_prefix,
    resolve_attention,
    response_logits,
    response_logprobs,
    structured_sequence,
)


def random_response(rng: random.Random, tags: dict[str, int], vocab: range) -> list[int]:
    """A random well-formed response: text, 0-2 parallel blocks of 1-4 branches of random length."""
    text = lambda lo, hi: [rng.choice(vocab) for _ in range(rng.randint(lo, hi))]  # noqa: E731
    out = text(1, 6)
    for _ in range(rng.randint(0, 2)):
        k = rng.randint(1, 4)
        out += [tags["<guideline>"]]
        for _ in range(k):
            out += [tags["<plan>"], *text(1, 4), tags["</plan>"]]
        out += [tags["</guideline>"], *text(0, 2)]
        for _ in range(k):
            out += [tags["<step>"], *text(0, 24), tags["</step>"], *text(0, 2)]
        out += [tags["<takeaway>"], *text(0, 10), tags["</takeaway>"], *text(0, 3)]
    return out + text(1, 5)


def random_sequences(tok, seed: int, count: int, shared_prompt: bool):
    rng = random.Random(seed)
    tags = tag_token_ids(tok)
    vocab = range(3, 200)  # ordinary byte tokens of the tiny tokenizer
    prompt = [rng.choice(vocab) for _ in range(rng.randint(2, 12))]
    out = []
    for _ in range(count):
        p = prompt if shared_prompt else [rng.choice(vocab) for _ in range(rng.randint(2, 12))]
        response = random_response(rng, tags, vocab)
        out.append(structured_sequence(p, response, tags) if rng.random() < 0.8 else causal_sequence(p, response))
    return out


def _max_logit_error(model, sequences, pad_token_id) -> float:
    with torch.no_grad():
        dense = response_logits(model, sequences, pad_token_id, torch.float32, attention="dense")
        flex = response_logits(model, sequences, pad_token_id, attention="flex")
    assert [d.shape for d in dense] == [f.shape for f in flex]
    return max(float((d - f).abs().max()) for d, f in zip(dense, flex))


@pytest.mark.parametrize("spec", ["tiny-random-llama", "tiny-random-qwen3"])
def test_flex_logits_match_the_dense_path_on_random_trees(spec):
    """fp32: every response logit of the flex path within 1e-4 of the dense path, for single
    sequences, several independent ones packed in a row, and members packed behind a shared
    prompt inside a packed row."""
    from npr.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(spec)
    pad = tok.pad_token_id
    worst = 0.0
    for seed in range(4):
        singles = random_sequences(tok, seed, 3, shared_prompt=False)
        group = random_sequences(tok, 100 + seed, 3, shared_prompt=True)
        cases = [[s] for s in singles]  # unpacked: one sequence per row
        cases.append(singles)  # packed: three documents in one row
        cases.append([pack_shared_prefix(group), *singles[:1]])  # members behind a prompt, then a document
        for sequences in cases:
            worst = max(worst, _max_logit_error(model, sequences, pad))
    print(f"{spec}: largest |flex - dense| logit difference {worst:.2e}")
    assert worst <= 1e-4, worst
    # and the log-probs that the losses read agree too
    with torch.no_grad():
        a, mask_a = response_logprobs(model, singles, pad, attention="flex")
        b, mask_b = response_logprobs(model, singles, pad, attention="dense")
    assert torch.equal(mask_a, mask_b) and float((a - b).abs().max()) <= 1e-4


def test_block_mask_is_the_dense_rule_tile_by_tile():
    """The chunked BlockMask classifies each tile exactly as the dense mask does (empty,
    partial, full), for random packed trees and odd lengths, without an L x L tensor."""
    from npr.models import load_tokenizer

    tok = load_tokenizer("tiny-random-llama")
    for seed in range(6):
        sequences = random_sequences(tok, seed, 4, shared_prompt=seed % 2 == 0)
        row = concat_documents([pack_shared_prefix(sequences[:2]), *sequences[2:]])
        dense = dense_tree_mask(row.tree)  # [L, L]
        for block in (16, 32):
            mask = tree_block_mask(row.tree, "cpu", block_size=block, chunk_blocks=3)
            n = len(row.input_ids)
            blocks = -(-n // block)
            padded = torch.nn.functional.pad(dense, (0, blocks * block - n, 0, blocks * block - n))
            tiles = padded.view(blocks, block, blocks, block)
            any_, all_ = tiles.any(3).any(1), tiles.all(3).all(1)
            assert torch.equal(mask.to_dense()[0, 0].bool(), any_)  # partial or full
            full = torch.zeros(blocks, blocks, dtype=torch.bool)
            for q in range(blocks):
                count = int(mask.full_kv_num_blocks[0, 0, q])
                full[q, mask.full_kv_indices[0, 0, q, :count].long()] = True
            assert torch.equal(full, all_)
            q, k = torch.randint(0, n, (200,)), torch.randint(0, n, (200,))
            assert torch.equal(mask.mask_mod(0, 0, q, k), dense[q, k])


def test_tree_ids_are_linear_in_length():
    ids, positions = tree_ids_and_positions(list(range(3, 40)), {"<step>": 1}, 0)
    assert all(t.shape == (37,) for t in (ids.document, ids.member, ids.region, ids.branch, positions))
    causal = TreeIds.causal(5)
    i = torch.arange(5)
    assert torch.equal(tree_visible(i[:, None], i[None, :], causal), torch.ones(5, 5, dtype=torch.bool).tril())


def test_packed_documents_never_see_each_other(tiny_llama):
    model, tok = tiny_llama
    a, b = random_sequences(tok, 7, 2, shared_prompt=False)
    row = concat_documents([a, b])
    allowed = row.allowed
    n = len(a.input_ids)
    assert not allowed[n:, :n].any() and torch.equal(allowed[:n, :n], a.allowed)
    assert torch.equal(allowed[n:, n:], b.allowed)
    assert row.spans == (a.spans[0], (b.spans[0][0] + n, b.spans[0][1] + n))


def test_attention_rule():
    assert resolve_attention("auto", torch.device("cpu")) == "dense"
    assert resolve_attention("auto", torch.device("cuda", 0)) == "flex"
    assert resolve_attention("flex", torch.device("cpu")) == "flex"
    with pytest.raises(ValueError):
        resolve_attention("fused", torch.device("cpu"))


def test_flex_with_gradients_on_cpu_is_refused_clearly(tiny_llama):
    model, tok = tiny_llama
    seq = random_sequences(tok, 1, 1, shared_prompt=False)
    with pytest.raises(RuntimeError, match="no backward on CPU"):
        response_logprobs(model, seq, tok.pad_token_id, attention="flex")
