"""The OpenAI request bodies ``npr serve`` accepts, and the error object it answers with.

Requests are validated strictly (docs/serving.md lists every field):
- a field of the OpenAI API that npr cannot honour is refused with 400 unless it holds its
  neutral value (``frequency_penalty: 0``, ``tools: []``, ...), never silently ignored;
- a field the OpenAI API does not have is refused (as OpenAI does: "Unrecognized request argument");
- types are strict: ``"max_tokens": "10"`` is an error naming ``max_tokens``.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from npr.validate import invalid_text_field


class ApiError(Exception):
    """An answer in OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# OpenAI fields npr cannot honour -> the values that mean "off" (accepted, since clients send defaults)
NEUTRAL = {
    "frequency_penalty": (0, 0.0, None),
    "presence_penalty": (0, 0.0, None),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None, True, False),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "store": (None, False),
    "metadata": (None, {}),
    "service_tier": (None, "auto", "default"),
    "reasoning_effort": (None,),
    "verbosity": (None,),
    "web_search_options": (None,),
    "prompt_cache_key": (None,),
    "prompt_cache_retention": (None,),
    "safety_identifier": (None,),
    "moderation": (None,),
    "echo": (None, False),
    "suffix": (None, ""),
}
CHAT_ONLY = {
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "functions",
    "function_call",
    "response_format",
    "modalities",
    "audio",
    "prediction",
    "store",
    "metadata",
    "service_tier",
    "reasoning_effort",
    "verbosity",
    "web_search_options",
    "prompt_cache_key",
    "prompt_cache_retention",
    "safety_identifier",
    "moderation",
}
COMPLETION_ONLY = {"echo", "suffix"}


# assistant-message fields the openai client sends back as null: why a live value is refused
UNRENDERABLE = {
    "tool_calls": "npr serve has no tools, and a chat template cannot render a tool call it did not make",
    "function_call": "npr serve has no functions",
    "refusal": "npr serve never refuses, and a refusal text is not rendered into a prompt",
    "audio": "npr serve is text only",
    "annotations": "npr serve makes no annotations",
}


MAX_LOGPROBS = 20  # top_logprobs (chat) and logprobs (completions): OpenAI's and vLLM's default maximum


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False
    """vLLM: every chunk carries the usage so far (prompt tokens, completion tokens generated up to it)."""


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    """One message. An assistant message is accepted as the ``openai`` client dumps it
    (``messages.append(r.choices[0].message.model_dump())``): its null or empty ``refusal``,
    ``annotations``, ``audio``, ``function_call``, ``tool_calls`` mean "none" and pass; a live value
    (a tool call, a refusal text) cannot be rendered into a prompt and is refused naming the field."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None
    name: None = None
    """Names are not rendered by chat templates: only null is accepted."""
    refusal: None = None
    annotations: Annotated[list, Field(max_length=0)] | None = None
    audio: None = None
    function_call: None = None
    tool_calls: Annotated[list, Field(max_length=0)] | None = None
    reasoning_content: str | None = None
    """An earlier turn's reasoning, as this server returned it: accepted and not rendered (chat templates of
    reasoners, Qwen3's among them, drop earlier turns' reasoning; only ``content`` goes into the prompt)."""

    @model_validator(mode="after")
    def _content_needed(self):
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content (only an assistant message may have null content)")
        if self.reasoning_content is not None and self.role != "assistant":
            raise ValueError("reasoning_content is only for assistant messages")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class _Sampling(_Strict):
    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    """Extension (as in vLLM): keep the k most likely tokens; 0 or null disables it."""
    n: Annotated[int, Field(ge=1)] | None = None
    seed: int | None = None
    stop: str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=4)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    """Accepted and not used (it changes no output)."""
    # vLLM's extra sampling fields (npr.serve.sampling), with vLLM's meanings
    repetition_penalty: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    ignore_eos: bool | None = None
    min_tokens: Annotated[int, Field(ge=0)] | None = None
    skip_special_tokens: bool | None = None
    """vLLM's default is true; npr's NPR tags are kept either way (they are the structure, as vLLM keeps
    Qwen3's ``<think>``); true drops the other special tokens from the text, e.g. a ``<|im_end|>`` mid-answer."""
    include_stop_str_in_output: bool | None = None

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if any(not s for s in stops):
            raise ApiError(400, "stop strings must not be empty", "stop")
        return stops


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    """The most likely tokens at each content position, with their log-probs (needs ``logprobs: true``)."""
    chat_template_kwargs: dict | None = None
    """vLLM: extra variables for the chat template (e.g. ``{"enable_thinking": false}`` for Qwen3)."""
    add_generation_prompt: bool | None = None
    """vLLM: end the prompt with the assistant turn's opening (default true)."""

    def budget(self) -> int | None:
        if (
            self.max_tokens is not None
            and self.max_completion_tokens is not None
            and self.max_tokens != self.max_completion_tokens
        ):
            raise ApiError(
                400,
                f"max_tokens={self.max_tokens} and max_completion_tokens={self.max_completion_tokens} "
                "disagree; send one of them",
                "max_completion_tokens",
            )
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Sampling):
    prompt: (
        str
        | Annotated[list[str], Field(min_length=1)]
        | Annotated[list[int], Field(min_length=1)]
        | Annotated[list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1)]
    )
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    """The sampled tokens' log-probs, and with k > 0 the k most likely tokens at each position."""
    best_of: Annotated[int, Field(ge=1)] | None = None

    def budget(self) -> int:
        return 16 if self.max_tokens is None else self.max_tokens  # OpenAI's default for completions

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [list(p)]
        return list(p)


class TokenizeCompletionRequest(_Strict):
    """vLLM's ``POST /tokenize`` with a prompt."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(_Strict):
    """vLLM's ``POST /tokenize`` with messages: the ids ``/v1/chat/completions`` would prefill."""

    model: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    add_generation_prompt: bool = True
    add_special_tokens: bool = False
    chat_template_kwargs: dict | None = None
    return_token_strs: bool = False


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


def parse_tokenize_request(body: dict) -> TokenizeCompletionRequest | TokenizeChatRequest:
    model = TokenizeChatRequest if "messages" in body else TokenizeCompletionRequest
    request = _validate(model, body, "tokenize")
    if isinstance(request, TokenizeChatRequest):
        _check_template_kwargs(request)
    return request


def parse_detokenize_request(body: dict) -> DetokenizeRequest:
    return _validate(DetokenizeRequest, body, "detokenize")


def parse_json_body(raw: bytes) -> dict:
    """The body as a JSON object; 400 naming the position when it is not one."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f" (line {e.lineno}, column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
        raise ApiError(
            400, f"the request body is not valid JSON{where}: {e}; send a JSON object", None, "invalid_json"
        ) from e
    if not isinstance(body, dict):
        raise ApiError(
            400, f"the request body is a JSON {type(body).__name__}; send a JSON object", None, "invalid_json"
        )
    bad_text = invalid_text_field(body)  # a "\ud800" escape parses, but no tokenizer can encode it
    if bad_text:
        field, problem = bad_text
        raise ApiError(400, f"{field} {problem}; send valid Unicode text", field, "invalid_unicode")
    return body


def _is_union_label(part) -> bool:
    """pydantic names the members of a union in error locations (``str``, ``list[int]``); they are not fields."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool") or "-" in part)


def _param(loc: tuple) -> str:
    """``('messages', 0, 'content', 'str')`` -> ``messages[0].content``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _is_union_label(part):
            out += ("." if out else "") + str(part)
    return out


def _validation_error(e: ValidationError) -> ApiError:
    """One 400 naming the field: the first error, or for a union (``stop``: string or list) the member
    that matched the type but broke a limit, else the list of accepted types."""
    errors = e.errors()
    param = _param(errors[0]["loc"])
    union = [
        x
        for x in errors
        if _param(x["loc"][: len(errors[0]["loc"]) - 1]) == _param(errors[0]["loc"][:-1])
        and any(_is_union_label(p) for p in x["loc"])
    ]
    chosen = next((x for x in union if not x["type"].endswith("_type")), errors[0])
    param = _param(chosen["loc"]) or None
    if chosen["type"] == "missing":
        return ApiError(400, f"'{param}' is required", param, "missing_required_parameter")
    given = json.dumps(chosen.get("input"), default=str)[:80]
    detail = chosen["msg"]
    why = UNRENDERABLE.get(param.rsplit(".", 1)[-1]) if param and param.startswith("messages[") else None
    if why:
        return ApiError(400, f"'{param}' must be null or empty: {why} (got {given})", param, "unsupported_parameter")
    if len(union) > 1 and chosen is errors[0]:
        kinds = [next(p for p in x["loc"] if _is_union_label(p)).replace("constrained-", "") for x in union]
        detail = f"expected one of: {', '.join(dict.fromkeys(kinds))}"
    return ApiError(400, f"invalid value for '{param}': {detail} (got {given})", param, "invalid_value")


def _is_neutral(value, options) -> bool:
    for option in options:
        if option is None or isinstance(option, bool):
            if value is option:
                return True
        elif isinstance(option, (int, float)):
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value == option:
                return True
        elif type(value) is type(option) and value == option:
            return True
    return False


def _screen(body: dict, fields: set[str], endpoint: str) -> None:
    """400 for fields this endpoint does not know and for known-but-unsupported fields with a live value."""
    other_only = {"chat": COMPLETION_ONLY, "completions": CHAT_ONLY}.get(endpoint, set(NEUTRAL))
    for key, value in body.items():
        if key in fields:
            continue
        if key in NEUTRAL and key not in other_only:
            if _is_neutral(value, NEUTRAL[key]):
                continue
            allowed = ", ".join(json.dumps(v) for v in NEUTRAL[key])
            raise ApiError(
                400,
                f"'{key}' is not supported by npr serve; it accepts only {allowed} "
                "(docs/serving.md lists the supported fields)",
                key,
                "unsupported_parameter",
            )
        raise ApiError(400, f"Unrecognized request argument supplied: {key}", key, "unrecognized_parameter")


def _validate(model: type[BaseModel], body: dict, endpoint: str):
    fields = set(model.model_fields)
    _screen(body, fields, endpoint)
    known = {k: v for k, v in body.items() if k in fields}
    try:
        return model.model_validate(known)
    except ValidationError as e:
        raise _validation_error(e) from e


TEMPLATE_RESERVED = (
    "messages",
    "conversation",
    "tokenize",
    "add_generation_prompt",
    "continue_final_message",
    "tools",
    "documents",
    "return_dict",
    "chat_template",
)


def parse_chat_request(body: dict) -> ChatCompletionRequest:
    request = _validate(ChatCompletionRequest, body, "chat")
    _check_template_kwargs(request)
    if request.top_logprobs and not request.logprobs:
        raise ApiError(
            400, f"top_logprobs={request.top_logprobs} needs logprobs: true", "top_logprobs", "invalid_value"
        )
    return request


def _check_template_kwargs(request) -> None:
    for key in request.chat_template_kwargs or {}:
        if key in TEMPLATE_RESERVED:
            raise ApiError(
                400,
                f"chat_template_kwargs.{key} is set by the server, not by a request"
                + (" (send add_generation_prompt at the top level)" if key == "add_generation_prompt" else ""),
                f"chat_template_kwargs.{key}",
                "invalid_value",
            )


def parse_completion_request(body: dict) -> CompletionRequest:
    request = _validate(CompletionRequest, body, "completions")
    if request.best_of is not None and request.best_of != (request.n or 1):
        raise ApiError(
            400,
            f"best_of={request.best_of} is not supported (npr returns every sample: leave best_of unset or equal to n)",
            "best_of",
            "unsupported_parameter",
        )
    return request
