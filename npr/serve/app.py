"""The ASGI app of ``npr serve``: OpenAI routes, the chat page, health, auth and limits.

    app = create_app(Engine(model, tokenizer, EngineConfig()), ServeConfig(model_name="embedded"))
    uvicorn.run(app)        # or: npr serve

Every route answers errors in OpenAI's shape (``protocol.ApiError``). docs/serving.md is the
reference for the API, the ``npr`` extension fields, the streaming order and the limits.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import random
import time
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from npr.engine import Engine, SamplingParams
from npr.prompts import NPR_INSTRUCTION
from npr.serve.live import LiveRequests
from npr.serve.loop import EngineLoop, Job, Overloaded, Sink
from npr.serve.page import chat_page
from npr.serve.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    TokenizeChatRequest,
    parse_chat_request,
    parse_completion_request,
    parse_detokenize_request,
    parse_json_body,
    parse_tokenize_request,
)
from npr.serve.responses import (
    ChatFormat,
    CompletionFormat,
    Generation,
    JsonResponse,
    StreamingResponse,
)
from npr.serve.sampling import request_processors

log = logging.getLogger("npr.serve")
SYSTEM_PROMPTS = ("npr", "none")
REASONING_PARSERS = ("npr", "none")


@dataclass(frozen=True)
class ServeConfig:
    """How ``npr serve`` answers (the engine's own settings are in ``EngineConfig``)."""

    model_name: str = "embedded"
    """The name clients send as ``model``; any other name gets 404."""
    max_n: int = 8
    """Most samples (``n``) per request; above it, 400."""
    max_queue: int = 256
    """Most requests waiting for the engine to start them; beyond it, 503 with ``Retry-After``."""
    max_body_bytes: int = 1 << 20
    """Request bodies above this many bytes get 413 before they are read to the end or parsed."""
    default_max_tokens: int = 1024
    """Chat budget when the request gives none (capped by the context); completions default to 16, as OpenAI."""
    system_prompt: str = "npr"
    """``npr``: a chat without a system message gets the NPR format instruction as one (as in training
    and ``npr generate``), so the model answers in parallel blocks; ``none``: messages go as sent."""
    api_key: str | None = None
    """When set, ``/v1/*`` requires ``Authorization: Bearer <api_key>``."""
    retry_after_s: int = 1
    """``Retry-After`` of a 503."""
    drain_timeout_s: float = 30.0
    """On SIGINT/SIGTERM, in-flight requests get this long to finish before they are cancelled."""
    reasoning_parser: str = "npr"
    """``npr`` (default): a chat reply's NPR trace (its blocks) goes to ``message.reasoning_content`` /
    ``delta.reasoning_content`` and the final text to ``content``, as vLLM's ``--reasoning-parser``;
    ``none``: the whole canonical text is ``content``. Completions always return the whole text."""
    deterministic: bool = False
    """``npr serve --deterministic``: requests run one at a time (``EngineLoop.one_at_a_time``), so a seeded or
    greedy request gives exactly its output on an idle server whatever else is sent, at any dtype; the price is
    no batching across requests. Needs an engine with ``share_prompt_prefix=False`` (a prefix remembered from an
    earlier request would change how this one is laid out). Off: requests share forwards (continuous batching)
    and, in bfloat16, a request's output can change with what runs beside it (docs/serving.md)."""
    logits_processors: tuple = ()
    allowed_origins: tuple[str, ...] = ()
    """CORS (vLLM's ``--allowed-origins``): origins a browser app may call from; ``*`` any. Empty (default): no
    CORS headers, so browsers on other origins are refused (vLLM's default allows every origin)."""
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False
    """Applied to every request (tests and benchmarks force a structure with ``StructureForcer``)."""

    def __post_init__(self):
        if self.system_prompt not in SYSTEM_PROMPTS:
            raise ValueError(f"system_prompt must be one of {SYSTEM_PROMPTS}, got {self.system_prompt!r}")
        if self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(f"reasoning_parser must be one of {REASONING_PARSERS}, got {self.reasoning_parser!r}")
        if self.api_key is not None and not self.api_key.strip():  # "" would read as "no key": fail closed
            raise ValueError("api_key must not be empty; use None to serve without a key")
        for name in ("max_n", "max_queue", "max_body_bytes", "default_max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed ``limit`` (by its header or while reading)."""
    declared = request.headers.get("content-length")
    too_big = f"the request body exceeds this server's limit of {limit} bytes (--max-body-bytes)"
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, f"bad Content-Length header {declared!r}")
        if int(declared) > limit:
            raise ApiError(413, f"{too_big}: Content-Length is {declared}", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, too_big, code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


class Api:
    """The route handlers around one engine loop."""

    def __init__(self, engine: Engine, config: ServeConfig):
        self.engine, self.config = engine, config
        self.tokenizer = engine.tokenizer
        if config.deterministic and engine.config.share_prompt_prefix:
            raise ValueError("deterministic serving needs an engine built with EngineConfig(share_prompt_prefix=False)")
        self.loop = EngineLoop(engine, config.max_queue, one_at_a_time=config.deterministic)
        self.eos_ids = engine.scaffold.eos_ids
        self.vocab = engine.model.get_input_embeddings().num_embeddings
        self.started = int(time.time())
        self.live = LiveRequests()
        self.skip_ids = frozenset(self.tokenizer.all_special_ids) - set(engine.scaffold.tag_of) - self.eos_ids
        """skip_special_tokens drops these: special tokens but not the NPR tags (the final EOS is always dropped)."""

    # ------------------------------------------------------------------ checks

    def authorize(self, request: Request) -> None:
        if self.config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.config.api_key.encode()):
            message = "missing API key: send 'Authorization: Bearer <key>'" if not header else "incorrect API key"
            raise ApiError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.config.model_name:
            raise ApiError(
                404,
                f"The model `{name}` does not exist; this server serves `{self.config.model_name}` (GET /v1/models)",
                "model",
                "model_not_found",
            )

    def sampling(
        self,
        request: ChatCompletionRequest | CompletionRequest,
        prompt_lengths: list[int],
        budget: int | None,
        logprobs: bool,
        prompt_field: str,
        top_logprobs: int = 0,
    ) -> SamplingParams:
        n = request.n or 1
        if n > self.config.max_n:
            raise ApiError(400, f"n={n} is above this server's maximum of {self.config.max_n} (--max-n)", "n")
        context, longest = self.engine.context_length, max(prompt_lengths)
        if context and longest >= context:
            raise ApiError(
                400,
                f"This model's maximum context length is {context} tokens, but the prompt has "
                f"{longest} tokens; shorten it",
                prompt_field,
                "context_length_exceeded",
            )
        if budget is None:
            budget = self.config.default_max_tokens
            if context:
                budget = min(budget, context - longest)
        elif context and longest + budget > context:
            raise ApiError(
                400,
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{longest + budget} tokens ({longest} in the prompt, {budget} for the completion); "
                "shorten the prompt or lower max_tokens",
                "max_tokens",
                "context_length_exceeded",
            )
        if request.min_tokens and request.min_tokens > budget:
            raise ApiError(
                400,
                f"min_tokens={request.min_tokens} is above the budget of {budget} tokens; lower "
                "min_tokens or raise max_tokens",
                "min_tokens",
            )
        processors = request_processors(request.repetition_penalty, request.min_tokens, request.min_p, self.eos_ids)
        params = SamplingParams(
            max_new_tokens=budget,
            ignore_eos=bool(request.ignore_eos),
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            top_k=request.top_k or 0,
            n=n,
            seed=random.randrange(2**31) if request.seed is None else request.seed,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            logits_processors=processors + self.config.logits_processors,
        )
        # the engine admits by actual use and preempts when the pool runs dry, so only a request that
        # cannot even start (its prompt pages plus one per sample) is refused here
        need = self.engine.scheduler.start_blocks(longest, params)
        if need > self.engine.pool.num_blocks:
            raise ApiError(
                400,
                f"this request needs {need} KV blocks to start ({longest} prompt tokens, n={n}) but "
                f"the server's pool has {self.engine.pool.num_blocks}; lower n or shorten the prompt (the "
                "pool is sized by --kv-cache-gib)",
                prompt_field,
            )
        if n > self.engine.config.max_num_seqs:
            raise ApiError(
                400, f"n={n} exceeds the server's {self.engine.config.max_num_seqs} live streams (--max-num-seqs)", "n"
            )
        return params

    def chat_prompt(self, request: ChatCompletionRequest | TokenizeChatRequest) -> list[int]:
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in request.messages
        ]
        if self.config.system_prompt == "npr" and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": NPR_INSTRUCTION})
        try:
            text = self.tokenizer.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=request.add_generation_prompt is not False,
                **(request.chat_template_kwargs or {}),
            )
        except Exception as e:  # the template rejects this conversation (e.g. roles out of order)
            where = "messages or chat_template_kwargs" if request.chat_template_kwargs else "messages"
            raise ApiError(400, f"the model's chat template rejects these {where}: {e}", "messages") from e
        return self.tokenizer.encode(text, add_special_tokens=False)

    def completion_prompts(self, request: CompletionRequest) -> list[list[int]]:
        prompts = []
        for i, prompt in enumerate(request.prompts()):
            ids = self.tokenizer.encode(prompt, add_special_tokens=False) if isinstance(prompt, str) else prompt
            where = "prompt" if len(request.prompts()) == 1 else f"prompt[{i}]"
            if not ids:
                raise ApiError(400, f"{where} is empty", "prompt")
            bad = next((t for t in ids if not 0 <= t < self.vocab), None)
            if bad is not None:
                raise ApiError(
                    400, f"{where}: token id {bad} is outside the vocabulary (0..{self.vocab - 1})", "prompt"
                )
            prompts.append(list(ids))
        return prompts

    # ------------------------------------------------------------------ routes

    async def start(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        stops: list[str],
        req: ChatCompletionRequest | CompletionRequest,
    ) -> Generation:
        sink = Sink()
        jobs = [Job(self.loop.new_index(), ids, params, sink) for ids in prompts]
        try:
            self.loop.submit(jobs)
        except Overloaded as e:
            raise ApiError(
                503,
                f"{e}; retry later",
                code=e.code,
                kind="server_error",
                headers={"Retry-After": str(self.config.retry_after_s)},
            ) from e
        return Generation(
            self.loop,
            jobs,
            self.tokenizer,
            self.eos_ids,
            stops,
            skip_special=self.skip_ids if req.skip_special_tokens else frozenset(),
            include_stop=bool(req.include_stop_str_in_output),
        )

    async def chat_completions(self, request: Request):
        self.authorize(request)
        req = parse_chat_request(parse_json_body(await read_body(request, self.config.max_body_bytes)))
        self.check_model(req.model)
        self.check_stream_options(req)
        stops = req.stop_strings()
        ids = self.chat_prompt(req)
        top = (req.top_logprobs or 0) if req.logprobs else 0
        params = self.sampling(req, [len(ids)], req.budget(), bool(req.logprobs), "messages", top)
        fmt = ChatFormat(
            await self.start([ids], params, stops, req),
            self.config.model_name,
            bool(req.logprobs),
            reasoning=self.config.reasoning_parser == "npr",
        )
        users = [m.text() for m in req.messages if m.role == "user"]
        self.live.add(fmt, "chat", users[-1] if users else req.messages[-1].text())
        return self.respond(fmt, req)

    async def completions(self, request: Request):
        self.authorize(request)
        req = parse_completion_request(parse_json_body(await read_body(request, self.config.max_body_bytes)))
        self.check_model(req.model)
        self.check_stream_options(req)
        stops = req.stop_strings()
        prompts = self.completion_prompts(req)
        logprobs = req.logprobs is not None
        params = self.sampling(
            req, [len(p) for p in prompts], req.budget(), logprobs, "prompt", top_logprobs=req.logprobs or 0
        )
        fmt = CompletionFormat(
            await self.start(prompts, params, stops, req),
            self.config.model_name,
            logprobs,
            top_logprobs=req.logprobs or 0,
        )
        first = req.prompts()[0]
        self.live.add(fmt, "completions", first if isinstance(first, str) else f"[{len(first)} token ids]")
        return self.respond(fmt, req)

    @staticmethod
    def check_stream_options(req) -> None:
        if req.stream_options is not None and not req.stream:
            raise ApiError(400, "stream_options needs stream: true", "stream_options")

    @staticmethod
    def respond(fmt: ChatFormat, req):
        if req.stream:
            options = req.stream_options
            return StreamingResponse(
                fmt, bool(options and options.include_usage), bool(options and options.continuous_usage_stats)
            )
        return JsonResponse(fmt)

    def _model_card(self) -> dict:
        return {
            "id": self.config.model_name,
            "object": "model",
            "created": self.started,
            "owned_by": "npr",
            "max_model_len": self.engine.context_length,
            "npr": {
                "mode": self.engine.config.mode,
                "max_n": self.config.max_n,
                "max_branches": self.engine.config.max_branches,
            },
        }

    async def models(self, request: Request):
        self.authorize(request)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request):
        self.authorize(request)
        self.check_model(request.path_params["name"])
        return JSONResponse(self._model_card())

    async def health(self, request: Request):
        status = "failed" if self.loop.failure else ("ok" if self.loop.accepting else "draining")
        body = {
            "status": status,
            "model": self.config.model_name,
            "mode": self.engine.config.mode,
            "auth": self.config.api_key is not None,
            **self.loop.stats(),
        }
        if self.loop.failure:
            body["failure"] = self.loop.failure
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    async def live_view(self, request: Request):
        """The live page's snapshot (``npr.serve.live``): needs the key when one is set (it shows every
        client's prompts and outputs)."""
        self.authorize(request)
        stats = self.loop.stats()
        return JSONResponse(self.live.snapshot(stats, request.query_params.get("follow")))

    async def version(self, request: Request):
        from npr import __version__

        return JSONResponse({"version": __version__})

    async def metrics(self, request: Request):
        stats = self.loop.stats()
        text = self.loop.metrics.render(
            self.config.model_name, stats["running"], stats["queued"], stats["kv_blocks_used"], stats["kv_blocks_total"]
        )
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def tokenize(self, request: Request):
        """vLLM's ``POST /tokenize``: a prompt, or messages rendered exactly as a chat request renders them."""
        self.authorize(request)
        req = parse_tokenize_request(parse_json_body(await read_body(request, self.config.max_body_bytes)))
        self.check_model(req.model)
        if isinstance(req, TokenizeChatRequest):
            ids = self.chat_prompt(req)
            if req.add_special_tokens and self.tokenizer.bos_token_id is not None:
                ids = [self.tokenizer.bos_token_id, *ids]
        else:
            ids = self.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        strs = self.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return JSONResponse(
            {"count": len(ids), "max_model_len": self.engine.context_length, "tokens": ids, "token_strs": strs}
        )

    async def detokenize(self, request: Request):
        self.authorize(request)
        req = parse_detokenize_request(parse_json_body(await read_body(request, self.config.max_body_bytes)))
        self.check_model(req.model)
        bad = next((t for t in req.tokens if t >= self.vocab), None)
        if bad is not None:
            raise ApiError(400, f"token id {bad} is outside the vocabulary (0..{self.vocab - 1})", "tokens")
        return JSONResponse({"prompt": self.tokenizer.decode(req.tokens, skip_special_tokens=False)})

    async def page(self, request: Request):
        return HTMLResponse(chat_page(self.config.model_name))


async def _api_error(request: Request, exc: ApiError):
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _server_error(request: Request, exc: Exception):
    log.exception("unhandled error on %s", request.url.path, exc_info=exc)
    error = ApiError(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error", code="internal_error")
    return JSONResponse(error.body(), status_code=500)


async def _not_found(request: Request, exc):
    error = ApiError(404, f"no route {request.method} {request.url.path} (see docs/serving.md)", code="not_found")
    return JSONResponse(error.body(), status_code=404)


async def _method_not_allowed(request: Request, exc):
    error = ApiError(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed")
    return JSONResponse(error.body(), status_code=405)


def create_app(engine: Engine, config: ServeConfig | None = None) -> Starlette:
    """The app; its lifespan starts the engine loop thread and stops it (cancelling what is left)."""
    api = Api(engine, config or ServeConfig())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        api.loop.start()
        try:
            yield
        finally:
            api.loop.stop()

    routes = [
        Route("/", api.page, methods=["GET"]),
        Route("/health", api.health, methods=["GET"]),
        Route("/favicon.ico", lambda request: Response(status_code=204), methods=["GET"]),  # browsers ask for it
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/models/{name:path}", api.model, methods=["GET"]),
        Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/version", api.version, methods=["GET"]),
        Route("/metrics", api.metrics, methods=["GET"]),
        Route("/live", api.live_view, methods=["GET"]),
        Route("/tokenize", api.tokenize, methods=["POST"]),
        Route("/detokenize", api.detokenize, methods=["POST"]),
    ]
    middleware = []
    if api.config.allowed_origins:  # as vLLM: Starlette's CORS middleware answers the OPTIONS preflight
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(api.config.allowed_origins),
                allow_methods=list(api.config.allowed_methods),
                allow_headers=list(api.config.allowed_headers),
                allow_credentials=api.config.allow_credentials,
            )
        )
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=middleware,
        exception_handlers={ApiError: _api_error, Exception: _server_error, 404: _not_found, 405: _method_not_allowed},
    )
    app.state.api = api
    return app


__all__ = ["Api", "ServeConfig", "create_app"]
