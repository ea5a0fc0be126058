"""SamplingParams: how to sample the completions of one request.

Field names and meanings follow vLLM 0.2-0.5 (the paper's engine). Beam
search is as in vLLM 0.2-0.5: the beam width is ``best_of`` (default ``n``),
sampling is deterministic (temperature 0) and the ``n`` best beams are
returned. Host core: stdlib only, never imports jax.

Every value is checked where it is given, with a ValueError naming the
field: floats must be finite and fit a float32 (the device samples in
float32), token ids and top_k must fit an int32, and a bool, float or string
is never taken for an int. numpy scalars are accepted and stored as Python
int / float.
"""
from __future__ import annotations

import dataclasses
import enum
import math
import numbers

_SAMPLING_EPS = 1e-5


class RequestOutputKind(enum.IntEnum):
    """What the engine returns for a request, and when (vLLM's names)."""
    CUMULATIVE = 0  # after every step that adds tokens: everything so far
    DELTA = 1       # after every step that adds tokens: only what is new
    FINAL_ONLY = 2  # once, when the request has finished


class SamplingType(enum.IntEnum):
    GREEDY = 0
    RANDOM = 1
    RANDOM_SEED = 2
    BEAM = 3


_FLOAT32_MAX = 3.4028234663852886e38  # the sampler works in float32 on the device
_INT32_MAX = 2**31 - 1  # token ids and top_k live in int32 arrays there


def _is_int(value) -> bool:
    """An int, numpy's integer scalars included; never a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    """An int or float, numpy's scalars included; never a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclasses.dataclass
class SamplingParams:
    """Sampling parameters of one request (vLLM's fields).

    Attributes:
      n: completions returned, >= 1.
      best_of: completions generated (None -> n), >= n; the beam width under beam search.
      presence_penalty: subtracted once from the logit of every token already
        generated, in [-2, 2].
      frequency_penalty: subtracted per occurrence of a generated token, in [-2, 2].
      repetition_penalty: divides positive (multiplies negative) logits of tokens
        in the prompt or output, in (0, 2]; 1 is off.
      temperature: >= 0 (and a finite float32); below 1e-5 means greedy.
      top_p: nucleus mass kept, in (0, 1].
      top_k: tokens kept, -1 (off) or in [1, 2**31 - 1].
      min_p: drop tokens with probability below min_p * the top probability, in [0, 1].
      seed: per-request random seed (int >= 0) or None.
      use_beam_search: beam search of width best_of.
      length_penalty: beam score = cumulative logprob / length**length_penalty
        (a finite float32).
      early_stopping: beam search stop rule: True, False or "never".
      stop: a string or a list of strings that end a completion (excluded from the text).
      stop_token_ids: a list of token ids in [0, 2**31 - 1] that end a completion
        (kept in the token ids); the engine checks them against the vocabulary.
      include_stop_str_in_output: keep the matched stop string in the text.
      ignore_eos: keep generating after the EOS token.
      max_tokens: output tokens at most, >= 1; None -> up to max_model_len.
      min_tokens: output tokens before EOS / stop_token_ids may end it, in [0, max_tokens].
      logprobs: top log probabilities returned per output token, >= 0 or None.
      prompt_logprobs: top log probabilities returned per prompt token, >= 0 or None.
      skip_special_tokens: drop special tokens from the detokenized text.
      output_kind: a RequestOutputKind: FINAL_ONLY (one output when done),
        DELTA or CUMULATIVE (an unfinished output after every step that adds
        tokens, for streaming; needs best_of == n and no beam search). The
        text of the deltas adds up to the final text: characters that could
        still begin a stop string are held back.
    """
    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.FINAL_ONLY

    def __post_init__(self):
        self._verify_args()
        if self.use_beam_search:
            self._verify_beam_search()
        else:
            self._verify_non_beam_search()
            if self.temperature < _SAMPLING_EPS:
                # Greedy: the truncation knobs cannot change the argmax.
                self.top_p = 1.0
                self.top_k = -1
                self.min_p = 0.0
                if self.actual_best_of > 1:
                    raise ValueError(f"best_of must be 1 when using greedy sampling "
                                     f"(temperature < {_SAMPLING_EPS}), got {self.actual_best_of} "
                                     f"(best_of defaults to n)")

    def _verify_args(self) -> None:
        # NOTE: each check stores the normalised value (numpy scalars -> int / float,
        # stop and stop_token_ids -> lists), so later checks and the engine see plain types.
        def number(name, low=None, high=None, low_open=False):
            value = getattr(self, name)
            if low is None:
                allowed = f"a finite number with |{name}| <= {_FLOAT32_MAX:.4g} (float32)"
            elif high is None:
                allowed = f">= {low} and <= {_FLOAT32_MAX:.4g} (float32)"
            else:
                allowed = f"in {'(' if low_open else '['}{low}, {high}]"
            if not _is_number(value):
                raise ValueError(f"{name} must be a number {allowed}, got {value!r}")
            value = float(value)
            in_range = math.isfinite(value) and abs(value) <= _FLOAT32_MAX
            if low is not None:
                in_range = in_range and (value > low if low_open else value >= low)
            if high is not None:
                in_range = in_range and value <= high
            if not in_range:
                raise ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}")
            setattr(self, name, value)

        def integer(name, low, high=None, allow_none=False):
            value = getattr(self, name)
            if value is None and allow_none:
                return
            if not _is_int(value) or value < low or (high is not None and value > high):
                upper = f" and <= {high}" if high is not None else ""
                none = " or None" if allow_none else ""
                raise ValueError(f"{name} must be an int >= {low}{upper}{none}, got {value!r}")
            setattr(self, name, int(value))

        def boolean(name):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

        integer("n", 1)
        integer("best_of", 1, allow_none=True)
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"best_of must be >= n, got best_of={self.best_of} and n={self.n}")
        number("presence_penalty", -2.0, 2.0)
        number("frequency_penalty", -2.0, 2.0)
        number("repetition_penalty", 0.0, 2.0, low_open=True)
        number("temperature", 0.0)
        number("top_p", 0.0, 1.0, low_open=True)
        # The sampler keeps top_k in int32; any k >= the vocabulary size is off.
        if not (_is_int(self.top_k) and (self.top_k == -1 or 1 <= self.top_k <= _INT32_MAX)):
            raise ValueError(f"top_k must be -1 (off) or an int in [1, {_INT32_MAX}], "
                             f"got {self.top_k!r}")
        self.top_k = int(self.top_k)
        number("min_p", 0.0, 1.0)
        integer("seed", 0, allow_none=True)
        boolean("use_beam_search")
        number("length_penalty")
        if self.early_stopping not in (True, False, "never") or type(self.early_stopping) not in (bool, str):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        elif isinstance(self.stop, (list, tuple)):
            self.stop = list(self.stop)
        else:
            raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must be a non-empty string or a list of non-empty strings, "
                                 f"got {s!r} in {self.stop!r}")
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        elif not isinstance(self.stop_token_ids, (list, tuple)):
            raise ValueError(f"stop_token_ids must be a list of token ids (ints), got "
                             f"{self.stop_token_ids!r}; for one id write [id]")
        bad = [t for t in self.stop_token_ids if not (_is_int(t) and 0 <= t <= _INT32_MAX)]
        if bad:
            raise ValueError(f"stop_token_ids must be ints in [0, {_INT32_MAX}], got {bad[0]!r} "
                             f"in {list(self.stop_token_ids)!r}")
        self.stop_token_ids = [int(t) for t in self.stop_token_ids]
        boolean("include_stop_str_in_output")
        boolean("ignore_eos")
        integer("max_tokens", 1, allow_none=True)
        integer("min_tokens", 0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        integer("logprobs", 0, allow_none=True)
        integer("prompt_logprobs", 0, allow_none=True)
        boolean("skip_special_tokens")
        if type(self.output_kind) is not RequestOutputKind:
            if not _is_int(self.output_kind) or self.output_kind not in list(RequestOutputKind):
                raise ValueError(f"output_kind must be a RequestOutputKind, got {self.output_kind!r}")
            self.output_kind = RequestOutputKind(self.output_kind)
        if self.output_kind != RequestOutputKind.FINAL_ONLY and (
                self.use_beam_search or self.actual_best_of != self.n):
            raise ValueError(f"output_kind={self.output_kind.name} streams every sequence as it "
                             "grows: it needs best_of == n and no beam search (use FINAL_ONLY)")

    def _verify_beam_search(self) -> None:
        if self.actual_best_of < 2:
            raise ValueError(f"best_of (the beam width, default n) must be >= 2 when using beam "
                             f"search, got {self.actual_best_of}")
        if self.temperature > _SAMPLING_EPS:
            raise ValueError(f"temperature must be 0 when using beam search, got {self.temperature}")
        if self.top_p < 1.0 - _SAMPLING_EPS:
            raise ValueError(f"top_p must be 1 when using beam search, got {self.top_p}")
        if self.top_k != -1:
            raise ValueError(f"top_k must be -1 when using beam search, got {self.top_k}")
        if self.min_p > _SAMPLING_EPS:
            raise ValueError(f"min_p must be 0 when using beam search, got {self.min_p}")

    def _verify_non_beam_search(self) -> None:
        if self.early_stopping is not False:
            raise ValueError("early_stopping must be False when not using beam search "
                             f"(it only affects beam search), got {self.early_stopping!r}")
        if not 1.0 - _SAMPLING_EPS <= self.length_penalty <= 1.0 + _SAMPLING_EPS:
            raise ValueError("length_penalty must be 1.0 when not using beam search "
                             f"(it only affects beam search), got {self.length_penalty}")

    @property
    def actual_best_of(self) -> int:
        """Sequences generated: best_of, or n when best_of is None."""
        return self.n if self.best_of is None else self.best_of

    @property
    def sampling_type(self) -> SamplingType:
        if self.use_beam_search:
            return SamplingType.BEAM
        if self.temperature < _SAMPLING_EPS:
            return SamplingType.GREEDY
        if self.seed is not None:
            return SamplingType.RANDOM_SEED
        return SamplingType.RANDOM
