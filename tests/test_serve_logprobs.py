"""``top_logprobs`` (chat) and ``logprobs`` k > 0 (completions) through the real ``openai`` client: vLLM's shapes,
streamed and not, against the engine's own numbers."""

from __future__ import annotations

import math

import openai
import pytest

from npr.engine import Engine, EngineConfig, SamplingParams, StructureForcer
from npr.serve import ServeConfig, create_app
from npr.serve.background import BackgroundServer
from npr.serve.protocol import parse_chat_request

MODEL = "tiny"

MESSAGES = [{"role": "user", "content": "What is 12 + 30?"}]


@pytest.fixture(scope="module")
def branched(tiny_llama):
    """Every answer forced into one block of 2 branches, so content tokens come from the main line and from branches."""
    model, tok = tiny_llama
    forcer = StructureForcer(tok, [[3, 2]], plan_tokens=1, takeaway_tokens=2, final_tokens=3, answer=None)
    engine = Engine(model, tok, EngineConfig(debug=True, kv_cache_tokens=1 << 16))
    config = ServeConfig(model_name=MODEL, system_prompt="none", logits_processors=(forcer,))
    with BackgroundServer(create_app(engine, config)) as s:
        yield s


def client(server: BackgroundServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def chat(c, **kw):
    return c.chat.completions.create(
        **{
            "model": MODEL,
            "messages": MESSAGES,
            "max_tokens": 80,
            "temperature": 1.0,
            "seed": 7,
            "logprobs": True,
            **kw,
        }
    )


def test_chat_top_logprobs_match_the_engine_streamed_and_not(branched):
    """Each sampled content token carries the k best alternatives of the engine's ``Result.top_logprobs`` (same
    texts, same numbers, best first); engine-written tokens carry []; the stream's entries equal the answer's."""
    c = client(branched)
    r = chat(c, top_logprobs=5)
    choice = r.choices[0]
    assert choice.npr["stats"]["parallel_blocks"] == 1
    entries = choice.logprobs.content
    sampled = [e for e in entries if e.logprob is not None]
    assert sampled and all(len(e.top_logprobs) == 5 for e in sampled)
    assert all(e.top_logprobs == [] for e in entries if e.logprob is None)
    for e in sampled:
        values = [t.logprob for t in e.top_logprobs]
        assert values == sorted(values, reverse=True) and values[0] <= 0
        assert e.logprob <= values[0] + 1e-6
        same = [t.logprob for t in e.top_logprobs if t.token == e.token]
        assert not same or math.isclose(same[0], e.logprob, abs_tol=1e-5)
        assert all(t.bytes == list(t.token.encode()) for t in e.top_logprobs if "\ufffd" not in t.token)
    # the engine's numbers: the same request submitted directly (ids from /tokenize)
    api = branched.server.config.app.state.api
    ids = api.chat_prompt(parse_chat_request({"messages": MESSAGES}))
    engine = api.engine
    params = SamplingParams(
        max_new_tokens=80, temperature=1.0, seed=7, top_logprobs=5, logits_processors=api.config.logits_processors
    )
    result = engine.generate([ids], params)[0]
    expected = [top for top, t in zip(result.top_logprobs, result.token_ids) if t != engine.tokenizer.eos_token_id]
    assert [[t.logprob for t in e.top_logprobs] for e in entries] == [
        pytest.approx([lp for _, lp in top], abs=1e-6) for top in expected[: len(entries)]
    ]
    streamed = []
    for chunk in chat(c, top_logprobs=5, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.content
    assert [(e.token, e.logprob, [(t.token, t.logprob) for t in e.top_logprobs]) for e in streamed] == [
        (e.token, e.logprob, [(t.token, t.logprob) for t in e.top_logprobs]) for e in entries
    ]


def test_chat_top_logprobs_limits(branched):
    c = client(branched)
    r = chat(c, top_logprobs=20, max_tokens=20)
    assert all(len(e.top_logprobs) == 20 for e in r.choices[0].logprobs.content if e.logprob is not None)
    assert all(e.top_logprobs == [] for e in chat(c, top_logprobs=0, max_tokens=20).choices[0].logprobs.content)
    with pytest.raises(openai.BadRequestError) as info:
        chat(c, top_logprobs=21)
    assert info.value.body["param"] == "top_logprobs" and "less than or equal to 20" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, top_logprobs=3)
    assert info.value.body["param"] == "top_logprobs" and "needs logprobs: true" in info.value.body["message"]


def test_completion_logprobs_k_as_vllm(branched):
    """``logprobs: k``: per token a dict of the k best alternatives' texts plus the sampled token's (vLLM's shape);
    greedy main-line tokens are their position's best; streamed chunks add up to the answer."""
    c = client(branched)
    kw = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 40, "temperature": 0, "logprobs": 3}
    r = c.completions.create(**kw)
    lp = r.choices[0].logprobs
    assert len(lp.top_logprobs) == len(lp.tokens) == len(lp.token_logprobs)
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        if logprob is None:
            assert top == {}
            continue
        assert 3 <= len(top) <= 4 and token in top and math.isclose(top[token], logprob, abs_tol=1e-6)
    streamed = {"tokens": [], "top": []}
    for chunk in c.completions.create(**kw, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed["tokens"] += chunk.choices[0].logprobs.tokens
            streamed["top"] += chunk.choices[0].logprobs.top_logprobs
    assert streamed == {"tokens": lp.tokens, "top": lp.top_logprobs}
    assert c.completions.create(**{**kw, "logprobs": 0}).choices[0].logprobs.top_logprobs is None
    with pytest.raises(openai.BadRequestError) as info:
        c.completions.create(**{**kw, "logprobs": 21})
    assert info.value.body["param"] == "logprobs"
