"""The tree-attention override of verl's actor: its log-probs equal npr's (fp32, <= 1e-5) in verl's layout."""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import pytest
import torch
from tensordict import TensorDict
from verl.utils import tensordict_utils as tu
from verl.workers.config import FSDPActorConfig, PolicyLossConfig
from verl.workers.engine.base import EngineRegistry
from verl.workers.utils.losses import ppo_loss
from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding

import npr.integrations.verl  # noqa: F401  (registers npr_papo)
from npr.algos import papo_loss
from npr.errors import NprError
from npr.integrations.verl.actor import NprTreeFSDPEngine, check_micro_batch, tree_log_probs, use_tree_actor
from npr.tokens import tag_token_ids
from npr.train.logprobs import causal_sequence, response_logprobs, structured_sequence

TRACE = (
    "<guideline>\n<plan>1: tens</plan>\n<plan>2: units</plan>\n</guideline>\n<step>\n1: 20+30=50\n</step>\n"
    "<step>\n2: 3+4=7 and more\n</step>\n<takeaway>\n57\n</takeaway>\nSo \\boxed{57}."
)
SAMPLES = [
    ("Q: 23+34?\n", TRACE),
    ("Q: what is 2+2?\n", "It is \\boxed{4}."),
    ("Q: 1?\n", TRACE.replace("57", "58")),
    ("Q: bad\n", "<guideline>\n<plan>1: a</plan>\n<step>"),
]


@pytest.fixture(scope="module")
def qwen(tiny_qwen3):
    model, tok = tiny_qwen3
    return model.eval(), tok


def verl_batch(tok, width_prompt: int = 24, width_response: int = 128) -> TensorDict:
    """The samples as verl's trainer holds them: left-padded prompts, right-padded responses + EOS."""
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    b = len(SAMPLES)
    prompts = torch.zeros(b, width_prompt, dtype=torch.long)
    responses = torch.zeros(b, width_response, dtype=torch.long)
    attention = torch.zeros(b, width_prompt + width_response, dtype=torch.long)
    for i, (p, r) in enumerate(SAMPLES):
        p, r = enc(p), enc(r) + [tok.eos_token_id]
        prompts[i, width_prompt - len(p) :] = torch.tensor(p)
        responses[i, : len(r)] = torch.tensor(r)
        attention[i, width_prompt - len(p) : width_prompt + len(r)] = 1
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    gen = torch.Generator().manual_seed(0)
    data = TensorDict(
        {
            "prompts": prompts,
            "responses": responses,
            "input_ids": torch.cat([prompts, responses], 1),
            "attention_mask": attention,
            "position_ids": position_ids,
            "response_mask": attention[:, width_prompt:].float(),
            "old_log_probs": -torch.rand(b, width_response, generator=gen),
            "advantages": torch.randn(b, 1, generator=gen).expand(b, width_response) * attention[:, width_prompt:],
        },
        batch_size=[b],
    )
    return left_right_2_no_padding(data)


def npr_reference(model, tok):
    tags = tag_token_ids(tok)
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    seqs = []
    for p, r in SAMPLES:
        try:
            seqs.append(structured_sequence(enc(p), enc(r) + [tok.eos_token_id], tags))
        except ValueError:
            seqs.append(causal_sequence(enc(p), enc(r) + [tok.eos_token_id]))
    return response_logprobs(model, seqs, tok.pad_token_id or 0, attention="dense")


def test_tree_log_probs_equal_npr_in_verl_layout(qwen):
    model, tok = qwen
    data = verl_batch(tok)
    prompt_lens = data["attention_mask"][:, : data["prompts"].shape[1]].sum(1).tolist()
    with torch.no_grad():
        scored = tree_log_probs(model, data["input_ids"], prompt_lens, tag_token_ids(tok), attention="dense")
        reference, mask = npr_reference(model, tok)
    assert scored.causal_fallbacks == 1 and scored.entropy is None  # the cut-off block
    got = no_padding_2_padding(scored.log_probs, data)  # verl's own slicing of the response log-probs
    width = mask.shape[1]
    assert got.dtype == torch.float32
    assert torch.allclose(got[:, :width][mask], reference[mask], atol=1e-5)
    assert torch.equal(got[:, :width][~mask], torch.zeros_like(reference[~mask]))
    # the tree matters: a causal forward over the same tokens scores the second branch differently
    with torch.no_grad():
        enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
        flat, _ = response_logprobs(
            model, [causal_sequence(enc(SAMPLES[0][0]), enc(TRACE) + [tok.eos_token_id])], 0, attention="dense"
        )
    assert (flat[0] - reference[0, : flat.shape[1]]).abs().max() > 1e-3


def actor_config() -> FSDPActorConfig:
    return FSDPActorConfig(
        strategy="fsdp",
        rollout_n=2,
        ppo_mini_batch_size=2,
        ppo_micro_batch_size_per_gpu=1,
        policy_loss=PolicyLossConfig(loss_mode="npr_papo"),
    )


def test_entropy_is_the_tree_contexts(qwen):
    """The log-prob pass's entropy (verl's metric): the tempered distribution at each tree position, checked
    against a full-logits forward of one sequence with its dense tree mask."""
    from npr.masks import attention_bias

    model, tok = qwen
    data = verl_batch(tok)
    prompt_lens = data["attention_mask"][:, : data["prompts"].shape[1]].sum(1).tolist()
    with torch.no_grad():
        scored = tree_log_probs(
            model, data["input_ids"], prompt_lens, tag_token_ids(tok), temperature=0.7, attention="dense", entropy=True
        )
        enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
        seq = structured_sequence(enc(SAMPLES[0][0]), enc(SAMPLES[0][1]) + [tok.eos_token_id], tag_token_ids(tok))
        bias = attention_bias(seq.allowed, model.dtype)[None, None]
        logits = (
            model(input_ids=seq.input_ids[None], position_ids=seq.position_ids[None], attention_mask=bias).logits[
                0, seq.response_start - 1 : -1
            ]
            / 0.7
        )  # [R, V]
        logp = logits.log_softmax(-1)
        expected = -(logp.exp() * logp).sum(-1)  # [R]
    got = no_padding_2_padding(scored.entropy, data)[0, : len(expected)]
    assert torch.allclose(got, expected, atol=1e-5)


def tree_engine(model, tok):
    engine = object.__new__(NprTreeFSDPEngine)  # FSDP set-up needs GPUs and a process group; the forward does not
    engine.module = model
    engine.model_config = SimpleNamespace(tokenizer=tok)
    engine._autocast_dtype = torch.float32
    engine.get_data_parallel_group = lambda: None
    engine.npr_attention = "dense"
    return engine


def micro_batch(tok, **flags):
    data = verl_batch(tok)
    n = int(data["response_mask"].sum())
    for key, value in {
        "dp_size": 1,
        "batch_num_tokens": n,
        "global_batch_size": len(SAMPLES),
        "temperature": 1.0,
        **flags,
    }.items():
        tu.assign_non_tensor_data(data, key, value)
    return data, n


def test_engine_forward_through_verl_ppo_loss_equals_npr(qwen):
    """verl's actor step with the override: forward_step -> verl's ppo_loss -> npr_papo, against npr's loss."""
    model, tok = qwen
    model.zero_grad()
    data, _ = micro_batch(tok)
    config = actor_config()
    loss, output = tree_engine(model, tok).forward_step(data, partial(ppo_loss, config), forward_only=False)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()

    logprobs, mask = npr_reference(model, tok)
    width = mask.shape[1]
    mask = mask & (data["response_mask"][:, :width] > 0)
    reference, _ = papo_loss(logprobs=logprobs, advantages=data["advantages"][:, :width], mask=mask)
    reference.backward()
    assert loss.item() == pytest.approx(reference.item(), abs=1e-6)
    for got, want in zip(grads, [p.grad for p in model.parameters() if p.grad is not None]):
        assert torch.allclose(got, want, atol=1e-6)
    assert output["metrics"]["actor/npr_causal_fallbacks"] == 1.0
    model.zero_grad()


@pytest.mark.parametrize(
    "flag, advice",
    [
        ("use_fused_kernels", "use_fused_kernels=False"),
        ("calculate_entropy", "entropy_coeff=0"),
        ("use_remove_padding", "use_remove_padding=True"),
    ],
)
def test_refuses_unsupported_options(qwen, flag, advice):
    _, tok = qwen
    data, _ = micro_batch(tok, **{flag: flag != "use_remove_padding"})
    with pytest.raises(NprError, match=advice):
        check_micro_batch(data, forward_only=False)
    with pytest.raises(NprError, match="ulysses_sequence_parallel_size=1"):
        check_micro_batch(micro_batch(tok)[0], ulysses_size=2)


def test_log_prob_pass_returns_entropy(qwen):
    """verl computes old log-probs with calculate_entropy=True (a metric): the forward-only pass serves it."""
    model, tok = qwen
    data, _ = micro_batch(tok, calculate_entropy=True)
    with torch.no_grad():
        _, output = tree_engine(model, tok).forward_step(data, None, forward_only=True)
    entropy = no_padding_2_padding(output["model_output"]["entropy"], data)
    assert (entropy[data["response_mask"] > 0] > 0).all()


def test_use_tree_actor_swaps_verl_engine(monkeypatch):
    saved = {b: dict(EngineRegistry._engines["language_model"][b]) for b in ("fsdp", "fsdp2")}
    monkeypatch.setenv("VERL_ENGINE_DEVICE", "cuda")
    try:
        use_tree_actor()
        assert EngineRegistry.get_engine_cls("language_model", "fsdp2") is NprTreeFSDPEngine
    finally:
        for backend, entries in saved.items():
            EngineRegistry._engines["language_model"][backend] = entries
