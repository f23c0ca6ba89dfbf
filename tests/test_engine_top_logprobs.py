"""``SamplingParams.top_logprobs``: each sampled position's most likely tokens, against a flat masked forward."""

from __future__ import annotations

import pytest
import torch

from npr.engine import SamplingParams
from npr.masks import attention_bias, parallel_mask_and_positions
from npr.tokens import tag_token_ids
from tests.test_engine import PROMPTS, forced, make_engine


def flat_log_softmax(model, tok, result) -> torch.Tensor:
    """[len(token_ids), V]: the log-probs at each response position of one training-style flat forward."""
    ids = torch.tensor(result.prompt_ids + result.token_ids)
    p = len(result.prompt_ids)
    allowed, positions = parallel_mask_and_positions(ids, tag_token_ids(tok), response_start=p)
    with torch.no_grad():
        logits = (
            model(
                input_ids=ids[None],
                position_ids=positions[None],
                attention_mask=attention_bias(allowed, model.dtype)[None, None],
            )
            .logits[0]
            .float()
        )
    return torch.log_softmax(logits, -1)[p - 1 : -1]


def test_top_logprobs_equal_the_flat_forward_and_only_for_requests_that_ask(tiny_llama):
    """A request asking 5 (with branches, a processor editing the logits and the in-branch repetition penalty)
    gets, at every sampled token, the 5 best (id, log-prob) of the unprocessed model; prefilled tokens get ();
    a request batched beside it that asks 2 gets 2, one that asks nothing gets None; tokens are unchanged."""
    model, tok = tiny_llama
    engine = make_engine(tiny_llama, repetition_penalty=1.1)
    processors = (forced(tok),)
    asks = {0: 5, 1: 2, 2: 0}
    for i, k in asks.items():
        engine.submit(
            [PROMPTS[i % 2]],
            SamplingParams(
                max_new_tokens=300, temperature=1.0, seed=11 + i, top_logprobs=k, logits_processors=processors
            ),
            first_index=i,
        )
    results = {}
    while engine.has_work():
        for r in engine.step().finished:
            results[r.prompt_index] = r
    assert results[2].top_logprobs is None
    plain = make_engine(tiny_llama, repetition_penalty=1.1).generate(
        [PROMPTS[0]], SamplingParams(max_new_tokens=300, temperature=1.0, seed=11, logits_processors=processors)
    )[0]
    assert plain.token_ids == results[0].token_ids
    for i in (0, 1):
        r = results[i]
        assert r.branches_per_block == [3, 2] and len(r.top_logprobs) == len(r.token_ids)
        reference = flat_log_softmax(model, tok, r)
        for pos, (sampled, top) in enumerate(zip(r.sampled, r.top_logprobs)):
            if not sampled:
                assert top == ()
                continue
            values, ids = reference[pos].topk(asks[i])
            assert [t for t, _ in top] == ids.tolist()
            assert max(abs(lp - v) for (_, lp), v in zip(top, values.tolist())) <= 1e-4
            assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)


def test_streamed_top_logprobs_add_up_to_the_result(tiny_llama):
    """The deltas' per-token tops, concatenated per segment, equal ``Result.top_logprobs``."""
    _, tok = tiny_llama
    engine = make_engine(tiny_llama)
    params = SamplingParams(
        max_new_tokens=300, temperature=1.0, seed=5, top_logprobs=3, logits_processors=(forced(tok),)
    )
    segments: dict[int, list] = {}
    result = None
    for event in engine.generate_stream([PROMPTS[0]], params):
        for d in event.deltas:
            assert len(d.top_logprobs) == len(d.token_ids)
            segments.setdefault(d.segment, []).extend(d.top_logprobs)
        result = event.finished[0] if event.finished else result
    assert [t for s in sorted(segments) for t in segments[s]] == result.top_logprobs


def test_top_logprobs_must_not_be_negative():
    from npr.engine import EngineInputError

    with pytest.raises(EngineInputError, match="top_logprobs"):
        SamplingParams(top_logprobs=-1)
