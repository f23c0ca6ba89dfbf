"""Responses: the OpenAI JSON and SSE shapes, the ``npr`` extension, and disconnect handling.

A ``Generation`` collects what the engine loop sends for the jobs of one HTTP request and keeps
one ``SampleStream`` per choice. ``ChatFormat`` and ``CompletionFormat`` turn its updates into
OpenAI objects. ``StreamingResponse`` and ``JsonResponse`` are ASGI responses that watch the
connection: a client that goes away cancels its jobs, which frees their KV at the next step.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager

import anyio

from npr.engine import Result, StreamDelta
from npr.schema import parse
from npr.serve.loop import EngineLoop, Job
from npr.serve.protocol import ApiError
from npr.serve.reasoning import ReasoningSplitter, split_reasoning
from npr.serve.stream import SampleStream, Update

FINAL = object()  # marks a choice's end in a batch of updates


def npr_extension(result: Result, content: str, queued_s: float) -> dict:
    """The ``npr`` field of a finished choice: the parsed tree of its content and its engine stats."""
    trace = parse(content, strict=False)
    executed = len(result.blocks)
    blocks = [
        {
            "plans": [p.text for p in b.plans],
            "branches": [s.text for s in b.steps],
            "takeaway": b.takeaway,
            "executed_as_branches": i < executed,
        }
        for i, b in enumerate(trace.blocks)
    ]
    s = result.stats
    return {
        "tree": {
            "blocks": blocks,
            "final": trace.final,
            "answer": trace.answer,
            "format_valid": not trace.errors,
            "format_errors": [str(e) for e in trace.errors],
        },
        "stats": {
            "generated_tokens": s.generated_tokens,
            "critical_path_tokens": s.critical_path_tokens,
            "parallel_blocks": s.parallel_blocks,
            "branches_per_block": result.branches_per_block,
            "forward_passes": s.forward_passes,
            "wall_time_s": round(s.wall_time_s, 4),
            "queued_s": round(queued_s, 4),
            "mode": result.mode,
        },
        "finish_detail": result.diagnostic,
    }


class Generation:
    """The jobs of one request; choice ``j * n + i`` is sample i of job j."""

    def __init__(
        self,
        loop: EngineLoop,
        jobs: list[Job],
        tokenizer,
        eos_ids: frozenset[int],
        stops: list[str],
        skip_special: frozenset[int] = frozenset(),
        include_stop: bool = False,
    ):
        self.loop, self.jobs, self.tokenizer = loop, jobs, tokenizer
        self.n = jobs[0].params.n
        self.streams = [
            SampleStream(tokenizer, eos_ids, stops, skip_special, include_stop) for _ in range(len(jobs) * self.n)
        ]
        self._position = {job.index: j for j, job in enumerate(jobs)}
        self._stop_sent: set[int] = set()
        self.created = int(time.time())
        self.closed = False  # the response ended (``close``)

    def choice(self, item: StreamDelta | Result) -> int:
        return self._position[item.prompt_index] * self.n + item.sample_index

    @property
    def done(self) -> bool:
        return all(s.done for s in self.streams)

    async def updates(self) -> AsyncIterator[list[tuple[int, Update | object]]]:
        """Batches of (choice, update) and (choice, FINAL), one batch per wake-up (several engine
        steps when the client is slower than the engine)."""
        queue = self.jobs[0].sink.queue
        while not self.done:
            batches = [await queue.get()]
            while not queue.empty():
                batches.append(queue.get_nowait())
            out = []
            for items in batches:
                for item in items:
                    if isinstance(item, Exception):
                        raise ApiError(
                            500,
                            f"the engine failed on this request: {type(item).__name__}: {item}",
                            kind="server_error",
                            code="engine_error",
                        )
                    c = self.choice(item)
                    stream = self.streams[c]
                    if isinstance(item, StreamDelta):
                        out.append((c, stream.feed(item)))
                        if stream.stopped and c not in self._stop_sent:  # a stop string matched: end the sample
                            self._stop_sent.add(c)
                            self.loop.cancel(self.jobs[c // self.n], item.sample_index)
                    else:
                        out.append((c, stream.finish(item)))
                        out.append((c, FINAL))
            yield out

    def close(self) -> None:
        """Cancel whatever has not finished (the client left, or the response failed)."""
        self.closed = True
        for j, job in enumerate(self.jobs):
            if not all(s.done for s in self.streams[j * self.n : (j + 1) * self.n]):
                self.loop.cancel(job)

    def extension(self, c: int) -> dict:
        stream = self.streams[c]
        job = self.jobs[c // self.n]
        queued = (job.started or job.submitted) - job.submitted
        return npr_extension(stream.result, stream.text, queued)

    def usage(self) -> dict:
        """Token counts; before the end (``continuous_usage_stats``), the tokens generated so far."""
        prompt = sum(len(job.prompt_ids) for job in self.jobs)
        completion = sum(len(s.result.token_ids) if s.done else s.generated for s in self.streams)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)


def _finite(logprob: float | None) -> float | None:
    """JSON has no -inf: a log-prob below -9999 is sent as -9999.0 (vLLM's rule)."""
    return None if logprob is None else max(logprob, -9999.0)


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


class ChatFormat:
    """``/v1/chat/completions`` objects."""

    object_name, chunk_name, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl-"

    def __init__(
        self, generation: Generation, model: str, logprobs: bool, reasoning: bool = False, top_logprobs: int = 0
    ):
        self.g, self.model, self.logprobs, self.top_logprobs = generation, model, logprobs, top_logprobs
        self.id = self.id_prefix + uuid.uuid4().hex
        self.splitters = [ReasoningSplitter() for _ in generation.streams] if reasoning else None
        """``--reasoning-parser npr``: the trace goes to ``reasoning_content`` (see ``npr.serve.reasoning``)."""

    def _base(self, name: str) -> dict:
        return {"id": self.id, "object": name, "created": self.g.created, "model": self.model}

    def _logprobs(self, entries) -> dict | None:
        """OpenAI's chat shape: per content token its text, log-prob, UTF-8 bytes and ``top_logprobs`` (the
        position's most likely tokens, best first; ``[]`` unless asked, and for tokens the engine wrote)."""
        if not self.logprobs:
            return None
        return {
            "content": [
                {**self._token(e.token, e.logprob), "top_logprobs": [self._token(t, lp) for t, lp in e.top]}
                for e in entries
            ]
        }

    def _token(self, token: int, logprob: float | None) -> dict:
        text = self.g.token_text(token)
        return {
            "token": text,
            "logprob": _finite(logprob),
            "bytes": None if "\ufffd" in text else list(text.encode("utf-8")),
        }

    def opening(self) -> list[dict]:
        return [
            {
                **self._base(self.chunk_name),
                "choices": [
                    {"index": c, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                ],
            }
            for c in range(len(self.g.streams))
        ]

    def _chunk_choice(
        self,
        c: int,
        text: str | None,
        entries=(),
        finish: str | None = None,
        npr: dict | None = None,
        reasoning: str = "",
    ) -> dict:
        """One choice of a chunk: new content ``text`` (None: no content in this chunk) and new reasoning."""
        delta = {} if text is None else {"content": text}
        if reasoning:
            delta = {"reasoning_content": reasoning, **({"content": text} if text else {})}
        choice = {
            "index": c,
            "delta": delta,
            "logprobs": self._logprobs(entries) if entries else None,
            "finish_reason": finish,
        }
        return {**choice, "npr": npr} if npr is not None else choice

    def _content_choice(self, c: int, text: str, entries=(), final: bool = False) -> dict | None:
        """A content chunk's choice; with the reasoning split, ``text`` is cut into reasoning and content."""
        reasoning = ""
        if self.splitters is not None:
            splitter = self.splitters[c]
            reasoning, text = splitter.feed(text)
            if final:
                more_reasoning, more_text = splitter.finish()
                reasoning, text = reasoning + more_reasoning, text + more_text
        if not (reasoning or text or entries):
            return None
        return self._chunk_choice(c, text, entries, reasoning=reasoning)

    def chunks(self, c: int, update) -> list[dict]:
        """The SSE objects of one update: branch text in an ``npr`` chunk, content in an ordinary one, and
        at the end the finish reason with the tree and stats."""
        if update is FINAL:
            choices = [self._chunk_choice(c, None, finish=self.g.streams[c].finish_reason(), npr=self.g.extension(c))]
            if self.splitters is not None:  # what the split held back (whitespace after the last block)
                choices = [x for x in [self._content_choice(c, "", final=True)] if x] + choices
        else:
            choices = []
            if update.branches:
                branches = [{"block": b, "branch": k, "text": t} for b, k, t in update.branches]
                choices.append(self._chunk_choice(c, None, npr={"branches": branches}))
            content = self._content_choice(c, update.content, update.logprobs if self.logprobs else ())
            if content is not None:
                choices.append(content)
        return [{**self._base(self.chunk_name), "choices": [choice]} for choice in choices]

    def response(self) -> dict:
        choices = []
        for c, stream in enumerate(self.g.streams):
            message = {"role": "assistant", "content": stream.text}
            if self.splitters is not None:
                reasoning, content = split_reasoning(stream.text)
                message = {"role": "assistant", "content": content, "reasoning_content": reasoning}
            choices.append(
                {
                    "index": c,
                    "message": message,
                    "logprobs": self._logprobs(stream.content_logprobs()),
                    "finish_reason": stream.finish_reason(),
                    "npr": self.g.extension(c),
                }
            )
        return {**self._base(self.object_name), "choices": choices, "usage": self.g.usage()}

    def usage_chunk(self) -> dict:
        return {**self._base(self.chunk_name), "choices": [], "usage": self.g.usage()}


class CompletionFormat(ChatFormat):
    """``/v1/completions`` objects (``text`` instead of ``delta``/``message``)."""

    object_name, chunk_name, id_prefix = "text_completion", "text_completion", "cmpl-"

    def _logprobs(self, entries) -> dict | None:
        """The legacy shape; with ``logprobs`` k > 0, ``top_logprobs`` per token maps the text of the position's
        k most likely tokens, and of the sampled one (as vLLM), to their log-probs (``{}`` for engine-written
        tokens; two tokens with the same text keep the likelier)."""
        if not self.logprobs:
            return None
        top = None
        if self.top_logprobs:
            top = [{} if e.logprob is None else self._alternatives(e) for e in entries]
        return {
            "tokens": [self.g.token_text(e.token) for e in entries],
            "token_logprobs": [_finite(e.logprob) for e in entries],
            "top_logprobs": top,
            "text_offset": [e.offset for e in entries],
        }

    def _alternatives(self, entry) -> dict[str, float]:
        alternatives: dict[str, float] = {}
        for token, logprob in (*entry.top, (entry.token, entry.logprob)):
            alternatives.setdefault(self.g.token_text(token), _finite(logprob))
        return alternatives

    def opening(self) -> list[dict]:
        return []

    def _chunk_choice(
        self,
        c: int,
        text: str | None,
        entries=(),
        finish: str | None = None,
        npr: dict | None = None,
        reasoning: str = "",
    ) -> dict:
        choice = {
            "index": c,
            "text": text or "",
            "logprobs": self._logprobs(entries) if entries else None,
            "finish_reason": finish,
        }
        return {**choice, "npr": npr} if npr is not None else choice

    def response(self) -> dict:
        choices = [
            {
                "index": c,
                "text": s.text,
                "logprobs": self._logprobs(s.content_logprobs()),
                "finish_reason": s.finish_reason(),
                "npr": self.g.extension(c),
            }
            for c, s in enumerate(self.g.streams)
        ]
        return {**self._base(self.object_name), "choices": choices, "usage": self.g.usage()}


async def _wait_for_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def error_body(error: ApiError) -> bytes:
    return _json(error.body()).encode()


class StreamingResponse:
    """``text/event-stream`` of a generation: ``data: {chunk}`` lines, then ``data: [DONE]``."""

    def __init__(self, fmt: ChatFormat, include_usage: bool, continuous_usage: bool = False):
        self.fmt, self.include_usage, self.continuous_usage = fmt, include_usage, continuous_usage

    def _with_usage(self, chunk: dict) -> dict:
        """vLLM's ``continuous_usage_stats``: every chunk carries the usage so far."""
        return {**chunk, "usage": self.fmt.g.usage()} if self.continuous_usage else chunk

    async def _events(self) -> AsyncIterator[str]:
        for chunk in self.fmt.opening():
            yield f"data: {_json(self._with_usage(chunk))}\n\n"
        try:
            async with aclosing(self.fmt.g.updates()) as updates:
                async for batch in updates:
                    yield "".join(
                        f"data: {_json(self._with_usage(chunk))}\n\n"
                        for c, update in batch
                        for chunk in self.fmt.chunks(c, update)
                    )
        except ApiError as e:  # headers are sent: report the failure in the stream, as OpenAI does
            yield f"data: {_json(e.body())}\n\n"
        else:
            if self.include_usage:
                yield f"data: {_json(self.fmt.usage_chunk())}\n\n"
        yield "data: [DONE]\n\n"

    async def __call__(self, scope, receive, send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                    (b"x-accel-buffering", b"no"),
                ],
            }
        )
        try:
            async with until_disconnect(receive):
                try:
                    async with aclosing(self._events()) as events:
                        async for text in events:
                            await send({"type": "http.response.body", "body": text.encode(), "more_body": True})
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                except OSError:  # the client went away between two writes
                    pass
        finally:
            self.fmt.g.close()


@asynccontextmanager
async def until_disconnect(receive):
    """Run the body until it ends or the client disconnects, whichever comes first (a disconnect
    cancels the body; the caller's ``finally`` then cancels its engine jobs)."""
    async with anyio.create_task_group() as tasks:

        async def watch():
            await _wait_for_disconnect(receive)
            tasks.cancel_scope.cancel()

        tasks.start_soon(watch)
        yield
        tasks.cancel_scope.cancel()


class JsonResponse:
    """The whole response once every choice has finished; a disconnect before that cancels the jobs."""

    def __init__(self, fmt: ChatFormat):
        self.fmt = fmt

    async def __call__(self, scope, receive, send) -> None:
        status, body = 200, b""
        try:
            async with until_disconnect(receive):
                try:
                    async with aclosing(self.fmt.g.updates()) as updates:
                        async for _ in updates:
                            pass
                    body = _json(self.fmt.response()).encode()
                except ApiError as e:
                    status, body = e.status, error_body(e)
        finally:
            self.fmt.g.close()
        if not body:
            return  # the client disconnected
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


__all__ = [
    "ChatFormat",
    "CompletionFormat",
    "Generation",
    "JsonResponse",
    "StreamingResponse",
    "error_body",
    "npr_extension",
]
