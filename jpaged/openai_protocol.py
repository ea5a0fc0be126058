"""The OpenAI API's request bodies and error bodies, and their mapping to
SamplingParams (vLLM's names for the extra fields).

Bodies are checked in two places, each once: pydantic checks the JSON
types here (a bool is not an int, a string is not a number, an unknown
field is an error, as OpenAI's API does), and SamplingParams checks every
value's range with a message naming the field. Host only: no jax.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from jpaged.sampling_params import RequestOutputKind, SamplingParams


class APIError(Exception):
    """An error the client gets as ``{"error": {message, type, param, code}}``."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error",
             404: "not_found_error", 500: "server_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


def parse_body(model: type[BaseModel], body: bytes) -> BaseModel:
    """`body` (JSON) as `model`; APIError 400 saying what is wrong."""
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise bad_request(*_describe(e)) from None


def _describe(e: ValidationError) -> tuple[str, str | None]:
    """(message, param) of pydantic's first error, worded for API users."""
    err = e.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in err["loc"])
    kind, msg = err["type"], err["msg"].removeprefix("Value error, ")
    if kind == "json_invalid":
        return f"the request body is not valid JSON: {err['ctx']['error']}", None
    if not loc:
        return f"the request body must be a JSON object: {msg}", None
    if kind == "extra_forbidden":
        return f"unrecognized request argument supplied: {loc}", loc
    if kind == "missing":
        return f"{loc}: this field is required", loc
    got = repr(err.get("input"))
    got = got if len(got) <= 60 else got[:60] + "..."
    return f"{loc}: {msg}" + ("" if kind == "value_error" else f" (got {got})"), loc


# ------------------------------------------------------------------ bodies
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class _SamplingRequest(BaseModel):
    """Fields both endpoints share. None means "not given": SamplingParams'
    own default applies (OpenAI's defaults are the same)."""
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None  # None: the served model
    n: int | None = None
    best_of: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    skip_special_tokens: bool | None = None
    use_beam_search: bool | None = None
    length_penalty: float | None = None
    early_stopping: bool | str | None = None
    max_tokens: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM's extension: token ids beside the text (per chunk when streamed).
    return_token_ids: bool = False

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v):
        if v is None or isinstance(v, str) or (isinstance(v, list) and all(
                isinstance(s, str) for s in v)):
            return v
        raise ValueError("must be a string or a list of strings")

    @field_validator("early_stopping", mode="before")
    @classmethod
    def _early_stopping(cls, v):
        if v is None or isinstance(v, bool) or v == "never":
            return v
        raise ValueError('must be true, false or "never"')

    def sampling_fields(self) -> dict:
        """The SamplingParams fields this body sets."""
        names = ("n", "best_of", "temperature", "top_p", "top_k", "min_p", "seed",
                 "presence_penalty", "frequency_penalty", "repetition_penalty", "stop",
                 "stop_token_ids", "include_stop_str_in_output", "ignore_eos", "min_tokens",
                 "skip_special_tokens", "use_beam_search", "length_penalty", "early_stopping")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions. prompt: a string, a list of strings, a list of
    token ids, or a list of token-id lists (one request per prompt)."""
    prompt: Any
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v):
        def is_ids(x):
            return isinstance(x, list) and bool(x) and all(
                isinstance(t, int) and not isinstance(t, bool) for t in x)
        if isinstance(v, str) or is_ids(v):
            return [v]
        if isinstance(v, list) and v and (all(isinstance(p, str) for p in v)
                                          or all(is_ids(p) for p in v)):
            return v
        raise ValueError("must be a string, a list of strings, a non-empty list of token "
                         "ids (ints) or a list of such lists")


class ChatMessage(BaseModel):
    """One message; other keys (name, tool_calls, ...) reach the template as given."""
    model_config = ConfigDict(extra="allow", strict=True)
    role: str
    content: Any = None

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, v):
        if v is None or isinstance(v, str):
            return v or ""
        if isinstance(v, list) and all(isinstance(p, dict) for p in v):
            if all(p.get("type") == "text" and isinstance(p.get("text"), str) for p in v):
                return "\n".join(p["text"] for p in v)
            kinds = sorted({str(p.get("type")) for p in v} - {"text"})
            raise ValueError(f"only text content parts are supported, got {kinds}")
        raise ValueError('must be a string or a list of {"type": "text", "text": ...} parts')


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions."""
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    tools: Any = None
    tool_choice: Any = None
    response_format: Any = None

    @field_validator("messages")
    @classmethod
    def _messages(cls, v):
        if not v:
            raise ValueError("must hold at least one message")
        return v


# ------------------------------------------------------------------ mapping
def sampling_params(req: _SamplingRequest, **fields) -> SamplingParams:
    """The request's SamplingParams; APIError 400 naming a bad field.

    fields: the endpoint's own (logprobs, max_tokens), passed as given.
    A stream gets DELTA outputs (one per engine step) when the request
    allows them (best_of == n, no beam search); everything else FINAL_ONLY
    (one output at the end, sent as one chunk when streamed).
    """
    if req.logit_bias:
        raise bad_request("logit_bias is not supported", "logit_bias")
    fields = {**req.sampling_fields(), **fields}
    try:
        sp = SamplingParams(**fields)
        if not req.stream or sp.use_beam_search or (sp.best_of or sp.n) != sp.n:
            return sp
        return dataclasses.replace(sp, output_kind=RequestOutputKind.DELTA)
    except ValueError as e:
        message = str(e)
        param = next((k for k in fields if message.startswith(k + " ")), None)
        raise bad_request(message, param) from None


def check_chat_request(req: ChatCompletionRequest) -> None:
    """Rejects what the server does not do (tools, JSON mode) rather than ignore it."""
    for name in ("tools", "tool_choice"):
        if getattr(req, name) not in (None, [], "none"):
            raise bad_request(f"{name} is not supported by this server", name)
    fmt = req.response_format
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise bad_request('response_format: only {"type": "text"} is supported',
                          "response_format")
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
    if req.max_tokens is not None and req.max_completion_tokens is not None:
        raise bad_request("give max_tokens or max_completion_tokens, not both", "max_tokens")


# ------------------------------------------------------------------ logprobs
def _lp(value) -> float:
    """A logprob as JSON can carry it (no -inf)."""
    value = float(value)
    return max(value, -9999.0)


def completion_logprobs(token_ids, entries, token_str, text_offset: int) -> tuple[dict, int]:
    """The legacy completions `logprobs` object of some tokens.

    entries: per token, {token id: logprob} of its top candidates (the
    token itself included). Returns the object and the text offset after it.
    """
    out = dict(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for t, entry in zip(token_ids, entries):
        s = token_str(t)
        out["tokens"].append(s)
        out["token_logprobs"].append(_lp(entry[t]))
        out["top_logprobs"].append({token_str(k): _lp(v) for k, v in entry.items()})
        out["text_offset"].append(text_offset)
        text_offset += len(s)
    return out, text_offset


def chat_logprobs(token_ids, entries, token_str, num_top: int) -> list[dict]:
    """The chat `logprobs.content` list of some tokens (num_top candidates each)."""
    def item(t, v):
        s = token_str(t)
        return dict(token=s, logprob=_lp(v), bytes=list(s.encode("utf-8", "replace")))
    content = []
    for t, entry in zip(token_ids, entries):
        top = sorted(entry.items(), key=lambda kv: -_lp(kv[1]))[:num_top]
        content.append(dict(item(t, entry[t]), top_logprobs=[item(k, v) for k, v in top]))
    return content
