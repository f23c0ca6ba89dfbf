"""The flat masked log-prob forward, the SFT and policy-gradient updates, loss masks.

Tiny random Llama built locally, fp32. The batched forward must equal a loop over single
sequences; losses must cover response tokens only; micro-batching must not change the update.
"""

from __future__ import annotations

import pytest
import torch

from npr.algos import get_policy_loss
from npr.tokens import tag_token_ids
from npr.train.logprobs import (
    causal_sequence,
    pack_in_budget,
    pack_shared_prefix,
    response_logprobs,
    structured_sequence,
)
from npr.train.session import make_accelerator
from npr.train.update import PolicyBatch, aggregation_units, policy_backward, sft_backward

TRACE = (
    "<guideline>\n<plan>1: tens</plan>\n<plan>2: units</plan>\n</guideline>\n<step>\n1: 20+30=50\n</step>\n"
    "<step>\n2: 3+4=7 and more\n</step>\n<takeaway>\n57\n</takeaway>\nSo \\boxed{57}."
)


@pytest.fixture(scope="module")
def llama():
    from npr.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer("tiny-random-llama")
    return model.train(), tok


def _sequences(tok):
    tags = tag_token_ids(tok)
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    return [
        structured_sequence(enc("Q: 23+34?\n"), enc(TRACE) + [tok.eos_token_id], tags),
        causal_sequence(enc("Q: what is 2+2? Think.\n"), enc("It is \\boxed{4}.")),
        structured_sequence(enc("Q: 1?\n"), enc(TRACE.replace("57", "58")), tags),
    ]


def _group(tok):
    """Three responses to one prompt: two parallel traces and a plain one."""
    tags = tag_token_ids(tok)
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    prompt = enc("Q: 23+34? Answer in the parallel format.\n")
    return [
        structured_sequence(prompt, enc(TRACE) + [tok.eos_token_id], tags),
        causal_sequence(prompt, enc("57, so \\boxed{57}")),
        structured_sequence(prompt, enc(TRACE.replace("tens", "the tens digits")), tags),
    ]


def _single(model, seq):
    """Reference: one sequence, no padding, the full-logit log-softmax read at response positions."""
    from npr.masks import attention_bias

    bias = attention_bias(seq.allowed, model.dtype)[None, None]
    logits = model(input_ids=seq.input_ids[None], position_ids=seq.position_ids[None], attention_mask=bias).logits[0]
    logp = logits[:-1].float().log_softmax(-1).gather(-1, seq.input_ids[1:, None])[:, 0]  # predicts tokens 1..L-1
    return logp[seq.response_start - 1 :]


def test_batched_forward_equals_loop(llama):
    model, tok = llama
    seqs = _sequences(tok)
    with torch.no_grad():
        logprobs, mask = response_logprobs(model, seqs, tok.pad_token_id)
        assert logprobs.shape == (3, max(s.response_length for s in seqs))
        for b, seq in enumerate(seqs):
            ref = _single(model, seq)
            assert mask[b].sum() == seq.response_length
            assert torch.allclose(logprobs[b, : seq.response_length], ref, atol=1e-5)
            assert (logprobs[b, seq.response_length :] == 0).all()


def test_packed_responses_equal_separate_forwards(llama):
    """Responses packed behind one prompt copy: each sees the prompt and itself only."""
    model, tok = llama
    group = _group(tok)
    packed = pack_shared_prefix(group)
    assert len(packed.input_ids) == group[0].context_end + sum(s.response_length for s in group)
    with torch.no_grad():
        together, mask = response_logprobs(model, [packed], tok.pad_token_id)
        apart, apart_mask = response_logprobs(model, group, tok.pad_token_id)
    assert together.shape == apart.shape and torch.equal(mask, apart_mask)
    assert torch.allclose(together, apart, atol=1e-5)


def test_different_prompts_packed_behind_their_common_prefix(llama):
    """SFT examples of different problems share only the start of their prompts; packed behind
    it, each response's log-probs are those of its own forward (first token included)."""
    model, tok = llama
    seqs = _sequences(tok)
    packed = pack_shared_prefix(seqs)
    assert packed.context_end == 3  # "Q: " is all the three prompts share
    assert len(packed.input_ids) == 3 + sum(len(s.input_ids) - 3 for s in seqs)
    with torch.no_grad():
        together, mask = response_logprobs(model, [packed], tok.pad_token_id)
        apart, apart_mask = response_logprobs(model, seqs, tok.pad_token_id)
    assert torch.equal(mask, apart_mask)
    assert torch.allclose(together, apart, atol=1e-5)


def test_pack_in_budget_keeps_order_and_budget(llama):
    _, tok = llama
    group = _group(tok)
    prompt = group[0].context_end
    budget = prompt + group[0].response_length + group[1].response_length
    packs = pack_in_budget(group + _sequences(tok)[1:2], budget)
    assert [len(p.spans) for p in packs] == [2, 1, 1]  # budget splits the group; a new prompt starts a pack
    assert all(len(p.input_ids) <= budget for p in packs[:2])
    assert pack_in_budget(group, 0) == group


def test_causal_sequence_matches_plain_forward(llama):
    model, tok = llama
    seq = _sequences(tok)[1]
    with torch.no_grad():
        logprobs, _ = response_logprobs(model, [seq], tok.pad_token_id)
        logits = model(input_ids=seq.input_ids[None]).logits[0]  # no mask, no positions: HF's causal default
    ref = logits[:-1].log_softmax(-1).gather(-1, seq.input_ids[1:, None])[seq.response_start - 1 :, 0]
    assert torch.allclose(logprobs[0], ref, atol=1e-5)


def test_sft_loss_is_token_mean_nll_of_response_only(llama):
    model, tok = llama
    seqs = _sequences(tok)
    acc = make_accelerator()
    model.zero_grad()
    metrics = sft_backward(acc, model, seqs, tok.pad_token_id, micro_batch_size=2)
    with torch.no_grad():
        nll = -torch.cat([_single(model, s) for s in seqs])
    tokens = sum(s.response_length for s in seqs)
    assert metrics["tokens"] == tokens and metrics["loss"] == pytest.approx(nll.mean().item(), rel=1e-5)
    # prompt tokens carry no loss: changing a prompt token's *target* cannot be seen, but the loss
    # over a longer prompt with the same response counts the same number of tokens
    longer = causal_sequence(
        [5, 6, 7, 8, 9] + seqs[1].input_ids[: seqs[1].response_start].tolist(),
        seqs[1].input_ids[seqs[1].response_start :].tolist(),
    )
    assert sft_backward(acc, model, [longer], tok.pad_token_id, 1)["tokens"] == seqs[1].response_length
    model.zero_grad()


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _policy_batch(seqs, prefilled_at=()):
    masks = []
    for s in seqs:
        m = torch.ones(s.response_length, dtype=torch.bool)
        for i in prefilled_at:
            if i < s.response_length:
                m[i] = False
        masks.append(m)
    return PolicyBatch(seqs, masks, torch.tensor([1.0, -0.5, 0.25]), [torch.zeros(s.response_length) for s in seqs])


def test_packing_does_not_change_the_update(llama):
    model, tok = llama
    group = _group(tok)
    acc = make_accelerator()
    loss_fn = get_policy_loss("papo")
    grads = []
    for sequences in (group, [pack_shared_prefix(group)]):
        model.zero_grad()
        batch = _policy_batch(group, prefilled_at=(2,))
        batch.sequences = sequences
        policy_backward(acc, model, batch, loss_fn, "token-mean", tok.pad_token_id, 1)
        grads.append(_grads(model))
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name
    model.zero_grad()


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_micro_batching_does_not_change_the_update(llama, agg):
    model, tok = llama
    seqs = _sequences(tok)
    acc = make_accelerator()
    loss_fn = get_policy_loss("dapo", clip_high=0.28)
    grads = []
    for micro in (1, 2, 3):
        model.zero_grad()
        policy_backward(acc, model, _policy_batch(seqs), loss_fn, agg, tok.pad_token_id, micro)
        grads.append(_grads(model))
    for other in grads[1:]:
        for name in grads[0]:
            assert torch.allclose(grads[0][name], other[name], atol=1e-6), name
    model.zero_grad()


def test_policy_gradient_is_minus_advantage_grad_logprob(llama):
    """On-policy DAPO/PAPO with token-mean: loss = -Σ A_b Σ_t logπ / Σ|y| in gradient."""
    model, tok = llama
    seqs = _sequences(tok)
    batch = _policy_batch(seqs, prefilled_at=(0, 3))
    acc = make_accelerator()
    for name in ("dapo", "papo"):
        model.zero_grad()
        metrics = policy_backward(acc, model, batch, get_policy_loss(name), "token-mean", tok.pad_token_id, 2)
        got = _grads(model)
        model.zero_grad()
        logprobs = [_single(model, s) for s in seqs]
        total = sum(int(m.sum()) for m in batch.loss_masks)
        surrogate = -sum(a * lp[m].sum() for a, lp, m in zip(batch.advantages, logprobs, batch.loss_masks)) / total
        surrogate.backward()
        ref = _grads(model)
        for n in ref:
            assert torch.allclose(got[n], ref[n], atol=1e-6), (name, n)
        assert metrics["loss_units"] == total


def test_prefilled_tokens_carry_no_gradient(llama):
    """A token masked out of the loss (engine scaffold) changes nothing, whatever its advantage:
    a response with no loss token contributes no gradient at any advantage, and tokens masked
    after a response's 5 loss tokens give the gradient of those 5 tokens alone."""
    model, tok = llama
    seq, other = _sequences(tok)[0], _sequences(tok)[2]
    acc = make_accelerator()
    loss_fn = get_policy_loss("papo")
    mask = torch.zeros(seq.response_length, dtype=torch.bool)
    mask[:5] = True
    masked_out = torch.zeros(other.response_length, dtype=torch.bool)  # every token prefilled
    grads = []
    for adv in (1.0, -7.5, 40.0):  # the masked response's advantage varies; nothing else does
        model.zero_grad()
        batch = PolicyBatch(
            [seq, other],
            [mask, masked_out],
            torch.tensor([1.0, adv]),
            [torch.zeros(seq.response_length), torch.zeros(other.response_length)],
        )
        metrics = policy_backward(acc, model, batch, loss_fn, "token-mean", tok.pad_token_id, 1)
        assert metrics["loss_units"] == 5
        grads.append(_grads(model))
    assert any(g.abs().sum() > 0 for g in grads[0].values())
    for other_grads in grads[1:]:
        for n, g in other_grads.items():
            assert torch.equal(g, grads[0][n]), n
    # the same 5 loss tokens, no masked tail: the same gradient
    short = causal_sequence(
        seq.input_ids[: seq.response_start].tolist(),
        seq.input_ids[seq.response_start : seq.response_start + 5].tolist(),
    )
    model.zero_grad()
    policy_backward(
        acc,
        model,
        PolicyBatch([short], [torch.ones(5, dtype=torch.bool)], torch.tensor([1.0]), [torch.zeros(5)]),
        loss_fn,
        "token-mean",
        tok.pad_token_id,
        1,
    )
    # `short` is causal while `seq` is tree-masked, but the first 5 response tokens precede any branch
    for n, g in _grads(model).items():
        assert torch.allclose(g, grads[0][n], atol=1e-6), n
    model.zero_grad()


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_the_gradient_follows_each_advantage(llama, agg):
    """Gradients are linear in the advantages: A and 2A give gradients 2x apart, and flipping
    one response's advantage changes the gradient (the advantages really reach the loss)."""
    model, tok = llama
    seqs = _sequences(tok)
    acc = make_accelerator()
    loss_fn = get_policy_loss("papo")
    masks = [torch.ones(s.response_length, dtype=torch.bool) for s in seqs]
    engine = [torch.zeros(s.response_length) for s in seqs]
    grads = []
    for advantages in ([1.0, -0.5, 0.25], [2.0, -1.0, 0.5], [1.0, 0.5, 0.25]):
        model.zero_grad()
        policy_backward(
            acc, model, PolicyBatch(seqs, masks, torch.tensor(advantages), engine), loss_fn, agg, tok.pad_token_id, 2
        )
        grads.append(_grads(model))
    for n in grads[0]:
        assert torch.allclose(grads[1][n], 2 * grads[0][n], atol=1e-6), n
    assert any(not torch.allclose(grads[2][n], grads[0][n], atol=1e-6) for n in grads[0])
    model.zero_grad()


def test_micro_batches_cap_items_and_tokens():
    from npr.train.update import micro_batches

    assert micro_batches([5, 5, 5, 5, 5], 2) == [[0, 1], [2, 3], [4]]
    assert micro_batches([5, 5, 5, 5, 5], 10, micro_batch_tokens=12) == [[0, 1], [2, 3], [4]]
    assert micro_batches([20, 3, 3, 30, 1], 10, micro_batch_tokens=10) == [[0], [1, 2], [3], [4]]
    assert micro_batches([], 4) == []


def test_aggregation_units():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]], dtype=torch.bool)
    assert aggregation_units(mask, "token-mean") == 3.0
    assert aggregation_units(mask, "seq-mean-token-mean") == 2.0
    assert aggregation_units(mask, "seq-mean-token-sum") == 2.0


def test_segment_pieces_by_hand(llama):
    """A prefix of 3 tokens and members of 2 and 4: the prefix sees itself, each member the prefix
    and itself; a row that is not packed is one piece over all of it."""
    from npr.masks import TreeIds
    from npr.train.logprobs import TokenSequence, segment_pieces

    member = torch.tensor([-1, -1, -1, 0, 0, 1, 1, 1, 1])
    zeros, none = torch.zeros(9, dtype=torch.long), torch.full((9,), -1)
    seq = TokenSequence(torch.arange(9), TreeIds(zeros, member, none, none), torch.arange(9), 3, ((3, 5), (5, 9)))
    pieces = segment_pieces(seq, torch.float32, "cpu")
    assert [(p.start, p.end, p.key_ranges) for p in pieces] == [
        (0, 3, ((0, 3),)),
        (3, 5, ((0, 3), (3, 5))),
        (5, 9, ((0, 3), (5, 9))),
    ]
    # member 1's first token (row 5) sees the prefix and itself: keys 0, 1, 2 and 5
    assert (pieces[2].bias[0, 0, 0] == 0).tolist() == [True, True, True, True, False, False, False]
    plain = TokenSequence(torch.arange(9), TreeIds.causal(9), torch.arange(9), 3, ((3, 9),))
    assert [(p.start, p.end, p.key_ranges) for p in segment_pieces(plain, torch.float32, "cpu")] == [(0, 9, ((0, 9),))]


def test_pieces_equal_one_full_mask_forward_with_gradients(llama):
    """The dense layout's pieces against one forward of the packed row under its full L x L mask:
    the same log-probs and the same parameter gradients."""
    model, tok = llama
    packed = pack_shared_prefix(_group(tok))
    grads = []
    for pieces in (True, False):
        model.zero_grad()
        if pieces:
            logprobs, mask = response_logprobs(model, [packed], tok.pad_token_id)
            total = logprobs[mask].sum()
            values = logprobs[mask]
        else:
            values = torch.cat([_single_spans(model, packed)])
            total = values.sum()
        total.backward()
        grads.append(({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, values.detach()))
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-5)
    for name, g in grads[1][0].items():
        assert torch.allclose(grads[0][0][name], g, atol=1e-5), name
    model.zero_grad()


def _single_spans(model, seq):
    """Reference for a packed row: one forward under the full additive mask, each response's tokens
    read at its predicting positions."""
    from npr.masks import attention_bias

    bias = attention_bias(seq.allowed, model.dtype)[None, None]
    logits = model(input_ids=seq.input_ids[None], position_ids=seq.position_ids[None], attention_mask=bias).logits[0]
    logp = logits.float().log_softmax(-1)
    return torch.cat(
        [logp[seq.predictors(j)].gather(-1, seq.input_ids[a:b, None])[:, 0] for j, (a, b) in enumerate(seq.spans)]
    )
