"""vLLM's extra sampling fields: the logits processors against hand-computed rows, and the text options."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from npr.engine import StreamDelta
from npr.models import load_tokenizer
from npr.serve.app import Api
from npr.serve.protocol import ApiError, parse_chat_request, parse_completion_request
from npr.serve.sampling import MinP, MinTokens, RepetitionPenalty, request_processors
from npr.serve.stream import SampleStream

TOK = load_tokenizer("tiny-random-llama")
EOS = frozenset({TOK.eos_token_id})
MESSAGES = [{"role": "user", "content": "What is 2 + 3?"}]


class FakeRequest(SimpleNamespace):
    """Hashable by identity and weak-referenceable, as the engine's ``Request``."""

    __hash__ = object.__hash__


def view(prompt=(), segments=(), used=0, temperature=1.0):
    """A stream as processors see it: its request's prompt, response segments, budget used and temperature."""
    request = FakeRequest(
        group=SimpleNamespace(prompt_ids=list(prompt)),
        used=used,
        segments=[SimpleNamespace(id=i, tokens=list(t)) for i, t in enumerate(segments)],
        params=SimpleNamespace(temperature=temperature),
    )
    return SimpleNamespace(request=request)


def test_repetition_penalty_divides_seen_positives_and_multiplies_seen_negatives():
    stream = view(prompt=[1], segments=[[2]])
    penalty = RepetitionPenalty(2.0)
    out = penalty(stream, torch.tensor([3.0, 3.0, -3.0, 1.0, -1.0]))
    assert out.tolist() == [3.0, 1.5, -6.0, 1.0, -1.0]  # 1 (prompt) and 2 (generated) penalised, 0, 3, 4 not
    stream.request.segments[0].tokens.append(3)  # the table follows new tokens
    stream.request.segments.append(SimpleNamespace(id=7, tokens=[4]))  # and new segments (a branch)
    assert penalty(stream, torch.tensor([3.0, 3.0, -3.0, 1.0, -1.0])).tolist() == [3.0, 1.5, -6.0, 0.5, -2.0]


def test_min_tokens_masks_eos_until_enough_tokens():
    row = torch.zeros(6)
    assert MinTokens(4, frozenset({5}))(view(used=3), row.clone())[5] == -math.inf
    assert MinTokens(4, frozenset({5}))(view(used=4), row.clone())[5] == 0.0


def test_min_p_hand_computed():
    logits = torch.tensor([0.0, math.log(0.5), math.log(0.05)])  # probabilities 1 : 0.5 : 0.05 of the top one
    assert MinP(0.1)(view(), logits.clone()).isinf().tolist() == [False, False, True]
    assert not MinP(0.1)(view(temperature=2.0), logits.clone()).isinf().any()  # at T=2: 0.05 ** 0.5 = 0.22 >= 0.1
    assert not MinP(0.9)(view(temperature=0.0), logits.clone()).isinf().any()  # greedy: untouched


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-20, 20), min_size=2, max_size=30), st.floats(0.01, 1.0), st.floats(0.1, 3.0))
def test_min_p_keeps_what_vllm_keeps(values, min_p, temperature):
    """vLLM's rule: after temperature, keep p >= min_p * max p."""
    logits = torch.tensor(values, dtype=torch.float64)
    p = torch.softmax(logits / temperature, 0)
    kept = ~MinP(min_p)(view(temperature=temperature), logits.clone()).isinf()
    near = (p - min_p * p.max()).abs() < 1e-9  # on the edge: rounding may go either way
    assert ((p >= min_p * p.max()) == kept)[~near].all()


def test_request_processors_only_for_what_is_asked():
    assert request_processors(None, None, None, EOS) == () == request_processors(1.0, 0, 0.0, EOS)
    kinds = [type(p) for p in request_processors(1.2, 3, 0.1, EOS)]
    assert kinds == [RepetitionPenalty, MinTokens, MinP]


# -- the text options ---------------------------------------------------------------------------------


def main_delta(tokens: list[int]) -> StreamDelta:
    return StreamDelta(0, 0, 0, 0, 0, tuple(tokens), tuple(-0.5 for _ in tokens))


def test_include_stop_str_in_output_keeps_the_stop_string():
    tokens = TOK.encode("The answer is 5. Done", add_special_tokens=False)
    for include, expected in ((False, "The answer is"), (True, "The answer is 5.")):
        stream = SampleStream(TOK, EOS, [" 5."], include_stop=include)
        pieces = [stream.feed(main_delta([t])).content for t in tokens]
        assert stream.stopped and stream.text == "".join(pieces) == expected


def test_skip_special_tokens_drops_special_tokens_but_not_the_tags():
    start = TOK.convert_tokens_to_ids("<|im_start|>")
    tokens = TOK.encode("<guideline>a", add_special_tokens=False) + [start] + TOK.encode("b", add_special_tokens=False)
    skip = frozenset(TOK.all_special_ids) - set(TOK.convert_tokens_to_ids(["<guideline>"])) - EOS
    kept, dropped = SampleStream(TOK, EOS), SampleStream(TOK, EOS, skip_special=skip)
    for stream in (kept, dropped):
        stream.feed(main_delta(tokens))
        stream.finish(SimpleNamespace(finish_reason="eos"))
    assert kept.text == "<guideline>a<|im_start|>b" and dropped.text == "<guideline>ab"
    assert len(dropped.content_logprobs()) == len(tokens)  # the token was generated: its log-prob stays


def test_chat_template_kwargs_and_add_generation_prompt_reach_the_template():
    tok = copy.deepcopy(TOK)
    tok.chat_template = (
        "{% if greeting %}{{ greeting }}|{% endif %}{% for m in messages %}{{ m.content }}|"
        "{% endfor %}{% if add_generation_prompt %}A:{% endif %}"
    )
    api = SimpleNamespace(tokenizer=tok, config=SimpleNamespace(system_prompt="none"))
    prompt = lambda **kw: tok.decode(Api.chat_prompt(api, parse_chat_request({"messages": MESSAGES, **kw})))  # noqa
    assert prompt() == "What is 2 + 3?|A:"
    assert prompt(add_generation_prompt=False) == "What is 2 + 3?|"
    assert prompt(chat_template_kwargs={"greeting": "hi"}) == "hi|What is 2 + 3?|A:"


@pytest.mark.parametrize(
    "body,param,words",
    [
        ({"repetition_penalty": 0}, "repetition_penalty", "greater than 0"),
        ({"repetition_penalty": "1.1"}, "repetition_penalty", "valid number"),
        ({"min_p": 1.5}, "min_p", "less than or equal to 1"),
        ({"min_tokens": -1}, "min_tokens", "greater than or equal to 0"),
        ({"ignore_eos": "yes"}, "ignore_eos", "valid boolean"),
        ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs.tokenize", "set by the server"),
        (
            {"chat_template_kwargs": {"add_generation_prompt": False}},
            "chat_template_kwargs.add_generation_prompt",
            "top level",
        ),
        ({"chat_template_kwargs": [1]}, "chat_template_kwargs", "valid dictionary"),
        (
            {"stream": True, "stream_options": {"continuous_usage_stats": 1}},
            "stream_options.continuous_usage_stats",
            "valid boolean",
        ),
        ({"top_logprobs": 3}, "top_logprobs", "needs logprobs: true"),
    ],
)
def test_bad_extra_fields_name_the_field(body, param, words):
    with pytest.raises(ApiError) as info:
        parse_chat_request({"messages": MESSAGES, **body})
    assert info.value.status == 400 and info.value.param == param and words in info.value.message


def test_completions_take_the_extras_but_not_chat_template_fields():
    request = parse_completion_request(
        {
            "prompt": "x",
            "min_p": 0.1,
            "ignore_eos": True,
            "skip_special_tokens": True,
            "include_stop_str_in_output": True,
            "repetition_penalty": 1.1,
        }
    )
    assert request.min_p == 0.1 and request.ignore_eos
    with pytest.raises(ApiError, match="Unrecognized"):
        parse_completion_request({"prompt": "x", "chat_template_kwargs": {}})
