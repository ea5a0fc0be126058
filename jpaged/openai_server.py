"""OpenAIServer: the ASGI app (Starlette) of the OpenAI-compatible server,
on one engine; ServerConfig: how it listens and admits requests.
jpaged.serve runs it with uvicorn.

One request's life:
  1. its body is checked (jpaged.openai_protocol) and its prompt rendered
     and tokenized on the event loop; a bad one gets a 400 and touches
     nothing else;
  2. AsyncEngine.add hands it to the engine loop thread (503 when the
     server already holds max_num_seqs + max_queued_requests requests);
  3. outputs come back after each engine step: a stream sends what has
     arrived as one chunk (jpaged.openai_response), otherwise they are
     gathered into one response;
  4. a client that disconnects gets its request aborted, its blocks freed.
Host only: no jax (the engine is built by the caller).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import re
import time

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from jpaged.async_engine import (AsyncEngine, EngineRequest, EngineStopped, QueueFull,
                                 engine_limits)
from jpaged.openai_protocol import (APIError, ChatCompletionRequest, CompletionRequest,
                                    bad_request, check_chat_request, parse_body,
                                    sampling_params)
from jpaged.openai_response import ResponseBuilder
from jpaged.serve_metrics import CONTENT_TYPE, ServerMetrics


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """How the server listens and admits requests.

    Attributes:
      host, port: where to listen (port 0: any free port).
      api_key: if set, /v1/* needs "Authorization: Bearer <api_key>".
      served_model_name: the name clients use in "model" (None: the engine's model).
      max_queued_requests: requests held beyond a full batch (max_num_seqs);
        one more gets a 503, so a burst costs bounded memory.
      shutdown_timeout: seconds running requests get to finish at shutdown.
    """
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None
    max_queued_requests: int = 1024
    shutdown_timeout: float = 30.0

    def __post_init__(self):
        if not (isinstance(self.port, int) and 0 <= self.port <= 65535):
            raise ValueError(f"port must be an int in [0, 65535], got {self.port!r}")
        if self.api_key is not None and not (isinstance(self.api_key, str) and self.api_key):
            raise ValueError("api_key must be a non-empty string or None")
        if not (isinstance(self.max_queued_requests, int) and self.max_queued_requests >= 0):
            raise ValueError(f"max_queued_requests must be an int >= 0, got "
                             f"{self.max_queued_requests!r}")
        if not self.shutdown_timeout >= 0:
            raise ValueError(f"shutdown_timeout must be >= 0 seconds, got "
                             f"{self.shutdown_timeout!r}")


class OpenAIServer:
    """The ASGI app (``.app``) serving `llm`'s engine; uvicorn runs it."""

    def __init__(self, llm, config: ServerConfig = ServerConfig()):
        self.config = config
        self.tokenizer = llm.get_tokenizer()
        if self.tokenizer is not None:
            self.tokenizer.encode("warm up")  # settles its padding state before threads share it
        self.limits = engine_limits(llm.engine)
        self.model_name = config.served_model_name or self.limits["model"]
        self.engine = AsyncEngine(llm.engine, self.limits["max_num_seqs"]
                                  + config.max_queued_requests)
        self.metrics = ServerMetrics(self.engine)
        self._token_strs: dict[int, str] = {}
        self.app = Starlette(
            routes=[Route("/v1/completions", self.completions, methods=["POST"]),
                    Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                    Route("/v1/models", self.models, methods=["GET"]),
                    Route("/health", self.health, methods=["GET"]),
                    Route("/metrics", self.render_metrics, methods=["GET"])],
            exception_handlers={APIError: self._api_error, HTTPException: self._http_error,
                                Exception: self._internal_error},
            lifespan=self._lifespan)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        self.engine.start()
        try:
            yield
        finally:
            await self.engine.shutdown()

    # ------------------------------------------------------------ endpoints
    async def completions(self, request):
        self._authorize(request)
        req = parse_body(CompletionRequest, await request.body())
        self._check_model(req.model)
        if req.suffix is not None:
            raise bad_request("suffix is not supported", "suffix")
        if req.echo and req.logprobs is not None:
            raise bad_request("echo together with logprobs is not supported", "echo")
        fields = dict(logprobs=req.logprobs)
        if req.max_tokens is not None:
            fields["max_tokens"] = req.max_tokens
        sp = sampling_params(req, **fields)
        prompts = [self._tokenize(p) for p in req.prompt]
        job = ResponseBuilder(chat=False, model=self.model_name, prompts=prompts, n=sp.n,
                              token_str=self._token_str, logprobs=req.logprobs,
                              echo=req.echo, echo_text=self._echo_text,
                              return_token_ids=req.return_token_ids,
                              include_usage=bool(req.stream_options
                                                 and req.stream_options.include_usage))
        return await self._serve(request, job, sp, prompts, req.stream, "prompt")

    async def chat_completions(self, request):
        self._authorize(request)
        req = parse_body(ChatCompletionRequest, await request.body())
        self._check_model(req.model)
        check_chat_request(req)
        top = (req.top_logprobs or 0) if req.logprobs else None
        limit = req.max_completion_tokens if req.max_completion_tokens is not None \
            else req.max_tokens
        sp = sampling_params(req, logprobs=top, max_tokens=limit)
        tok = self.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise bad_request("this model has no chat template: use /v1/completions", "messages")
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        try:
            text = tok.apply_chat_template(messages, tokenize=False,
                                           add_generation_prompt=req.add_generation_prompt)
        except Exception as e:  # the template rejects these messages (raise_exception)
            raise bad_request(f"messages: the chat template failed: {e}", "messages") from None
        prompts = [self._tokenize(text)]
        job = ResponseBuilder(chat=True, model=self.model_name, prompts=prompts, n=sp.n,
                              token_str=self._token_str, logprobs=top,
                              return_token_ids=req.return_token_ids,
                              include_usage=bool(req.stream_options
                                                 and req.stream_options.include_usage))
        return await self._serve(request, job, sp, prompts, req.stream, "messages")

    async def models(self, request):
        self._authorize(request)
        return JSONResponse(dict(object="list", data=[dict(
            id=self.model_name, object="model", created=int(time.time()), owned_by="jpaged",
            max_model_len=self.limits["max_model_len"])]))

    async def health(self, request):
        return Response(status_code=200 if self.engine.is_running else 503)

    async def render_metrics(self, request):
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    # ------------------------------------------------------------ one request
    async def _serve(self, request, job, sp, prompts, stream: bool, prompt_field: str):
        self._check_fits(prompts, sp, prompt_field)
        reqs = [EngineRequest(f"{job.id}-{i}", text, ids, sp)
                for i, (text, ids) in enumerate(prompts)]
        # NOTE: a client that leaves while its request waits to be taken, or
        # (not streamed) to finish, has it aborted; a stream's disconnect
        # cancels _events, which aborts in its finally.
        if stream:
            outputs = await _unless_disconnected(request, self._add(reqs, prompt_field))
            if outputs is None:
                return Response(status_code=499)
            return StreamingResponse(self._events(job, outputs), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        done = await _unless_disconnected(request, self._complete(job, reqs, prompt_field))
        return JSONResponse(job.response()) if done else Response(status_code=499)

    async def _add(self, reqs, prompt_field: str):
        try:
            return await self.engine.add(reqs)
        except QueueFull as e:
            raise APIError(503, str(e), code="queue_full") from None
        except EngineStopped as e:
            raise APIError(503, str(e)) from None
        except ValueError as e:
            raise bad_request(_user_message(str(e), len(reqs)), prompt_field) from None

    async def _complete(self, job, reqs, prompt_field: str) -> bool:
        outputs = await self._add(reqs, prompt_field)
        try:
            async for i, out in outputs:
                if out.error is not None:
                    raise APIError(500, f"prompt {i}: {out.error}" if len(reqs) > 1
                                   else out.error)
                job.add(i, out)
        except EngineStopped as e:
            raise APIError(503, str(e)) from None
        finally:
            outputs.close()
        self.metrics.observe(job, time.monotonic())
        return True

    async def _events(self, job, outputs):
        try:
            for chunk in job.first_chunks():
                yield _sse(chunk)
            async for first in outputs:
                # NOTE: outputs that queued up while this one was awaited go in
                # the same chunk, so a busy event loop sends fewer, larger chunks.
                error = None
                for i, out in [first, *outputs.ready()]:
                    error = error or out.error
                    job.add(i, out)
                if error is not None:
                    self.metrics.errors.labels("500").inc()
                    yield _sse(APIError(500, error).body())
                    break
                chunk = job.flush()
                if chunk is not None:
                    yield _sse(chunk)
            else:
                self.metrics.observe(job, time.monotonic())
                for chunk in job.last_chunks():
                    yield _sse(chunk)
        except EngineStopped as e:
            yield _sse(APIError(503, str(e)).body())
        finally:
            outputs.close()  # a client gone mid-stream lands here (cancelled)
        yield "data: [DONE]\n\n"

    # ------------------------------------------------------------ checks
    def _authorize(self, request) -> None:
        key = self.config.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise APIError(401, "missing or incorrect API key: send the header "
                           "'Authorization: Bearer <key>' with the server's --api-key",
                           code="invalid_api_key")

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(400, f"the model {model!r} does not exist: this server serves "
                           f"{self.model_name!r} (GET /v1/models)", "model", "model_not_found")

    def _check_fits(self, prompts, sp, field: str) -> None:
        limit, max_seqs = self.limits["max_model_len"], self.limits["max_num_seqs"]
        width = sp.best_of or sp.n
        if width > max_seqs:
            raise bad_request(f"n / best_of = {width}: at most {max_seqs} sequences run at "
                              "once on this server (--max-num-seqs)", "n")
        for i, (_, ids) in enumerate(prompts):
            want = len(ids) + (sp.max_tokens or 1)
            if want > limit:
                where = f"prompt {i}: " if len(prompts) > 1 else ""
                asked = (f"{len(ids)} in the {field}, {sp.max_tokens} in the completion"
                         if sp.max_tokens else f"{len(ids)} in the {field}")
                raise bad_request(f"{where}this model's maximum context length is {limit} "
                                  f"tokens, but {want} were asked for ({asked}); shorten the "
                                  f"{field} or lower max_tokens", field)

    def _tokenize(self, prompt) -> tuple[str | None, list[int]]:
        if not isinstance(prompt, str):
            return None, prompt
        if self.tokenizer is None:
            raise bad_request("this model has no tokenizer: give the prompt as token ids",
                              "prompt")
        # NOTE: the engine tokenizes a text prompt the same way (LLM.generate's ids).
        return prompt, self.tokenizer.encode(prompt)

    def _token_str(self, token_id: int) -> str:
        s = self._token_strs.get(token_id)
        if s is None:
            s = (f"token_id:{token_id}" if self.tokenizer is None
                 else self.tokenizer.decode([token_id]))
            if len(self._token_strs) < 1 << 20:
                self._token_strs[token_id] = s
        return s

    def _echo_text(self, text, ids) -> str:
        if text is not None:
            return text
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

    # ------------------------------------------------------------ errors
    async def _api_error(self, request, exc: APIError):
        self.metrics.errors.labels(str(exc.status)).inc()
        return JSONResponse(exc.body(), status_code=exc.status)

    async def _http_error(self, request, exc: HTTPException):
        return await self._api_error(request, APIError(exc.status_code, f"{exc.detail}: "
                                                       f"{request.method} {request.url.path}"))

    async def _internal_error(self, request, exc: Exception):
        # NOTE: Starlette re-raises exc after this response, so uvicorn logs it.
        return await self._api_error(request, APIError(500, f"internal server error: {exc!r}"))


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _user_message(message: str, num_prompts: int) -> str:
    """An engine ValueError's message with the internal request id turned
    into the prompt's position ("request 'cmpl-..-2': ..." -> "prompt 2: ...")."""
    m = re.match(r"request '[^']*-(\d+)'(: | )?", message)
    if not m:
        return message
    rest = message[m.end():]
    return f"prompt {m.group(1)}: {rest}" if num_prompts > 1 else rest


async def _unless_disconnected(request, coro):
    """Runs coro; None if the client disconnects first (coro is cancelled)."""
    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass
    task, watch = asyncio.ensure_future(coro), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        return task.result() if task.done() else None
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
