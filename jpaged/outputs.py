"""What `LLM.generate` returns: RequestOutput with CompletionOutputs (vLLM's names).

Host-side plain data (no jax). Logprobs are of the model's raw distribution
(see jpaged/sampler.py).
"""
from __future__ import annotations

import dataclasses
from typing import Literal, Optional

FinishReason = Literal["stop", "length", "abort"]

# Lists longer than this are shortened in reprs (the data itself is whole).
_REPR_MAX_ITEMS = 16


def _short(items) -> str:
    if items is None:
        return "None"
    items = list(items)
    if len(items) <= _REPR_MAX_ITEMS:
        return repr(items)
    head = ", ".join(repr(x) for x in items[:_REPR_MAX_ITEMS])
    return f"[{head}, ... ({len(items)} in all)]"


# Per position: token id -> its raw logprob; the sampled (or prompt) token is
# always included beside the top-k. A prompt's first position has no
# logprobs: None.
PositionLogprobs = dict[int, float]


@dataclasses.dataclass
class CompletionOutput:
    """One generated sequence of a request.

    index:              which of the request's n sequences (0-based)
    text:               the detokenized output ('' without a tokenizer); a
                        stop string is cut off unless include_stop_str_in_output
    token_ids:          the generated token ids
    cumulative_logprob: sum of the raw logprobs of token_ids (None if not tracked)
    logprobs:           per generated token, its PositionLogprobs, or None
                        when logprobs were not requested
    finish_reason:      "stop" (EOS, stop token or stop string), "length"
                        (max_tokens or the model's length limit), "abort",
                        or None while running
    stop_reason:        the stop string or stop token id that stopped it;
                        None for EOS, length or while running
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: Optional[float] = None
    logprobs: Optional[list[PositionLogprobs]] = None
    finish_reason: Optional[FinishReason] = None
    stop_reason: int | str | None = None

    def __repr__(self) -> str:
        lp = None if self.logprobs is None else _short(self.logprobs)
        return (f"CompletionOutput(index={self.index}, text={self.text!r}, "
                f"token_ids={_short(self.token_ids)}, cumulative_logprob={self.cumulative_logprob}, "
                f"logprobs={lp}, finish_reason={self.finish_reason!r}, stop_reason={self.stop_reason!r})")


@dataclasses.dataclass
class RequestMetrics:
    """Wall-clock times (time.monotonic() seconds) of one request.

    arrival_time:         when the engine received it
    first_scheduled_time: when it first ran a step
    first_token_time:     when its first output token was sampled
    last_token_time:      when its latest output token was sampled
    finished_time:        when it finished (or was rejected)
    time_in_queue:        first_scheduled_time - arrival_time
    num_preemptions:      times it was preempted (swapped out or recomputed)
    """

    arrival_time: float
    first_scheduled_time: Optional[float] = None
    first_token_time: Optional[float] = None
    last_token_time: Optional[float] = None
    finished_time: Optional[float] = None
    time_in_queue: Optional[float] = None
    num_preemptions: int = 0


@dataclasses.dataclass
class RequestOutput:
    """The state of one request: its prompt and its sequences so far.

    request_id:       the engine's id of the request
    prompt:           the prompt text (None when given as token ids)
    prompt_token_ids: the prompt's token ids
    prompt_logprobs:  per prompt position a PositionLogprobs (None at
                      position 0), or None when not requested
    outputs:          the CompletionOutputs (n of them; for best_of / beam
                      search the n best)
    finished:         every sequence has finished
    metrics:          RequestMetrics
    error:            why the request was rejected (e.g. its prompt is longer
                      than the model allows); its outputs are then empty
                      text with finish_reason "abort"
    """

    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    prompt_logprobs: Optional[list[Optional[PositionLogprobs]]]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: Optional[RequestMetrics] = None
    error: Optional[str] = None

    @classmethod
    def from_error(cls, request_id: str, prompt: Optional[str], prompt_token_ids: list[int],
                   error: str, n: int = 1, metrics: Optional[RequestMetrics] = None) -> RequestOutput:
        """A finished output for a request that was rejected with `error`."""
        outputs = [CompletionOutput(index=i, text="", token_ids=[], finish_reason="abort")
                   for i in range(n)]
        return cls(request_id, prompt, list(prompt_token_ids), None, outputs, True, metrics, error)

    def __repr__(self) -> str:
        plp = None if self.prompt_logprobs is None else _short(self.prompt_logprobs)
        err = f", error={self.error!r}" if self.error is not None else ""
        return (f"RequestOutput(request_id={self.request_id!r}, prompt={self.prompt!r}, "
                f"prompt_token_ids={_short(self.prompt_token_ids)}, prompt_logprobs={plp}, "
                f"outputs={self.outputs!r}, finished={self.finished}, metrics={self.metrics!r}{err})")
