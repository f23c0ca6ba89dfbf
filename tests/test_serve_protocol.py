"""``npr serve`` without a server: request validation, the streamed content rule, the npr extension."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npr.engine import StreamDelta
from npr.models import load_tokenizer
from npr.serve.protocol import ApiError, parse_chat_request, parse_completion_request, parse_json_body
from npr.serve.responses import npr_extension
from npr.serve.stream import IncrementalDecoder, SampleStream

TOK = load_tokenizer("tiny-random-llama")  # byte-level: one token per byte, tags and ChatML as special tokens
EOS = frozenset({TOK.eos_token_id})
MESSAGES = [{"role": "user", "content": "What is 2 + 3?"}]

# -- request validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body,param,words",
    [
        ({"messages": MESSAGES, "temperature": "hot"}, "temperature", "valid number"),
        ({"messages": MESSAGES, "max_tokens": "10"}, "max_tokens", "valid integer"),
        ({"messages": MESSAGES, "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({"messages": MESSAGES, "n": 0}, "n", "greater than or equal to 1"),
        ({"messages": MESSAGES, "top_p": 0}, "top_p", "greater than 0"),
        ({"messages": MESSAGES, "stream": 1}, "stream", "valid boolean"),
        ({"messages": MESSAGES, "stop": 5}, "stop", "expected one of: str, list[str]"),
        ({"messages": MESSAGES, "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4 items"),
        ({"messages": MESSAGES, "stop": ["a", ""]}, "stop[1]", "at least 1 character"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "expected one of"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "'user'"),
        ({"messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages[0].name", "None"),
        ({"messages": []}, "messages", "at least 1 item"),
        ({}, "messages", "is required"),
        ({"messages": MESSAGES, "frequency_penalty": 0.5}, "frequency_penalty", "not supported"),
        ({"messages": MESSAGES, "logit_bias": {"1": 2}}, "logit_bias", "not supported"),
        ({"messages": MESSAGES, "tools": [{"type": "function"}]}, "tools", "not supported"),
        ({"messages": MESSAGES, "response_format": {"type": "json_object"}}, "response_format", "not supported"),
        ({"messages": MESSAGES, "top_logprobs": 3}, "top_logprobs", "needs logprobs: true"),
        ({"messages": MESSAGES, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "less than or equal to 20"),
        ({"messages": MESSAGES, "store": 0}, "store", "not supported"),  # 0 is not false
        ({"messages": MESSAGES, "echo": False}, "echo", "Unrecognized"),  # a completions field
        ({"messages": MESSAGES, "temprature": 0.5}, "temprature", "Unrecognized request argument supplied"),
        ({"messages": MESSAGES, "max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens", "disagree"),
    ],
)
def test_bad_chat_requests_name_the_field(body, param, words):
    with pytest.raises(ApiError) as info:
        parse_chat_request(body).budget()
    assert info.value.status == 400 and info.value.param == param and words in info.value.message
    assert info.value.body()["error"]["type"] == "invalid_request_error"


def test_neutral_values_of_unsupported_fields_are_accepted():
    request = parse_chat_request(
        {
            "messages": MESSAGES,
            "frequency_penalty": 0,
            "presence_penalty": 0.0,
            "tools": [],
            "logit_bias": None,
            "parallel_tool_calls": True,
            "response_format": {"type": "text"},
            "top_logprobs": 0,
            "user": "u1",
            "max_completion_tokens": 7,
        }
    )
    assert request.budget() == 7
    parts = parse_chat_request(
        {"messages": [{"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}
    )
    assert parts.messages[0].text() == "ab"


@pytest.mark.parametrize(
    "body,param,words",
    [
        ({"prompt": 5}, "prompt", "expected one of"),
        ({"prompt": [1, "a"]}, "prompt", "expected one of"),
        ({"prompt": "x", "logprobs": 21}, "logprobs", "less than or equal to 20"),
        ({"prompt": "x", "top_logprobs": 2}, "top_logprobs", "Unrecognized"),  # chat's field
        ({"prompt": "x", "echo": True}, "echo", "not supported"),
        ({"prompt": "x", "suffix": "y"}, "suffix", "not supported"),
        ({"prompt": "x", "best_of": 3}, "best_of", "not supported"),
        ({"prompt": "x", "tools": []}, "tools", "Unrecognized"),
    ],
)
def test_bad_completion_requests(body, param, words):
    with pytest.raises(ApiError) as info:
        parse_completion_request(body)
    assert info.value.status == 400 and info.value.param == param and words in info.value.message


def test_completion_prompts_and_default_budget():
    assert parse_completion_request({"prompt": "hi"}).budget() == 16  # OpenAI's default
    assert parse_completion_request({"prompt": [5, 6]}).prompts() == [[5, 6]]
    assert parse_completion_request({"prompt": [[5], [6, 7]], "logprobs": 0}).prompts() == [[5], [6, 7]]
    assert parse_completion_request({"prompt": ["a", "b"]}).prompts() == ["a", "b"]


@pytest.mark.parametrize(
    "raw,words", [(b"{oops", "line 1, column 2"), (b"[1, 2]", "a JSON list"), (b"\xff\xfe", "not valid JSON")]
)
def test_malformed_json(raw, words):
    with pytest.raises(ApiError) as info:
        parse_json_body(raw)
    assert info.value.status == 400 and words in info.value.message


# -- the content rule ------------------------------------------------------------------------------


def ids(text: str) -> list[int]:
    return TOK.encode(text, add_special_tokens=False)


def delta(block: int, branch: int, text: str | list[int]) -> StreamDelta:
    tokens = ids(text) if isinstance(text, str) else text
    segment = {(0, 0): 0, (1, 1): 1, (1, 2): 2, (1, 0): 3}[block, branch]  # canonical order of a 2-branch sample
    return StreamDelta(0, 0, segment, block, branch, tuple(tokens), tuple(-0.5 for _ in tokens))


MAIN0 = "So:<guideline>\n<plan>1: tens</plan>\n<plan>2: units</plan>\n</guideline>\n"
BRANCH1, BRANCH2 = "<step>\n1: twenty</step>\n", "<step>\n2: three é</step>\n"
MAIN1 = "<takeaway>\nthey add to 23\n</takeaway>\nThe answer is \\boxed{23}."


def feed_all(stream: SampleStream, deltas, result=None):
    updates = [stream.feed(d) for d in deltas]
    updates.append(stream.finish(result or SimpleNamespace(finish_reason="eos")))
    return updates


def interleaved() -> list[StreamDelta]:
    """The main line up to the fork, both branches a few tokens at a time, side by side, then the join."""
    b1, b2 = ids(BRANCH1), ids(BRANCH2)
    out = [delta(0, 0, MAIN0[:10]), delta(0, 0, MAIN0[10:])]
    for i in range(0, max(len(b1), len(b2)), 4):
        out += [delta(1, 1, b1[i : i + 4])] if b1[i : i + 4] else []
        out += [delta(1, 2, b2[i : i + 4])] if b2[i : i + 4] else []
    return out + [delta(1, 0, MAIN1[:12]), delta(1, 0, MAIN1[12:]), delta(1, 0, [TOK.eos_token_id])]


def test_branches_enter_the_content_at_the_join_in_order():
    stream = SampleStream(TOK, EOS)
    updates = feed_all(stream, interleaved())
    content = [u.content for u in updates]
    assert "".join(content) == stream.text == MAIN0 + BRANCH1 + BRANCH2 + MAIN1  # canonical; the final EOS dropped
    join = next(i for i, c in enumerate(content) if "<step>" in c)
    assert "".join(content[:join]) == MAIN0  # nothing of a branch before the join
    assert content[join].startswith(BRANCH1 + BRANCH2)
    live = {}
    for u in updates[:join]:
        for block, branch, text in u.branches:
            live[(block, branch)] = live.get((block, branch), "") + text
    assert live == {(1, 1): BRANCH1, (1, 2): BRANCH2}  # both branches streamed side by side before the join
    main = {b: [t for d in interleaved() if d.branch == 0 and d.block == b for t in d.token_ids] for b in (0, 1)}
    fed = main[0] + ids(BRANCH1) + ids(BRANCH2) + main[1][:-1]
    assert [e[0] for e in stream.content_logprobs()] == fed  # content order, the final EOS dropped
    assert stream.finish_reason() == "stop"


def test_a_finish_inside_a_block_flushes_the_open_branches_in_order():
    stream = SampleStream(TOK, EOS)
    deltas = [delta(0, 0, MAIN0), delta(1, 2, "<step>\n2: th"), delta(1, 1, "<step>\n1: tw")]
    feed_all(stream, deltas, SimpleNamespace(finish_reason="length"))
    assert stream.text == MAIN0 + "<step>\n1: tw" + "<step>\n2: th" and stream.finish_reason() == "length"


def test_an_eos_that_is_not_last_stays_in_the_content():
    stream = SampleStream(TOK, EOS)
    eos = TOK.eos_token_id
    feed_all(
        stream,
        [delta(0, 0, MAIN0), delta(1, 1, ids("<step>\n1: a") + [eos]), delta(1, 2, "<step>\n2: b")],
        SimpleNamespace(finish_reason="invalid_schema"),
    )
    assert stream.text == MAIN0 + "<step>\n1: a<|im_end|><step>\n2: b" and stream.finish_reason() == "invalid_schema"


@pytest.mark.parametrize(
    "stops,expected",
    [
        (["answer is"], MAIN0 + BRANCH1 + BRANCH2 + "<takeaway>\nthey add to 23\n</takeaway>\nThe "),
        (["three", "nothing"], MAIN0 + BRANCH1 + "<step>\n2: "),
        (["<plan>"], "So:<guideline>\n"),
    ],
)
def test_stop_strings_cut_the_content_and_never_leak(stops, expected):
    stream = SampleStream(TOK, EOS, stops)
    updates = [stream.feed(d) for d in interleaved()]
    assert stream.stopped and stream.text == expected
    assert "".join(u.content for u in updates) == expected  # held-back text never went out
    stream.finish(SimpleNamespace(finish_reason="cancelled"))
    assert stream.finish_reason() == "stop" and stream.text == expected
    assert all(e.offset < len(expected) for e in stream.content_logprobs())


def test_multibyte_characters_are_never_split():
    decoder = IncrementalDecoder(TOK)
    pieces = [decoder.push(t) for t in ids("é€")]  # 2 + 3 bytes, one token each
    assert pieces == ["", "é", "", "", "€"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(3, len(TOK) - 1), max_size=40), st.lists(st.integers(1, 5), min_size=1, max_size=10))
def test_streamed_content_equals_a_full_decode(tokens, cuts):
    """Any token sequence (broken UTF-8 and tags included), cut into any pieces: the pieces add up to decode()."""
    stream = SampleStream(TOK, EOS)
    deltas, i = [], 0
    while i < len(tokens):
        step = cuts[len(deltas) % len(cuts)]
        deltas.append(delta(0, 0, tokens[i : i + step]))
        i += step
    updates = feed_all(stream, deltas)
    assert "".join(u.content for u in updates) == stream.text == TOK.decode(tokens, skip_special_tokens=False)


# -- the npr extension -----------------------------------------------------------------------------


def test_npr_extension_tree_and_stats():
    text = MAIN0[3:] + BRANCH1 + BRANCH2 + MAIN1
    stats = SimpleNamespace(
        generated_tokens=90, critical_path_tokens=70, parallel_blocks=1, forward_passes=60, wall_time_s=1.23456
    )
    result = SimpleNamespace(
        blocks=[[(0, 5), (5, 9)]], branches_per_block=[2], stats=stats, diagnostic=None, mode="parallel"
    )
    ext = npr_extension(result, text, queued_s=0.5)
    assert ext["tree"]["blocks"] == [
        {
            "plans": ["tens", "units"],
            "branches": ["twenty", "three é"],
            "takeaway": "they add to 23",
            "executed_as_branches": True,
        }
    ]
    assert ext["tree"]["answer"] == "23" and ext["tree"]["format_valid"] is True
    assert ext["stats"] == {
        "generated_tokens": 90,
        "critical_path_tokens": 70,
        "parallel_blocks": 1,
        "branches_per_block": [2],
        "forward_passes": 60,
        "wall_time_s": 1.2346,
        "queued_s": 0.5,
        "mode": "parallel",
    }
    assert not math.isnan(ext["stats"]["wall_time_s"])


# -- round-trips --------------------------------------------------------------------------------------


def _dumped_reply(**message) -> dict:
    """An assistant message exactly as the ``openai`` client dumps a reply (``message.model_dump()``)."""
    from openai.types.chat import ChatCompletion

    reply = ChatCompletion.model_validate(
        {
            "id": "x",
            "object": "chat.completion",
            "created": 1,
            "model": "m",
            "choices": [
                {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "5", **message}}
            ],
        }
    )
    return reply.choices[0].message.model_dump()


def test_a_dumped_reply_can_be_sent_back():
    reply = _dumped_reply(reasoning_content="<guideline>…")
    assert reply["refusal"] is None and reply["tool_calls"] is None and "reasoning_content" in reply
    request = parse_chat_request({"messages": [*MESSAGES, reply, {"role": "user", "content": "And 3 + 4?"}]})
    assert [m.text() for m in request.messages] == ["What is 2 + 3?", "5", "And 3 + 4?"]
    empty = {**reply, "content": None, "tool_calls": [], "annotations": []}
    assert parse_chat_request({"messages": [*MESSAGES, empty]}).messages[1].text() == ""


@pytest.mark.parametrize(
    "field,value,words",
    [
        ("tool_calls", [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}], "no tools"),
        ("function_call", {"name": "f", "arguments": "{}"}, "no functions"),
        ("refusal", "I cannot", "never refuses"),
        ("audio", {"id": "a1"}, "text only"),
        ("annotations", [{"type": "url_citation"}], "no annotations"),
    ],
)
def test_live_values_in_a_sent_back_reply_are_refused_saying_why(field, value, words):
    with pytest.raises(ApiError) as info:
        parse_chat_request({"messages": [*MESSAGES, {**_dumped_reply(), field: value}]})
    assert info.value.status == 400 and info.value.param == f"messages[1].{field}" and words in info.value.message


@pytest.mark.parametrize(
    "message,words",
    [
        ({"role": "user", "content": None}, "needs content"),
        ({"role": "user", "content": "x", "reasoning_content": "r"}, "only for assistant"),
    ],
)
def test_null_content_and_reasoning_only_on_assistant_messages(message, words):
    with pytest.raises(ApiError) as info:
        parse_chat_request({"messages": [message]})
    assert info.value.param == "messages[0]" and words in info.value.message
