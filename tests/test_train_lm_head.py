"""Chunked selected log-probs (npr.train.lm_head) against the full-logits path they replace.

The reference is the path npr trained with before: ``response_logits`` ([T, V] logits at every
predicting position), fp32, divided by the temperature, ``log_softmax``, gather. fp32 tiny models
built locally, random trees from tests/test_train_attention.py, chunk sizes that do and do not
divide the token count; log-probs and every parameter's gradient within 1e-5. The flex layout
has no backward on CPU (torch 2.13): its log-probs are checked without grad here and its
gradients by benchmarks/gpu_train_check.sh on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from test_train_attention import random_sequences

from npr.train.lm_head import OutputHead, output_head, selected_logprobs
from npr.train.logprobs import pack_shared_prefix, response_logits, response_logprobs


def reference_logprobs(model, sequences, pad_token_id, temperature=1.0, attention="dense"):
    """The full-logits path: [R, T] log-probs (0 past each end) and the temperature-1 ones."""
    logits = response_logits(model, sequences, pad_token_id, attention=attention)
    targets = [s.input_ids[a:b] for s in sequences for a, b in s.spans]
    scale = temperature if temperature > 0 else 1.0
    rows = [(z.float() / scale).log_softmax(-1).gather(-1, t[:, None])[:, 0] for z, t in zip(logits, targets)]
    plain = [z.float().log_softmax(-1).gather(-1, t[:, None])[:, 0] for z, t in zip(logits, targets)]
    pad = lambda xs: torch.nn.utils.rnn.pad_sequence(xs, batch_first=True)  # noqa: E731
    return pad(rows), pad(plain)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _cases(tok, seed):
    singles = random_sequences(tok, seed, 3, shared_prompt=False)
    group = random_sequences(tok, 100 + seed, 3, shared_prompt=True)
    return [singles, [pack_shared_prefix(group), singles[0]]]


def _tiny(spec, **overrides):
    """A tiny random model of ``spec``'s architecture with config ``overrides`` (tied embeddings, ...)."""
    from transformers import AutoModelForCausalLM

    from npr.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(spec)
    if not overrides:
        return model.float().train(), tok
    config = model.config
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(1)
    return AutoModelForCausalLM.from_config(config).float().train(), tok


@pytest.mark.parametrize(
    "spec, overrides",
    [("tiny-random-llama", {}), ("tiny-random-qwen3", {}), ("tiny-random-llama", {"tie_word_embeddings": True})],
)
@pytest.mark.parametrize("temperature, chunk", [(1.0, 7), (0.7, 1024), (1.3, 1)])
def test_chunked_logprobs_and_gradients_equal_the_full_logits_path(spec, overrides, temperature, chunk):
    model, tok = _tiny(spec, **overrides)
    if overrides.get("tie_word_embeddings"):
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    pad = tok.pad_token_id
    for seed in range(2):
        for sequences in _cases(tok, seed):
            results = []
            for chunked in (True, False):
                model.zero_grad()
                if chunked:
                    logprobs, mask, plain = response_logprobs(
                        model, sequences, pad, temperature=temperature, untempered=True, chunk_size=chunk
                    )
                else:
                    logprobs, plain = reference_logprobs(model, sequences, pad, temperature)
                    mask = torch.ones_like(logprobs, dtype=torch.bool)
                weights = torch.linspace(-1.0, 2.0, logprobs.numel()).view_as(logprobs)  # every token's grad differs
                (logprobs * weights * mask).sum().backward()
                results.append((logprobs.detach(), plain, _grads(model)))
            (got, got_plain, got_grads), (ref, ref_plain, ref_grads) = results
            assert got.shape == ref.shape and not got_plain.requires_grad
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
            torch.testing.assert_close(got_plain, ref_plain, atol=1e-5, rtol=0)
            assert got_grads.keys() == ref_grads.keys()
            for name, g in ref_grads.items():
                torch.testing.assert_close(got_grads[name], g, atol=1e-5, rtol=1e-5, msg=name)


def test_flex_layout_logprobs_equal_the_full_logits_path(tiny_qwen3):
    """The flex layout (one packed row, BlockMask; compiled, forward only on CPU)."""
    model, tok = tiny_qwen3
    for sequences in _cases(tok, 3):
        with torch.no_grad():
            got, _, plain = response_logprobs(
                model, sequences, tok.pad_token_id, attention="flex", temperature=0.6, untempered=True, chunk_size=5
            )
            ref, ref_plain = reference_logprobs(model, sequences, tok.pad_token_id, 0.6, attention="flex")
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(plain, ref_plain, atol=1e-5, rtol=0)


def _full_head(hidden, head: OutputHead, temperature):
    logits = torch.nn.functional.linear(hidden, head.weight, head.bias).float() * head.scale  # [N, V]
    if head.softcap:
        logits = torch.tanh(logits / head.softcap) * head.softcap
    return logits / temperature


@pytest.mark.parametrize(
    "bias, scale, softcap", [(False, 1.0, None), (True, 1.0, None), (False, 0.0625, None), (True, 2.0, 3.0)]
)
def test_head_transforms_by_hand(bias, scale, softcap):
    """A bias, a logit scale (Cohere, Granite) and a softcap (Gemma): values, entropy and the
    gradients of hidden states, weight and bias against autograd through the full [N, V] logits."""
    torch.manual_seed(0)
    n, h, v = 11, 8, 37
    hidden = torch.randn(n, h, dtype=torch.float64) * 2
    weight = torch.randn(v, h, dtype=torch.float64)
    b = torch.randn(v, dtype=torch.float64) if bias else None
    targets = torch.randint(0, v, (n,))
    upstream = torch.randn(n, dtype=torch.float64)

    def leaves_and_head():
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, *(() if b is None else (b,)))]
        return leaves, OutputHead(leaves[1], leaves[2] if bias else None, scale, softcap)

    leaves, head = leaves_and_head()
    out = selected_logprobs(leaves[0], head, targets, temperature=0.8, chunk_size=4, untempered=True, entropy=True)
    (out.logprobs * upstream).sum().backward()
    got = [out.logprobs.detach(), *(leaf.grad for leaf in leaves)]

    leaves, head = leaves_and_head()
    full = _full_head(leaves[0], head, 0.8).log_softmax(-1)  # [N, V]
    logprobs = full.gather(-1, targets[:, None])[:, 0]  # [N]
    (logprobs * upstream).sum().backward()
    ref = [logprobs.detach().float(), *(leaf.grad for leaf in leaves)]
    plain = _full_head(hidden, head, 1.0).log_softmax(-1).gather(-1, targets[:, None])[:, 0]
    torch.testing.assert_close(out.untempered, plain.detach().float())
    torch.testing.assert_close(out.entropy, -(full.exp() * full).sum(-1).detach().float())
    assert not out.untempered.requires_grad and not out.entropy.requires_grad
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "model_type, overrides, expected",
    [
        ("gemma2", {"final_logit_softcapping": 30.0}, (1.0, 30.0)),
        ("cohere", {"logit_scale": 0.25}, (0.25, None)),
        ("granite", {"logits_scaling": 8.0}, (0.125, None)),
    ],
)
def test_models_with_a_logit_transform_match_their_own_logits(model_type, overrides, expected):
    """transformers' own forward of small random Gemma 2, Cohere and Granite models: the chunked
    path reads their softcap / scale (``output_head``) and gives log_softmax of their logits."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type,
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        **overrides,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float()
    head = output_head(model)
    assert (head.scale, head.softcap) == expected
    ids = torch.randint(0, 97, (1, 13))
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=False)
        ref = out.logits[0, :-1].float().log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
        from npr.train.logprobs import body_hidden_states

        hidden = body_hidden_states(model, input_ids=ids)[0, :-1]  # [12, H]
        got = selected_logprobs(hidden, head, ids[0, 1:], chunk_size=5).logprobs
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_a_chunk_size_below_one_is_refused():
    head = OutputHead(torch.zeros(3, 2), None)
    with pytest.raises(ValueError, match="chunk_size"):
        selected_logprobs(torch.zeros(1, 2), head, torch.zeros(1, dtype=torch.long), chunk_size=0)


def test_bf16_autocast_follows_the_full_logits_path(tiny_qwen3):
    """Under bf16 autocast the head's matmul runs in bf16 as ``lm_head`` does: the same log-probs;
    gradients within bf16 rounding (the weight's is summed over chunks in fp32)."""
    model, tok = tiny_qwen3
    model.train()
    sequences = _cases(tok, 0)[1]
    results = []
    for chunked in (True, False):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if chunked:
                logprobs, mask = response_logprobs(model, sequences, tok.pad_token_id, temperature=0.7, chunk_size=7)
            else:
                logprobs, _ = reference_logprobs(model, sequences, tok.pad_token_id, 0.7)
        (logprobs * mask).sum().backward()
        results.append((logprobs.detach(), _grads(model)))
    model.zero_grad()
    (got, got_grads), (ref, ref_grads) = results
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    for name, g in ref_grads.items():
        assert float((got_grads[name] - g).norm() / g.norm()) < 2e-2, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex_attention's backward needs CUDA (torch 2.13)")
def test_cuda_flex_layout_gradients_equal_the_full_logits_path(tiny_qwen3):
    """On a GPU (benchmarks/gpu_train_check.sh runs it): the flex layout with gradients, fp32."""
    _, tok = tiny_qwen3
    model, _ = _tiny("tiny-random-qwen3")
    model.cuda()
    from npr.train.logprobs import set_attention

    set_attention(model, "flex")
    for sequences in _cases(tok, 5):
        results = []
        for chunked in (True, False):
            model.zero_grad()
            if chunked:
                logprobs, mask = response_logprobs(model, sequences, tok.pad_token_id, temperature=0.7, chunk_size=9)
            else:
                logprobs, _ = reference_logprobs(model, sequences, tok.pad_token_id, 0.7, attention="flex")
                mask = torch.ones_like(logprobs, dtype=torch.bool)
            weights = torch.linspace(-1.0, 2.0, logprobs.numel(), device=logprobs.device).view_as(logprobs)
            (logprobs * weights * mask).sum().backward()
            results.append((logprobs.detach(), _grads(model)))
        (got, got_grads), (ref, ref_grads) = results
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
        for name, g in ref_grads.items():
            torch.testing.assert_close(got_grads[name], g, atol=1e-5, rtol=1e-5, msg=name)
