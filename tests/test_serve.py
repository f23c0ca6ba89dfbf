"""``npr serve`` end to end: the real ``openai`` client against servers on free ports (tiny random Llama)."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

try:  # the openai client's HTTP library: httpx2 in openai >= 3, httpx before
    import httpx2 as httpx
except ImportError:
    import httpx
import openai
import pytest
from openai import OpenAI

from npr.engine import Engine, EngineConfig, StructureForcer
from npr.schema import parse
from npr.serve import ServeConfig, create_app
from npr.serve.background import BackgroundServer
from npr.tokens import tag_token_ids

MODEL = "tiny"
QUESTION = "What is 12 + 30?"


def make_server(tiny_llama, engine_kw=None, **config_kw) -> BackgroundServer:
    model, tok = tiny_llama
    engine = Engine(model, tok, EngineConfig(debug=True, **{"kv_cache_tokens": 1 << 16, **(engine_kw or {})}))
    return BackgroundServer(create_app(engine, ServeConfig(model_name=MODEL, **config_kw)))


def engine_of(server: BackgroundServer) -> Engine:
    return server.server.config.app.state.api.engine


def client(server: BackgroundServer, **kw) -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)


def wait_until_idle(server: BackgroundServer, timeout_s: float = 30.0) -> dict:
    """/health once nothing runs or waits; fails if that does not happen in time."""
    deadline = time.monotonic() + timeout_s
    while True:
        health = httpx.get(server.url + "/health").json()
        if health["running"] == 0 and health["queued"] == 0 and health["kv_blocks_used"] == 0:
            return health
        assert time.monotonic() < deadline, f"the server never went idle: {health}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def server(tiny_llama):
    """Plain server: no forcing, the NPR system prompt, small limits so the fault tests are cheap."""
    with make_server(tiny_llama, max_n=4, max_body_bytes=16384) as s:
        yield s


@pytest.fixture(scope="module")
def forced(tiny_llama):
    """Every answer forced into one block of 3 branches (of 2, 4 and 1 tokens), short so that serving 64 of them one at
    a time stays cheap; the text tokens are the model's own greedy choice."""
    forcer = StructureForcer(tiny_llama[1], [[2, 4, 1]], plan_tokens=1, takeaway_tokens=2, final_tokens=2, answer=None)
    with make_server(
        tiny_llama, {"max_num_seqs": 64, "kv_cache_tokens": 1 << 17}, system_prompt="none", logits_processors=(forcer,)
    ) as s:
        yield s


# -- the openai client ------------------------------------------------------------------------------------------


def npr_generate(capsys, *args: str) -> str:
    from npr.cli.main import main

    capsys.readouterr()
    assert main(["generate", "--model", "tiny-random-llama", "--dtype", "float32", "--prompt", QUESTION, *args]) == 0
    return capsys.readouterr().out


def test_chat_with_a_seed_equals_npr_generate(server, capsys):
    c = client(server)
    kw = dict(model=MODEL, messages=[{"role": "user", "content": QUESTION}], max_tokens=48, temperature=1.0, seed=11)
    first = c.chat.completions.create(**kw)
    again = c.chat.completions.create(**kw)
    other = c.chat.completions.create(**{**kw, "seed": 12})
    text = first.choices[0].message.content
    assert text == again.choices[0].message.content and text != other.choices[0].message.content
    two = c.chat.completions.create(**{**kw, "n": 2})
    texts = [ch.message.content for ch in two.choices]
    assert [ch.index for ch in two.choices] == [0, 1] and texts[0] == text and texts[1] != text  # sample 0 is n=1's
    assert (
        npr_generate(capsys, "--temperature", "1", "--seed", "11", "--max-new-tokens", "48", "--n", "2")
        == texts[0] + "\n" + texts[1] + "\n"
    )
    usage = two.usage
    assert usage.completion_tokens == sum(ch.npr["stats"]["generated_tokens"] for ch in two.choices)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens > 600  # the NPR instruction is in
    assert first.choices[0].finish_reason in ("stop", "length", "invalid_schema")
    assert first.object == "chat.completion" and first.model == MODEL


def test_streaming_chat_gives_the_same_text_and_usage(server):
    c = client(server)
    kw = dict(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], max_tokens=40, temperature=1.0, seed=5, n=2
    )
    whole = c.chat.completions.create(**kw)
    texts, finish, usage, roles = ["", ""], [None, None], None, set()
    for chunk in c.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            texts[ch.index] += ch.delta.content or ""
            roles.add(ch.delta.role)
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
                assert set(ch.npr) == {"tree", "stats", "finish_detail"}
    assert texts == [ch.message.content for ch in whole.choices]
    assert finish == [ch.finish_reason for ch in whole.choices] and "assistant" in roles
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_a_reply_sent_back_as_the_client_dumps_it_continues_the_chat(server):
    c = client(server)
    messages = [{"role": "user", "content": QUESTION}]
    first = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    messages += [first.choices[0].message.model_dump(), {"role": "user", "content": "Are you sure?"}]
    second = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + len("Are you sure?")
    tool_call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages[1] = {**messages[1], "tool_calls": [tool_call]}
    with pytest.raises(openai.BadRequestError) as info:
        c.chat.completions.create(model=MODEL, messages=messages, max_tokens=8)
    assert info.value.body["param"] == "messages[1].tool_calls" and "no tools" in info.value.body["message"]


def test_vllm_sampling_extras_are_honoured(server, tiny_llama):
    c = client(server)
    kw = dict(model=MODEL, messages=[{"role": "user", "content": QUESTION}], max_tokens=24)
    greedy = c.chat.completions.create(**kw, temperature=0)

    def text(r) -> str:
        return (getattr(r.choices[0].message, "reasoning_content", None) or "") + r.choices[0].message.content

    min_p_1 = c.chat.completions.create(**kw, temperature=1.0, seed=3, extra_body={"min_p": 1.0})
    assert text(min_p_1) == text(greedy)  # min_p = 1 keeps only the top token: greedy
    same = c.chat.completions.create(**kw, temperature=0, extra_body={"repetition_penalty": 1.0})
    penalised = c.chat.completions.create(**kw, temperature=0, extra_body={"repetition_penalty": 3.0})
    assert text(same) == text(greedy) != text(penalised)
    stop = text(greedy)[5:9]
    kept = c.chat.completions.create(**kw, temperature=0, stop=[stop], extra_body={"include_stop_str_in_output": True})
    assert text(kept) == text(greedy)[: text(greedy).index(stop) + len(stop)]
    bare = c.chat.completions.create(**kw, temperature=0, extra_body={"add_generation_prompt": False})
    assert bare.usage.prompt_tokens < greedy.usage.prompt_tokens
    usages = [
        chunk.usage
        for chunk in c.chat.completions.create(
            **kw, temperature=0, stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True}
        )
    ]
    assert all(u is not None for u in usages)
    assert [u.completion_tokens for u in usages] == sorted(u.completion_tokens for u in usages)
    assert usages[-1].completion_tokens == greedy.usage.completion_tokens and usages[0].prompt_tokens > 0
    eos = tiny_llama[1].eos_token_id
    tags = list(tag_token_ids(tiny_llama[1]).values())

    def eager_eos(stream, logits):  # the model would end at once, and never writes a tag: these requests sample
        logits[eos] += 1e4  # without a seed, and a random tag would end them with invalid_schema
        logits[tags] = float("-inf")
        return logits

    with make_server(tiny_llama, logits_processors=(eager_eos,)) as s:
        c = client(s)
        assert c.chat.completions.create(**kw).usage.completion_tokens == 1
        r = c.chat.completions.create(**kw, extra_body={"min_tokens": 6})
        assert r.usage.completion_tokens == 7 and r.choices[0].finish_reason == "stop"  # 6 tokens, then EOS
        r = c.chat.completions.create(**kw, extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 24 and r.choices[0].finish_reason == "length"
        r = c.completions.create(model=MODEL, prompt="Once upon", max_tokens=5, extra_body={"min_tokens": 3})
        assert r.usage.completion_tokens == 4


def test_completions_and_logprobs(server):
    c = client(server)
    r = c.completions.create(
        model=MODEL, prompt=["Once upon", "In a galaxy"], max_tokens=12, n=2, temperature=0, logprobs=0
    )
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3] and r.object == "text_completion"
    assert r.choices[0].text == r.choices[1].text  # greedy: the n samples agree
    lp = r.choices[0].logprobs
    generated = r.choices[0].npr["stats"]["generated_tokens"]
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) in (generated, generated - 1)  # - EOS
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert all(x is None or x <= 0 for x in lp.token_logprobs)
    assert r.usage.prompt_tokens == len("Once upon") + len("In a galaxy")  # one byte per token
    default = c.completions.create(model=MODEL, prompt="Once upon", temperature=0)
    assert default.choices[0].npr["stats"]["generated_tokens"] <= 16  # OpenAI's default budget
    chat = c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0, logprobs=True
    )
    entries = chat.choices[0].logprobs.content
    assert 0 < len(entries) <= chat.choices[0].npr["stats"]["generated_tokens"]
    assert all(e.logprob is None or e.logprob <= 0 for e in entries)
    streamed = ""
    for chunk in c.completions.create(model=MODEL, prompt="Once upon", max_tokens=12, temperature=0, stream=True):
        streamed += chunk.choices[0].text
    assert streamed == r.choices[0].text
    models = c.models.list().data
    assert [m.id for m in models] == [MODEL] and c.models.retrieve(MODEL).id == MODEL


def test_stop_strings_end_the_answer(server):
    c = client(server)
    kw = dict(model=MODEL, prompt="Once upon", max_tokens=30, temperature=0)
    full = c.completions.create(**kw).choices[0].text
    stop = full[5:8]
    cut = c.completions.create(**kw, stop=[stop]).choices[0]
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(**kw, stop=stop, stream=True))
    assert streamed == cut.text


# -- bad input and faults --------------------------------------------------------------------------------------


def post(server, path: str, body, **kw) -> httpx.Response:
    """POST a dict as JSON, or bytes / a generator of bytes as they are."""
    content = json.dumps(body) if isinstance(body, dict) else body
    return httpx.post(server.url + path, content=content, headers={"Content-Type": "application/json"}, **kw)


def error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.mark.parametrize(
    "body,param",
    [
        (b'{"model": "tiny", "messages": [', None),
        ({**CHAT, "temperature": "warm"}, "temperature"),
        ({**CHAT, "messages": [{"role": "user", "content": ["hi"]}]}, "messages[0].content"),
        ({**CHAT, "presence_penalty": 1.0}, "presence_penalty"),
        ({**CHAT, "stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
def test_bad_requests_get_400_naming_the_field(server, body, param):
    assert error(post(server, "/v1/chat/completions", body), 400)["param"] == param


@pytest.mark.parametrize(
    "path, body, param",
    [
        (
            "/v1/chat/completions",
            {**CHAT, "messages": [{"role": "user", "content": "hi \ud800"}]},
            "messages[0].content",
        ),
        ("/v1/chat/completions", {**CHAT, "stop": ["ok", "\udfff"]}, "stop[1]"),
        ("/v1/completions", {"model": MODEL, "prompt": "a\udc80"}, "prompt"),
    ],
)
def test_invalid_unicode_gets_400_naming_the_field(server, path, body, param):
    """Before: a lone surrogate reached the tokenizer and the server answered 500."""
    err = error(post(server, path, body), 400)
    assert err["param"] == param and err["code"] == "invalid_unicode", err
    assert err["message"].startswith(f"{param} holds a lone surrogate U+"), err


def test_unknown_model_404_and_limits_400(server):
    assert error(post(server, "/v1/chat/completions", {**CHAT, "model": "gpt-4"}), 404)["code"] == "model_not_found"
    assert error(httpx.get(server.url + "/v1/models/gpt-4"), 404)["code"] == "model_not_found"
    err = error(post(server, "/v1/completions", {"model": MODEL, "prompt": "a" * 5000}), 400)
    assert "4096" in err["message"] and "5000" in err["message"] and err["code"] == "context_length_exceeded"
    err = error(post(server, "/v1/completions", {"model": MODEL, "prompt": "a" * 100, "max_tokens": 4000}), 400)
    assert all(str(x) in err["message"] for x in (4096, 4100, 100, 4000)) and err["param"] == "max_tokens"
    assert error(post(server, "/v1/chat/completions", {**CHAT, "n": 5}), 400)["param"] == "n"
    assert error(post(server, "/v1/completions", {"model": MODEL, "prompt": [1, 99999]}), 400)["param"] == "prompt"
    assert error(httpx.get(server.url + "/v1/chat/completions"), 405)
    assert error(httpx.get(server.url + "/v2/nothing"), 404)
    wait_until_idle(server)  # nothing was queued, nothing leaked


def test_oversized_bodies_are_refused_before_parsing(server):
    big = json.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * 20000}]})
    err = error(post(server, "/v1/chat/completions", big), 413)
    assert "16384" in err["message"] and "Content-Length" in err["message"]

    def chunked():  # no Content-Length: the limit applies while reading, and the JSON is never complete
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(100):
            yield b"y" * 1000

    assert error(post(server, "/v1/chat/completions", chunked()), 413)["code"] == "body_too_large"
    wait_until_idle(server)


def test_api_key(tiny_llama):
    with make_server(tiny_llama, api_key="s3cret") as s:
        assert error(httpx.get(s.url + "/v1/models"), 401)["code"] == "invalid_api_key"
        with pytest.raises(Exception, match="401"):
            client(s, api_key="wrong").models.list()
        assert client(s, api_key="s3cret").models.list().data[0].id == MODEL
        r = client(s, api_key="s3cret").chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=3
        )
        assert r.choices[0].message.content is not None
        health = httpx.get(s.url + "/health").json()  # open, for load balancers; it says a key is needed
        assert health["auth"] is True and health["status"] == "ok"
        assert httpx.get(s.url + "/").status_code == 200


def test_a_full_queue_answers_503_with_retry_after(tiny_llama):
    forcer = StructureForcer(tiny_llama[1], [[1500, 1500]])
    with make_server(
        tiny_llama, {"max_num_seqs": 1}, max_queue=1, system_prompt="none", logits_processors=(forcer,)
    ) as s:
        c = client(s)
        long = dict(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=3100, stream=True)

        def wait_for(running: int, queued: int) -> None:
            deadline = time.monotonic() + 30
            while (h := httpx.get(s.url + "/health").json())["running"] != running or h["queued"] != queued:
                assert time.monotonic() < deadline, h
                time.sleep(0.02)

        running = c.chat.completions.create(**long)
        wait_for(running=1, queued=0)
        waiting = c.chat.completions.create(**long)
        wait_for(running=1, queued=1)  # the engine takes one request at a time (max_num_seqs=1)
        refused = post(s, "/v1/chat/completions", {**long, "stream": False})
        assert error(refused, 503)["code"] == "overloaded" and refused.headers["retry-after"] == "1"
        running.close()
        waiting.close()
        wait_until_idle(s)


# -- continuous batching, disconnects ------------------------------------------------------------------------------


def stream_answer(c: OpenAI, question: str) -> tuple[str, str, dict, int]:
    """(content, finish reason, branch text per (block, branch), extension chunks) of one streamed answer."""
    content, finish, branches, extension_chunks = "", None, {}, 0
    for chunk in c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=400, temperature=0, stream=True
    ):
        for ch in chunk.choices:
            content += (getattr(ch.delta, "reasoning_content", None) or "") + (ch.delta.content or "")
            finish = ch.finish_reason or finish
            for b in (getattr(ch, "npr", None) or {}).get("branches", []):
                extension_chunks += 1
                branches[(b["block"], b["branch"])] = branches.get((b["block"], b["branch"]), "") + b["text"]
    return content, finish, branches, extension_chunks


def test_the_reasoning_split_puts_the_trace_in_reasoning_content(forced, tiny_llama):
    """--reasoning-parser npr (the default): blocks in reasoning_content, the final text in content, streamed pieces
    adding up to the same strings; --reasoning-parser none: today's whole text in content."""
    c = client(forced)
    kw = dict(model=MODEL, messages=[{"role": "user", "content": QUESTION}], max_tokens=200, temperature=0)
    message = c.chat.completions.create(**kw).choices[0].message
    reasoning, content = message.reasoning_content, message.content
    trace = parse(reasoning + content)
    assert len(trace.blocks) == 1 and reasoning.startswith("<guideline>") and reasoning.rstrip().endswith("</takeaway>")
    assert content == trace.final and "<" not in content
    pieces = {"reasoning_content": "", "content": ""}
    for chunk in c.chat.completions.create(**kw, stream=True):
        for ch in chunk.choices:
            for key in pieces:
                pieces[key] += getattr(ch.delta, key, None) or ""
    assert pieces == {"reasoning_content": reasoning, "content": content}
    forcer = forced.server.config.app.state.api.config.logits_processors
    with make_server(tiny_llama, system_prompt="none", reasoning_parser="none", logits_processors=forcer) as raw:
        whole = client(raw).chat.completions.create(**kw).choices[0].message
    assert whole.content == reasoning + content and getattr(whole, "reasoning_content", None) is None


def test_64_concurrent_streams_equal_one_at_a_time(forced):
    """Bounded load: 64 streaming requests at once, each forced into a block of 3 branches."""
    c = client(forced, http_client=httpx.Client(limits=httpx.Limits(max_connections=80)))
    questions = [f"Question {i}: what is {i} + {2 * i}?" for i in range(64)]
    api = forced.server.config.app.state.api
    steps = api.loop.steps
    with ThreadPoolExecutor(64) as pool:
        together = list(pool.map(lambda q: stream_answer(c, q), questions))
    steps_together, steps = api.loop.steps - steps, api.loop.steps
    wait_until_idle(forced)
    alone = [stream_answer(c, q) for q in questions]
    steps_alone = api.loop.steps - steps
    assert [a[0] for a in together] == [a[0] for a in alone]  # greedy: the same text, batched or not
    assert all(f == "stop" for _, f, _, _ in together)
    assert len({a[0] for a in together}) >= 4  # the prompts differ, so do (some of) the answers
    for content, _, branches, chunks in together:
        assert sorted(branches) == [(1, 1), (1, 2), (1, 3)] and chunks >= 3
        assert "".join(branches[(1, j)] for j in (1, 2, 3)) in content  # whole, in order, at the join
    assert steps_together * 8 < steps_alone  # they shared forwards: continuous batching
    health = wait_until_idle(forced)
    assert health["kv_blocks_used"] == 0 and engine_of(forced).pool.used_blocks == 0


def test_disconnects_mid_stream_free_the_kv(tiny_llama):
    forcer = StructureForcer(tiny_llama[1], [[1500, 1500]])
    with make_server(tiny_llama, system_prompt="none", logits_processors=(forcer,)) as s:
        c = client(s, http_client=httpx.Client(limits=httpx.Limits(max_connections=20)))
        inside, checked = threading.Barrier(11), threading.Barrier(11)

        def go(i):
            stream = c.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": f"q{i}"}],
                max_tokens=3100,
                temperature=0,
                stream=True,
            )
            chunks = iter(stream)  # held until the hang-up: dropping the iterator would close the connection
            for chunk in chunks:
                if chunk.choices and getattr(chunk.choices[0], "npr", None):  # inside the block: KV held
                    break
            inside.wait()
            checked.wait()
            stream.close()  # hang up mid-stream
            del chunks

        threads = [threading.Thread(target=go, args=(i,)) for i in range(10)]
        for t in threads:
            t.start()
        inside.wait()
        health = httpx.get(s.url + "/health").json()
        checked.wait()
        assert health["running"] == 10 and health["kv_blocks_used"] > 0
        for t in threads:
            t.join()
        health = wait_until_idle(s, timeout_s=10)
        assert engine_of(s).pool.used_blocks == 0
        assert health["generated_tokens"] < 10 * 3000 / 4  # cancelled long before they could finish
        with pytest.raises(httpx.ReadTimeout):  # a client that gives up on a non-streamed answer
            post(s, "/v1/chat/completions", {**CHAT, "max_tokens": 3100}, timeout=1.0)
        wait_until_idle(s, timeout_s=10)


def test_an_engine_failure_fails_its_requests_and_the_server_goes_on(tiny_llama):
    failures = []

    def fail_once(stream, logits):
        if not failures:
            if len(stream.tokens) == 3:
                failures.append(stream.prompt_index)
                raise RuntimeError("boom")
            logits[ending] = float("-inf")  # the random model must not end the request before the failure
        return logits

    with make_server(tiny_llama, system_prompt="none", logits_processors=(fail_once,)) as s:
        ending = [*engine_of(s).scaffold.eos_ids, *engine_of(s).scaffold.tag_of]  # EOS, and a misplaced tag
        err = error(post(s, "/v1/chat/completions", {**CHAT, "max_tokens": 20}), 500)
        assert err["code"] == "engine_error" and "boom" in err["message"]
        assert client(s).chat.completions.create(**{**CHAT, "max_tokens": 5}).choices[0].message.content is not None
        assert wait_until_idle(s)["status"] == "ok" and engine_of(s).pool.used_blocks == 0


def test_draining_refuses_new_requests_and_cancels_after_the_timeout(tiny_llama):
    """What SIGINT/SIGTERM do (npr serve's signal handler calls EngineLoop.drain; tests/test_serve_cli.py)."""
    forcer = StructureForcer(tiny_llama[1], [[1500, 1500]])
    with make_server(tiny_llama, system_prompt="none", logits_processors=(forcer,)) as s:
        c = client(s)
        stream = c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=3100, temperature=0, stream=True
        )
        chunks = iter(stream)
        next(chunks)
        s.server.config.app.state.api.loop.drain(0.5)
        start = time.monotonic()
        refused = post(s, "/v1/chat/completions", CHAT)
        assert error(refused, 503)["code"] == "shutting_down" and refused.headers["retry-after"] == "1"
        assert httpx.get(s.url + "/health").json()["status"] == "draining"
        finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
        assert finish == ["cancelled"] and 0.4 < time.monotonic() - start < 10
        assert engine_of(s).pool.used_blocks == 0


# -- operations: /version, /tokenize, /detokenize, /metrics, CORS ----------------------------------------------


def test_version_tokenize_and_detokenize_in_vllm_shapes(server):
    import npr

    assert httpx.get(server.url + "/version").json() == {"version": npr.__version__}
    r = httpx.post(server.url + "/tokenize", json={"model": MODEL, "prompt": "hi there", "return_token_strs": True})
    body = r.json()
    assert body["count"] == len(body["tokens"]) == len(body["token_strs"]) and body["max_model_len"] > 0
    assert httpx.post(server.url + "/detokenize", json={"tokens": body["tokens"]}).json()["prompt"].endswith("hi there")
    chat = client(server).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], max_tokens=2, temperature=0
    )
    counted = httpx.post(server.url + "/tokenize", json={"messages": [{"role": "user", "content": QUESTION}]}).json()
    assert counted["count"] == chat.usage.prompt_tokens  # the ids a chat request prefills
    bad = httpx.post(server.url + "/detokenize", json={"tokens": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    bad = httpx.post(server.url + "/tokenize", json={"prompt": "x", "max_tokens": 3})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"


def test_metrics_in_prometheus_text_format(server):
    client(server).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], max_tokens=5, temperature=0
    )
    wait_until_idle(server)
    r = httpx.get(server.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for line in r.text.splitlines():
        if not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    label = f'{{model_name="{MODEL}"}}'
    assert samples[f"vllm:num_requests_running{label}"] == 0 and samples[f"vllm:kv_cache_usage_perc{label}"] == 0
    assert samples[f"vllm:prompt_tokens_total{label}"] > 0 and samples[f"vllm:generation_tokens_total{label}"] >= 5
    count = samples[f"vllm:e2e_request_latency_seconds_count{label}"]
    assert count >= 1 and samples[f'vllm:e2e_request_latency_seconds_bucket{{model_name="{MODEL}",le="+Inf"}}'] == count
    assert f"npr:branches_total{label}" in samples and f"npr:invalid_schema_total{label}" in samples


def test_cors_is_off_by_default_and_follows_allowed_origins(server, tiny_llama):
    preflight = {
        "Origin": "http://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    assert httpx.options(server.url + "/v1/chat/completions", headers=preflight).status_code == 405
    with make_server(tiny_llama, allowed_origins=("http://app.example",)) as s:
        r = httpx.options(s.url + "/v1/chat/completions", headers=preflight)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        other = httpx.options(s.url + "/v1/chat/completions", headers={**preflight, "Origin": "http://evil.example"})
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
        r = httpx.get(s.url + "/v1/models", headers={"Origin": "http://app.example"})
        assert r.headers["access-control-allow-origin"] == "http://app.example"
