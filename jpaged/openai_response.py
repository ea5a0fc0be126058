"""ResponseBuilder: one HTTP request's engine outputs as OpenAI bodies, for
/v1/completions and /v1/chat/completions: stream chunks as outputs arrive,
or one response at the end. Host only: no jax.
"""
from __future__ import annotations

import dataclasses
import time
import uuid

from jpaged.openai_protocol import chat_logprobs, completion_logprobs


@dataclasses.dataclass
class _Choice:
    index: int
    prefix: str = ""  # the echoed prompt
    text: str = ""
    token_ids: list = dataclasses.field(default_factory=list)
    logprobs: list = dataclasses.field(default_factory=list)  # per token {id: logprob}
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    text_offset: int = 0  # completions logprobs: where the next token's text starts
    # What stream chunks have carried so far.
    num_sent_tokens: int = 0
    num_sent_chars: int = 0
    sent_finish: bool = False


class ResponseBuilder:
    """Gathers the outputs of one request's prompts (n choices each).

    Args:
      chat: chat.completion bodies, else text_completion.
      model: the served model's name.
      prompts: (text or None, token ids) per prompt; choice i * n + j is
        prompt i's completion j.
      token_str: token id -> its text (logprobs tokens).
      logprobs: top candidates per token, None for no logprobs.
      echo: completions only: the prompt text leads each choice.
      return_token_ids: each choice (and chunk) also carries its token ids.
      include_usage: a stream ends with a usage-only chunk (else the last
        chunk carries the usage).
    """

    def __init__(self, *, chat: bool, model: str, prompts, n: int, token_str,
                 logprobs: int | None = None, echo: bool = False,
                 return_token_ids: bool = False, include_usage: bool = False,
                 echo_text=None):
        self.chat, self.model, self.n = chat, model, n
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.object = "chat.completion" if chat else "text_completion"
        self.created = int(time.time())
        self.token_str, self.logprobs = token_str, logprobs
        self.return_token_ids, self.include_usage = return_token_ids, include_usage
        self.num_prompt_tokens = sum(len(ids) for _, ids in prompts)
        self.choices = [_Choice(i * n + j) for i in range(len(prompts)) for j in range(n)]
        if echo:
            for c in self.choices:
                c.prefix = echo_text(*prompts[c.index // n])
                c.text_offset = len(c.prefix)
        # Wall times (time.monotonic) for the TTFT / TPOT metrics.
        self.t_start = time.monotonic()
        self.t_first_token: float | None = None
        self.t_last_token: float | None = None

    @property
    def done(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    @property
    def max_output_tokens(self) -> int:
        return max((len(c.token_ids) for c in self.choices), default=0)

    def usage(self) -> dict:
        num_out = sum(len(c.token_ids) for c in self.choices)
        return dict(prompt_tokens=self.num_prompt_tokens, completion_tokens=num_out,
                    total_tokens=self.num_prompt_tokens + num_out)

    def add(self, prompt_index: int, output) -> None:
        """Takes one RequestOutput of prompt `prompt_index`: a delta, or the
        whole output once (FINAL_ONLY)."""
        got_tokens = False
        for out in output.outputs:
            c = self.choices[prompt_index * self.n + out.index]
            if c.finish_reason is not None:
                continue
            got_tokens = got_tokens or bool(out.token_ids)
            c.text += out.text
            c.token_ids += out.token_ids
            c.logprobs += out.logprobs or []
            c.finish_reason, c.stop_reason = out.finish_reason, out.stop_reason
        if got_tokens:
            now = self.t_last_token = time.monotonic()
            if self.t_first_token is None:
                # A finished first output may hold every token (FINAL_ONLY): the
                # engine's metrics (same clock) know when the first one came.
                first = getattr(output.metrics, "first_token_time", None) if output.finished \
                    else None
                self.t_first_token = min(now, first) if first is not None else now

    def flush(self) -> dict | None:
        """The stream chunk of everything added since the last flush (None if
        nothing a client sees is new): one part per choice that changed."""
        parts = []
        for c in self.choices:
            ids, text = c.token_ids[c.num_sent_tokens:], c.text[c.num_sent_chars:]
            finished = c.finish_reason is not None and not c.sent_finish
            # NOTE: tokens whose text is held back (a partial character, a
            # possible stop string) make a chunk only if the client sees tokens.
            if text or finished or (ids and (self.return_token_ids or self.logprobs is not None)):
                lps = c.logprobs[c.num_sent_tokens:]
                c.num_sent_tokens, c.num_sent_chars = len(c.token_ids), len(c.text)
                c.sent_finish = c.finish_reason is not None
                parts.append(self._choice(c, text, ids, lps, stream=True))
        if not parts:
            return None
        chunk = self.chunk(parts)
        if self.done and not self.include_usage:
            chunk["usage"] = self.usage()
        return chunk

    def chunk(self, choices: list[dict]) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return dict(id=self.id, object=obj, created=self.created, model=self.model,
                    choices=choices)

    def first_chunks(self) -> list[dict]:
        """What a stream sends before any output: the assistant role (chat),
        the echoed prompts (completions)."""
        if self.chat:
            return [self.chunk([dict(index=c.index, delta=dict(role="assistant", content=""),
                                     logprobs=None, finish_reason=None)
                                for c in self.choices])]
        echoed = [dict(index=c.index, text=c.prefix, logprobs=None, finish_reason=None)
                  for c in self.choices if c.prefix]
        return [self.chunk(echoed)] if echoed else []

    def last_chunks(self) -> list[dict]:
        if not self.include_usage:
            return []
        return [dict(self.chunk([]), usage=self.usage())]

    def response(self) -> dict:
        """The whole (non-streamed) response body."""
        return dict(id=self.id, object=self.object, created=self.created, model=self.model,
                    choices=[self._choice(c, c.text, c.token_ids, c.logprobs, stream=False)
                             for c in self.choices],
                    usage=self.usage())

    def _choice(self, c: _Choice, text: str, ids, lps, *, stream: bool) -> dict:
        lp = None
        if self.logprobs is not None and self.chat:
            lp = dict(content=chat_logprobs(ids, lps, self.token_str, self.logprobs))
        elif self.logprobs is not None:
            offset = c.text_offset if stream else len(c.prefix)
            lp, end = completion_logprobs(ids, lps, self.token_str, offset)
            if stream:
                c.text_offset = end
        if self.chat:
            body = dict(delta=dict(content=text)) if stream else dict(
                message=dict(role="assistant", content=text))
        else:
            body = dict(text=text if stream else c.prefix + text)
        out = dict(index=c.index, **body, logprobs=lp, finish_reason=c.finish_reason,
                   stop_reason=c.stop_reason)
        if self.return_token_ids:
            out["token_ids"] = ids
        return out
