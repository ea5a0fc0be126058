"""SamplingParams: how to sample the completions of one request.

Field names and meanings follow vLLM 0.2-0.5 (the paper's engine). Beam
search is as in vLLM 0.2-0.5: the beam width is ``best_of`` (default ``n``),
sampling is deterministic (temperature 0) and the ``n`` best beams are
returned. Host core: stdlib only, never imports jax.
"""
from __future__ import annotations

import dataclasses
import enum

_SAMPLING_EPS = 1e-5


class SamplingType(enum.IntEnum):
    GREEDY = 0
    RANDOM = 1
    RANDOM_SEED = 2
    BEAM = 3


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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
      temperature: >= 0; below 1e-5 means greedy.
      top_p: nucleus mass kept, in (0, 1].
      top_k: tokens kept, -1 (off) or >= 1.
      min_p: drop tokens with probability below min_p * the top probability, in [0, 1].
      seed: per-request random seed (int >= 0) or None.
      use_beam_search: beam search of width best_of.
      length_penalty: beam score = cumulative logprob / length**length_penalty.
      early_stopping: beam search stop rule: True, False or "never".
      stop: strings that end a completion (excluded from the text).
      stop_token_ids: token ids that end a completion (kept in the token ids).
      include_stop_str_in_output: keep the matched stop string in the text.
      ignore_eos: keep generating after the EOS token.
      max_tokens: output tokens at most, >= 1; None -> up to max_model_len.
      min_tokens: output tokens before EOS / stop_token_ids may end it, in [0, max_tokens].
      logprobs: top log probabilities returned per output token, >= 0 or None.
      prompt_logprobs: top log probabilities returned per prompt token, >= 0 or None.
      skip_special_tokens: drop special tokens from the detokenized text.
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

    def __post_init__(self):
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = [] if self.stop_token_ids is None else list(self.stop_token_ids)
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
        def number(name, low, high, low_open=False):
            value = getattr(self, name)
            lo_ok = value > low if low_open else value >= low
            if not _is_number(value) or not (lo_ok and value <= high):
                left = "(" if low_open else "["
                raise ValueError(f"{name} must be in {left}{low}, {high}], got {value!r}")

        def integer(name, low, allow_none=False):
            value = getattr(self, name)
            if value is None and allow_none:
                return
            if not _is_int(value) or value < low:
                none = " or None" if allow_none else ""
                raise ValueError(f"{name} must be an int >= {low}{none}, got {value!r}")

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
        if not _is_number(self.temperature) or not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        number("top_p", 0.0, 1.0, low_open=True)
        if not _is_int(self.top_k) or not (self.top_k == -1 or self.top_k >= 1):
            raise ValueError(f"top_k must be -1 (off) or an int >= 1, got {self.top_k!r}")
        number("min_p", 0.0, 1.0)
        integer("seed", 0, allow_none=True)
        boolean("use_beam_search")
        if not _is_number(self.length_penalty):
            raise ValueError(f"length_penalty must be a number, got {self.length_penalty!r}")
        if self.early_stopping not in (True, False, "never") or type(self.early_stopping) not in (bool, str):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must be a non-empty string or a list of non-empty strings, got {s!r}")
        for t in self.stop_token_ids:
            if not _is_int(t) or t < 0:
                raise ValueError(f"stop_token_ids must be ints >= 0, got {t!r}")
        boolean("include_stop_str_in_output")
        boolean("ignore_eos")
        integer("max_tokens", 1, allow_none=True)
        integer("min_tokens", 0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        integer("logprobs", 0, allow_none=True)
        integer("prompt_logprobs", 0, allow_none=True)
        boolean("skip_special_tokens")

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
