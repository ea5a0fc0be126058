"""Engine configuration: frozen dataclasses validated in ``__post_init__``.

``EngineConfig`` is what a user passes (``LLM(model=..., block_size=...)``);
fields left ``None`` are resolved once the model is known.
``SchedulerConfig`` is the resolved subset the scheduler reads. Host core:
stdlib only, never imports jax.
"""
from __future__ import annotations

import dataclasses

DTYPES = ("auto", "float32", "bfloat16", "float16")
PREEMPTION_MODES = (None, "recompute", "swap")
ATTENTION_BACKENDS = ("auto", "reference", "gpu", "tpu")
DEFAULT_MIN_BATCHED_TOKENS = 2048


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int(name: str, value, low: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not _is_int(value) or value < low:
        none = " or None" if allow_none else ""
        raise ValueError(f"{name} must be an int >= {low}{none}, got {value!r}")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """What the scheduler needs, every field resolved.

    Attributes:
      max_num_seqs: sequences in one step (a decode batch), at most.
      max_num_batched_tokens: tokens in one step, at most (prefill budget).
      max_model_len: tokens a sequence may hold, prompt + output.
      preemption_mode: None (recompute a single-sequence group, swap a
        multi-sequence one), "recompute" or "swap".
      enable_chunked_prefill: a step holds every decoding sequence's token
        and prompt chunks up to max_num_batched_tokens (else it is all
        prefill, whole prompts, or all decode).
      long_prefill_token_threshold: with chunked prefill, a group's prompt
        chunk in one step is at most this many tokens (0: no cap but the
        budget).
      decode_window_between_chunks: with chunked prefill, a step that
        leaves a prefill under way with more than the budget still to run is
        followed by a decode window of up to this many steps (a power of
        two; 0: none).
    """
    # (no defaults: EngineConfig.get_scheduler_config resolves every field)
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    preemption_mode: str | None
    enable_chunked_prefill: bool
    long_prefill_token_threshold: int
    decode_window_between_chunks: int

    def __post_init__(self):
        _check_int("max_num_seqs", self.max_num_seqs, 1)
        _check_int("max_num_batched_tokens", self.max_num_batched_tokens, 1)
        _check_int("max_model_len", self.max_model_len, 1)
        _check_choice("preemption_mode", self.preemption_mode, PREEMPTION_MODES)
        if not isinstance(self.enable_chunked_prefill, bool):
            raise ValueError(f"enable_chunked_prefill must be a bool, got "
                             f"{self.enable_chunked_prefill!r}")
        _check_long_prefill(self.long_prefill_token_threshold, self.enable_chunked_prefill)
        _check_between_chunks(self.decode_window_between_chunks, self.enable_chunked_prefill)
        _check_budget(self.max_num_batched_tokens, self.max_model_len, self.max_num_seqs,
                      self.enable_chunked_prefill)


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """What the KV pool and the block manager need (EngineConfig.cache_config;
    the fields' docs are EngineConfig's)."""
    block_size: int
    num_gpu_blocks: int | None
    gpu_memory_utilization: float
    swap_space: float
    enable_prefix_caching: bool
    watermark: float


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """How the model is split over devices (EngineConfig.parallel_config)."""
    tensor_parallel_size: int
    data_parallel_size: int


def _check_between_chunks(window: int, chunked: bool) -> None:
    if not _is_int(window) or window < 0 or window & (window - 1):
        raise ValueError(f"decode_window_between_chunks must be 0 or a power of two, got "
                         f"{window!r}")
    if window and not chunked:
        raise ValueError(f"decode_window_between_chunks ({window}) interleaves decode windows "
                         "with the chunks of chunked prefill: it needs enable_chunked_prefill "
                         "(0 turns it off)")


def _check_long_prefill(threshold: int, chunked: bool) -> None:
    _check_int("long_prefill_token_threshold", threshold, 0)
    if threshold and not chunked:
        raise ValueError(f"long_prefill_token_threshold ({threshold}) caps the chunks of "
                         "chunked prefill: it needs enable_chunked_prefill (0 turns it off)")


def _check_budget(budget: int, max_model_len: int, max_num_seqs: int, chunked: bool) -> None:
    # NOTE: without chunked prefill a prompt is computed in one step, so the
    # step budget must hold the longest sequence; and a full decode batch.
    if not chunked and budget < max_model_len:
        raise ValueError(f"max_num_batched_tokens ({budget}) must be >= max_model_len "
                         f"({max_model_len}): a prompt is prefilled in one step")
    if budget < max_num_seqs:
        raise ValueError(f"max_num_batched_tokens ({budget}) must be >= max_num_seqs "
                         f"({max_num_seqs}): a decode step runs one token per sequence")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Everything the engine is built from.

    Attributes:
      model: a registered model name (e.g. "smollm2-135m") or a checkpoint path.
      dtype: "auto" (the checkpoint's), "float32", "bfloat16" or "float16".
      block_size: tokens per KV block; a power of two in [1, 256].
      max_num_seqs: sequences per step, at most.
      max_num_batched_tokens: tokens per step (the largest prefill bucket); None ->
        max(2048, max_num_seqs) with chunked prefill, else max(max_model_len,
        2048, max_num_seqs).
      max_model_len: prompt + output tokens per sequence; None -> the model's.
      num_gpu_blocks: device KV blocks (block 0, the null block, included);
        None -> sized from gpu_memory_utilization.
      gpu_memory_utilization: fraction of device memory the engine may use, in (0, 1].
      swap_space: GiB of host memory for swapped-out blocks, >= 0.
      preemption_mode: None (the paper's default), "recompute" or "swap".
      enable_prefix_caching: reuse computed full blocks across requests.
      watermark: fraction of device blocks kept free when admitting, in [0, 1).
      seed: seed of the sampler's default random stream.
      tensor_parallel_size: devices the model is sharded over, >= 1.
      data_parallel_size: independent engine replicas, >= 1, each with its
        own tensor_parallel_size devices (replica r: devices r * tp to
        (r + 1) * tp - 1, so tp x dp must not exceed the devices), its own
        KV pool of num_gpu_blocks blocks and its own scheduler; requests
        go to the replica with the fewest unfinished requests
        (jpaged.data_parallel). Across hosts (jax.distributed), the
        replicas of all hosts, each within one host.
      attention_backend: "auto", "reference", "gpu" or "tpu".
      async_scheduling: schedule and dispatch the next step while the
        device still runs the current one, when nothing needs the current
        step's tokens on the host first (see jpaged.engine); the tokens are
        the same either way.
      overlap_ragged_updates: with async scheduling, a ragged step (one
        with prompt work) leaves the decode step (or window) dispatched
        before it in flight: the host updates that step only once the next
        step is dispatched, so its update, the next schedule and the next
        dispatch all run while the device runs the ragged step (short
        beside a decode window: without this the device idles after it
        while the host catches up). That step's outputs come one step()
        later; the tokens are the same either way.
      max_decode_window: decode steps one jitted call may run, a power of
        two in [1, 64]: when only decodes run, the device runs up to this
        many steps with no host in between (stop rules on the device), each
        window size from 1 up compiled at start-up. 1 turns windows off.
        Windows run only when they delay no new request's first token:
        while requests wait that the batch or the pool cannot take yet, or
        once no request has arrived for decode_window_idle_s seconds (an
        offline batch does not count: LLM.generate clears the arrival
        history once its batch is queued, LLMEngine.clear_arrivals);
        otherwise (requests arriving into a batch with room) a step decodes
        one token, so an arrival is prefilled at the next step.
      decode_window_idle_s: see max_decode_window, >= 0.
      enable_chunked_prefill: fill each step up to max_num_batched_tokens:
        every decoding sequence's next token first, then prompt chunks
        (oldest first; a long prompt runs over several steps), all in one
        ragged step, so a long prompt neither stalls the running sequences
        nor needs a bucket of its length. While no prompt work is
        schedulable, decode windows run as without it. False: a step is
        all prefill (whole prompts) or all decode.
      long_prefill_token_threshold: with chunked prefill, a prompt's chunk
        in one step is at most this many tokens (0: the budget is the only
        cap; vLLM's flag of the name). A long prompt then runs over more,
        shorter steps, so the sequences decoding beside it slow down less;
        its first token comes later (its prefill reads its cached prefix
        once a step, and the steps hold fewer of its tokens).
      decode_window_between_chunks: with chunked prefill, while a prompt
        longer than the token budget prefills, each step that holds one of
        its chunks and leaves more than a budget of it to run is followed
        by a decode window of up to this many steps (a power of two; capped
        at max_decode_window; 0: none, every step holds a chunk, vLLM's
        rule; ignored without chunked prefill). The sequences decoding
        beside a long prompt then get most of their tokens from windows,
        which cost the host a fraction of a ragged step each; the prompt's
        first token comes later by one window per chunk (on the H200, a
        32k-token prompt beside 64 decodes: their TPOT 1.33x of theirs
        alone instead of 5.2x, its TTFT 0.37 s instead of 0.14).
    """
    model: str = "smollm2-135m"
    dtype: str = "auto"
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    num_gpu_blocks: int | None = None
    gpu_memory_utilization: float = 0.9
    swap_space: float = 4.0
    preemption_mode: str | None = None
    enable_prefix_caching: bool = False
    watermark: float = 0.01
    seed: int = 0
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    attention_backend: str = "auto"
    async_scheduling: bool = True
    overlap_ragged_updates: bool = True
    max_decode_window: int = 16
    decode_window_idle_s: float = 1.0
    enable_chunked_prefill: bool = True
    long_prefill_token_threshold: int = 0
    decode_window_between_chunks: int = 16

    def __post_init__(self):
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a non-empty string (a model name or path), got {self.model!r}")
        _check_choice("dtype", self.dtype, DTYPES)
        if (not _is_int(self.block_size) or not 1 <= self.block_size <= 256
                or self.block_size & (self.block_size - 1)):
            raise ValueError(f"block_size must be a power of two in [1, 256], got {self.block_size!r}")
        _check_int("max_num_seqs", self.max_num_seqs, 1)
        _check_int("max_num_batched_tokens", self.max_num_batched_tokens, 1, allow_none=True)
        _check_int("max_model_len", self.max_model_len, 1, allow_none=True)
        _check_int("num_gpu_blocks", self.num_gpu_blocks, 2, allow_none=True)
        if not _is_number(self.gpu_memory_utilization) or not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if not _is_number(self.swap_space) or not self.swap_space >= 0:
            raise ValueError(f"swap_space must be a number of GiB >= 0, got {self.swap_space!r}")
        _check_choice("preemption_mode", self.preemption_mode, PREEMPTION_MODES)
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(f"enable_prefix_caching must be a bool, got {self.enable_prefix_caching!r}")
        if not _is_number(self.watermark) or not 0 <= self.watermark < 1:
            raise ValueError(f"watermark must be in [0, 1), got {self.watermark!r}")
        _check_int("seed", self.seed, 0)
        _check_int("tensor_parallel_size", self.tensor_parallel_size, 1)
        _check_int("data_parallel_size", self.data_parallel_size, 1)
        _check_choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        if not isinstance(self.async_scheduling, bool):
            raise ValueError(f"async_scheduling must be a bool, got {self.async_scheduling!r}")
        if not isinstance(self.overlap_ragged_updates, bool):
            raise ValueError(f"overlap_ragged_updates must be a bool, got "
                             f"{self.overlap_ragged_updates!r}")
        w = self.max_decode_window
        if not _is_int(w) or not 1 <= w <= 64 or w & (w - 1):
            raise ValueError(f"max_decode_window must be a power of two in [1, 64], got {w!r}")
        if not _is_number(self.decode_window_idle_s) or not self.decode_window_idle_s >= 0:
            raise ValueError(f"decode_window_idle_s must be a number of seconds >= 0, got "
                             f"{self.decode_window_idle_s!r}")
        if not isinstance(self.enable_chunked_prefill, bool):
            raise ValueError(f"enable_chunked_prefill must be a bool, got "
                             f"{self.enable_chunked_prefill!r}")
        _check_long_prefill(self.long_prefill_token_threshold, self.enable_chunked_prefill)
        _check_between_chunks(self.decode_window_between_chunks, True)  # (ignored unchunked)
        if self.max_num_batched_tokens is not None:  # (max_model_len: checked once resolved)
            _check_budget(self.max_num_batched_tokens, self.max_model_len or 1,
                          self.max_num_seqs, self.enable_chunked_prefill)

    def get_max_model_len(self, model_max_len: int) -> int:
        """The resolved max_model_len, given the model's own limit."""
        _check_int("model_max_len", model_max_len, 1)
        if self.max_model_len is None:
            return model_max_len
        if self.max_model_len > model_max_len:
            raise ValueError(f"max_model_len ({self.max_model_len}) exceeds the model's "
                             f"maximum context length ({model_max_len})")
        return self.max_model_len

    def cache_config(self) -> CacheConfig:
        """The KV pool's and block manager's part of this config."""
        return CacheConfig(**{f.name: getattr(self, f.name)
                              for f in dataclasses.fields(CacheConfig)})

    def parallel_config(self) -> ParallelConfig:
        return ParallelConfig(tensor_parallel_size=self.tensor_parallel_size,
                              data_parallel_size=self.data_parallel_size)

    def get_scheduler_config(self, model_max_len: int) -> SchedulerConfig:
        """The scheduler's config once the model's context length is known."""
        max_model_len = self.get_max_model_len(model_max_len)
        budget = self.max_num_batched_tokens
        if budget is None:
            budget = max(DEFAULT_MIN_BATCHED_TOKENS, self.max_num_seqs)
            if not self.enable_chunked_prefill:
                budget = max(budget, max_model_len)
        return SchedulerConfig(max_num_seqs=self.max_num_seqs, max_num_batched_tokens=budget,
                               max_model_len=max_model_len, preemption_mode=self.preemption_mode,
                               enable_chunked_prefill=self.enable_chunked_prefill,
                               long_prefill_token_threshold=self.long_prefill_token_threshold,
                               decode_window_between_chunks=self.scheduler_window_between_chunks())

    def scheduler_window_between_chunks(self) -> int:
        """decode_window_between_chunks as the scheduler takes it: at most
        max_decode_window, 0 without chunked prefill."""
        if not self.enable_chunked_prefill:
            return 0
        return min(self.decode_window_between_chunks, self.max_decode_window)

