"""LLMEngine: continuous batching over a paged KV cache.

One engine step:
  1. schedule: ``Scheduler.schedule()`` picks the groups that run (all
     prefill or all decode), preempting the latest arrivals when the pool
     runs dry, and lists block swaps and copy-on-write copies.
  2. execute: ``ModelRunner`` moves swapped blocks (one gathered transfer per
     chunk), performs the copies, pads the step into its bucket and runs the
     jitted model + sampler with the KV pool donated.
  3. update (commit): once the step's results are on the host, each group
     records its computed tokens (and, with prefix caching, publishes the
     blocks now written), then appends its sampled tokens; parallel samples
     fork from their prompt, beams fork and free through the block manager;
     stop conditions are checked on token ids and on detokenized text;
     finished sequences give their blocks back.

A step is all or nothing. If anything raises before a group's update is
done (an error on the device, a bug, an interrupt), ``_recover`` undoes the
step for every group it concerns: recompute preemption, which keeps the
tokens the host holds and frees every block, so nothing the step recorded
stays visible. An interrupt (KeyboardInterrupt) then propagates and the
groups resume on a later step; any other exception fails exactly those
groups, each with an error output, and ``step`` returns normally. A group
caught half-way through its own update is failed either way. A real Ctrl-C
is held (``InterruptGuard``) until the step's host state is whole, except
while the host waits for the device. If the KV pool itself was lost (its
donated buffers consumed by a failed call), it is allocated again and every
group that had blocks on the device is recomputed.

Async scheduling (``EngineConfig.async_scheduling``, on by default) overlaps
the host with the device: a step that needs no host decision before the next
one (no beam search, no parallel-sampling fork, no penalties, no prompt
logprobs, prefix caching off) stays in flight. Its sequences get a
placeholder token, the next step is scheduled and dispatched at once and
reads those tokens on the device, and only then does the host wait for the
first step's results and update (3). A sequence that stopped in the first
step computed one extra token in the second, which is dropped. Before
scheduling, the in-flight step is finished first whenever the next schedule
could preempt (too few free blocks for every running sequence's next slot)
or a sequence reached max_model_len with it, so preemption and swapping
only ever see known tokens.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time

import numpy as np

from jpaged import inputs
from jpaged.config import EngineConfig
from jpaged.detokenizer import Detokenizer
from jpaged.interrupts import InterruptGuard
from jpaged.model_runner import MAX_LOGPROBS, ModelRunner, PendingStep, SeqInput
from jpaged.sampler import MAX_BANNED, derive_seed
from jpaged.outputs import CompletionOutput, RequestMetrics, RequestOutput
from jpaged.sampling_params import RequestOutputKind, SamplingParams, SamplingType
from jpaged.block_manager import BlockSpaceManager
from jpaged.scheduler import ScheduledSequenceGroup, Scheduler, SchedulerOutput
from jpaged.sequence import PLACEHOLDER_TOKEN_ID, Sequence, SequenceGroup, SequenceStatus

CPU_DEFAULT_KV_BYTES = 1 << 30  # KV pool size on a device that reports no memory

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class _SeqState:
    """Engine-side state of one sequence: its sampling seed, its incremental
    detokenizer state (None without a tokenizer), and for streamed requests
    how many of its tokens and characters went out already."""
    seed: int
    detok: object
    num_sent_tokens: int = 0
    num_sent_chars: int = 0


@dataclasses.dataclass
class _InFlight:
    """A dispatched step and what its update needs.

    scheduled: the step's groups, in order; the first ``num_committed`` of
      them have been updated with its results.
    group_rows: per scheduled group, its sampler rows as
      (seq, sample index j, seed, row).
    rows: seq_id -> sampler row, for the sequences holding a placeholder
      that the next step reads on the device (run-ahead steps only).
    ends_a_sequence: a sequence reaches max_model_len with this step's
      token, so no step may run ahead of it (there is no slot past the end).
    """
    scheduled: list[ScheduledSequenceGroup]
    group_rows: list[list]
    spans: dict
    step: PendingStep
    ahead: bool
    rows: dict = dataclasses.field(default_factory=dict)
    num_committed: int = 0
    ends_a_sequence: bool = False


class LLMEngine:
    """Adds requests, steps the schedule -> execute -> update loop."""

    def __init__(self, config: EngineConfig, model=None, warm_up: bool = True,
                 progress: bool = True, block_manager_factory=None):
        """block_manager_factory: optional callable with BlockSpaceManager's
        signature (block_size, num_gpu_blocks, num_cpu_blocks, watermark=,
        enable_prefix_caching=) returning a compatible manager, e.g. the
        contiguous-reservation baseline of jpaged.reservation."""
        enable_compilation_cache()
        if model is None:
            import models
            model = models.load_model(config.model, dtype=_resolve_dtype(config.dtype),
                                      attention_backend=config.attention_backend)
        self.model = model
        self.tokenizer = model.tokenizer
        sched_config = config.get_scheduler_config(model.config.max_position_embeddings)
        max_model_len = sched_config.max_model_len
        max_batched = sched_config.max_num_batched_tokens
        self.config = config = dataclasses.replace(
            config, max_model_len=max_model_len, max_num_batched_tokens=max_batched)
        num_gpu_blocks = config.num_gpu_blocks
        if num_gpu_blocks is None and not _device_reports_memory():
            num_gpu_blocks = max(2, CPU_DEFAULT_KV_BYTES // model.kv_bytes_per_block(config.block_size))
        self.runner = ModelRunner(
            model, block_size=config.block_size, max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=max_batched, max_model_len=max_model_len,
            num_gpu_blocks=num_gpu_blocks,
            gpu_memory_utilization=config.gpu_memory_utilization,
            swap_space_gib=config.swap_space,
            attention_backend=config.attention_backend,
            tensor_parallel_size=config.tensor_parallel_size)
        self.block_manager = (block_manager_factory or BlockSpaceManager)(
            config.block_size, self.runner.num_gpu_blocks, self.runner.num_cpu_blocks,
            watermark=config.watermark,
            enable_prefix_caching=config.enable_prefix_caching)
        self.scheduler = Scheduler(sched_config, self.block_manager)
        self.eos_token_ids = _eos_ids(model)  # every id that ends a sequence (Llama 3: several)
        self.detokenizer = Detokenizer(self.tokenizer) if self.tokenizer is not None else None
        self._seq_ids = itertools.count()
        self._rng = np.random.default_rng(config.seed)
        self._requests: dict[str, SequenceGroup] = {}  # every request not yet handed back
        self._outputs: list[RequestOutput] = []        # finished, not yet returned by step()
        self._states: dict[int, _SeqState] = {}
        self._finished_beams: dict[str, list[Sequence]] = {}
        # The step in progress, for _recover: its schedule, the step just
        # dispatched from it, the previous step whose results are awaited,
        # and the group being updated.
        self._inflight: _InFlight | None = None
        self._launched: _InFlight | None = None
        self._scheduled: SchedulerOutput | None = None
        self._updating: SequenceGroup | None = None
        self._in_schedule = False
        self._guard = InterruptGuard()
        self._wait = 0.0  # seconds of the current step spent waiting for the device
        # host_seconds: step time the host spent working; device_seconds:
        # time it waited for device results (with async scheduling the device
        # also runs while the host works); dispatch_seconds: the part of
        # host_seconds spent in runner.dispatch (input arrays and the jitted
        # call). num_steps_ahead: steps dispatched before the previous step's
        # results were on the host. num_failed_steps: steps undone by _recover.
        self.stats = dict(num_steps=0, num_steps_ahead=0, num_prefill_tokens=0,
                          num_cached_prompt_tokens=0, num_generated_tokens=0,
                          peak_blocks_used=0, host_seconds=0.0, device_seconds=0.0,
                          dispatch_seconds=0.0, num_failed_steps=0)
        if warm_up:
            self.runner.warm_up(progress=progress)

    # ------------------------------------------------------------ requests
    def add_request(self, request_id: str, prompt: str | None,
                    sampling_params: SamplingParams,
                    prompt_token_ids: list[int] | None = None,
                    arrival_time: float | None = None) -> None:
        """Queues one request. Raises ValueError for a malformed request that
        cannot even be queued (nothing is queued then); a prompt too long
        for the model is queued and comes back as a RequestOutput with
        `error` set. request_id: a str, unique among the engine's unfinished
        requests (and their outputs not yet returned)."""
        prompt_token_ids = self.prepare_request(request_id, prompt, sampling_params,
                                                prompt_token_ids)
        seq = Sequence(next(self._seq_ids), prompt, prompt_token_ids, self.config.block_size)
        seed = sampling_params.seed
        if seed is None:
            seed = int(self._rng.integers(0, 1 << 31))
        group = SequenceGroup(request_id, [seq], sampling_params,
                              arrival_time if arrival_time is not None else time.monotonic())
        self._states[seq.seq_id] = _SeqState(seed, self._new_detok(prompt_token_ids,
                                                                   sampling_params))
        self._requests[request_id] = group
        self.scheduler.add_seq_group(group)

    def prepare_request(self, request_id, prompt, sampling_params,
                        prompt_token_ids=None) -> list[int]:
        """Checks a request and tokenizes its prompt; ValueError if malformed.

        Returns the prompt's token ids (Python ints)."""
        inputs.check_request_id(request_id)
        if self.has_request(request_id):
            raise ValueError(f"request {request_id!r} is already in the engine: request ids "
                             "must be unique among unfinished requests")
        name = f"request {request_id!r}"
        if not isinstance(sampling_params, SamplingParams):
            raise ValueError(f"{name}: sampling_params must be a SamplingParams, got "
                             f"{type(sampling_params).__name__}")
        if prompt is not None and not isinstance(prompt, str):
            raise ValueError(f"{name}: prompt must be a string or None (token ids go in "
                             f"prompt_token_ids), got {type(prompt).__name__}")
        vocab = self.model.config.vocab_size
        if prompt_token_ids is None:
            if prompt is None:
                raise ValueError(f"{name} needs a prompt or prompt_token_ids")
            if self.tokenizer is None:
                raise ValueError(f"{name}: this model has no tokenizer, pass prompt_token_ids")
            prompt_token_ids = self.tokenizer.encode(prompt)
        prompt_token_ids = inputs.token_ids(prompt_token_ids, f"{name}: prompt_token_ids", vocab)
        if not prompt_token_ids:
            raise ValueError(f"{name}: the prompt is empty")
        sp = sampling_params
        inputs.token_ids(sp.stop_token_ids, f"{name}: stop_token_ids", vocab)
        if sp.use_beam_search and sp.actual_best_of * 2 > MAX_LOGPROBS:
            raise ValueError(f"{name}: beam width {sp.actual_best_of} is too large: "
                             f"at most {MAX_LOGPROBS // 2}")
        if (sp.logprobs or 0) > MAX_LOGPROBS:
            raise ValueError(f"{name}: logprobs={sp.logprobs}, at most {MAX_LOGPROBS}")
        if (sp.prompt_logprobs or 0) > MAX_LOGPROBS:
            raise ValueError(f"{name}: prompt_logprobs={sp.prompt_logprobs}, "
                             f"at most {MAX_LOGPROBS}")
        num_eos = len(self.eos_token_ids)
        if sp.min_tokens and len(sp.stop_token_ids) + num_eos > MAX_BANNED:
            raise ValueError(f"{name}: with min_tokens, at most {MAX_BANNED - num_eos} "
                             "stop_token_ids")
        return prompt_token_ids

    def abort_request(self, request_id) -> None:
        """Drops one request id (or an iterable of ids), queued, running or
        finished but not yet returned; its blocks are freed and no output
        comes back for it. Unknown ids are ignored."""
        ids = {request_id} if isinstance(request_id, str) else set(request_id)
        self._outputs = [o for o in self._outputs if o.request_id not in ids]
        for rid in ids:
            group = self._requests.pop(rid, None)
            if group is None:
                continue
            self._forget(group)
            self.scheduler.abort_seq_group(rid)
            for seq in group.get_seqs():  # also a group no queue holds
                self.block_manager.free(seq)
                if not seq.is_finished():
                    seq.status = SequenceStatus.FINISHED_ABORTED
        inflight = self._inflight
        if inflight is not None and all(s.seq_group.is_finished() for s in inflight.scheduled):
            self._inflight = None  # nothing left reads its results

    def has_request(self, request_id: str) -> bool:
        """Whether the id names a request not yet handed back by step()."""
        return request_id in self._requests or any(
            o.request_id == request_id for o in self._outputs)

    def has_unfinished_requests(self) -> bool:
        """Whether step() has more to do or to return."""
        return bool(self._outputs) or self.scheduler.has_unfinished_seqs()

    def keep_outputs(self, outputs: list[RequestOutput]) -> None:
        """Hands finished outputs back: the next step() returns them again
        (LLM.generate does this with the requests of other callers)."""
        self._outputs.extend(outputs)

    # ------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        """Runs one schedule -> execute -> update round; returns the
        requests that finished in it (rejected and failed ones included,
        with `error` set). With async scheduling the update is that of the
        previous step, run while this one is on the device. A step that
        fails is undone (module docstring): an exception fails the requests
        it concerns, a KeyboardInterrupt propagates after the rollback. A
        Ctrl-C held during host work is raised once the step is whole: at
        its end, or, when it has outputs to return, at the start of the
        next call (so no finished output is lost to it)."""
        self._guard.raise_pending()  # held at the end of the last step (nothing to undo)
        t0 = time.perf_counter()
        self._wait = 0.0
        try:
            with self._guard:
                self._step()
        except BaseException as exc:
            self._recover(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            self.stats["host_seconds"] += time.perf_counter() - t0 - self._wait
            self.stats["device_seconds"] += self._wait
        outputs, self._outputs = self._outputs, []
        if not outputs:  # a held Ctrl-C acts now; with outputs, at the next step's start
            self._guard.raise_pending()
        return outputs

    def _step(self) -> None:
        if self._inflight is not None and self._must_finish_inflight():
            self._finish_inflight()
        self._in_schedule = True
        out = self._scheduled = self.scheduler.schedule()
        self._in_schedule = False
        for g, reason in out.ignored_seq_groups:
            self._emit(self._error_output(g, reason))
        if out.blocks_to_swap_out:
            self.runner.swap_out(out.blocks_to_swap_out)
        if out.blocks_to_swap_in:
            self.runner.swap_in(out.blocks_to_swap_in)
        if out.blocks_to_copy:
            self.runner.copy_blocks(out.blocks_to_copy)
        launched = None
        if out.scheduled_seq_groups:
            seq_inputs, rows, group_rows, spans = self._build_inputs(
                out.scheduled_seq_groups, out.is_prefill)
            prev = self._inflight.step if self._inflight is not None else None
            t = time.perf_counter()
            step = self.runner.dispatch(seq_inputs, rows, out.is_prefill, prev)
            self.stats["dispatch_seconds"] += time.perf_counter() - t
            groups = [s.seq_group for s in out.scheduled_seq_groups]
            launched = self._launched = _InFlight(
                out.scheduled_seq_groups, group_rows, spans, step,
                ahead=self._may_run_ahead(groups, out.is_prefill, step))
            self.stats["num_steps"] += 1
            self.stats["num_steps_ahead"] += prev is not None
        if self._inflight is not None:  # the previous step, while this one runs
            self._finish_inflight()
        if launched is not None:
            if launched.ahead:
                limit = self.config.max_model_len
                i = 0
                for entries in launched.group_rows:
                    for seq, _, _, _ in entries:
                        if seq.status == SequenceStatus.RUNNING:
                            seq.append_token_id(PLACEHOLDER_TOKEN_ID, 0.0)
                            launched.rows[seq.seq_id] = i
                            launched.ends_a_sequence |= seq.get_len() >= limit
                        i += 1
            self._inflight, self._launched = launched, None
            if not launched.ahead:
                self._finish_inflight()
        self._scheduled = None
        self.scheduler.free_finished_seq_groups()
        if self._inflight is not None and not self.scheduler.has_unfinished_seqs():
            self._finish_inflight()  # only stopped sequences: leave the engine idle
        used = self.runner.num_gpu_blocks - 1 - self.block_manager.get_num_free_gpu_blocks()
        self.stats["peak_blocks_used"] = max(self.stats["peak_blocks_used"], used)

    def _must_finish_inflight(self) -> bool:
        """Whether the in-flight step's results are needed before the next
        schedule: it could preempt, a sequence has no slot left past the
        in-flight token, or every running sequence ends with that token (a
        step run ahead would be all waste)."""
        if self._inflight.ends_a_sequence or not self.scheduler.can_decode_without_preemption():
            return True
        limit = self.config.max_model_len
        for g in self.scheduler.running:
            max_tokens = g.sampling_params.max_tokens
            for seq in g.get_seqs(SequenceStatus.RUNNING):
                if not ((max_tokens is not None and seq.get_output_len() >= max_tokens)
                        or seq.get_len() >= limit):
                    return False
        return True

    def _may_run_ahead(self, groups, is_prefill, step) -> bool:
        """Whether the next step may be scheduled before this one's results
        are on the host: nothing in it needs a host decision first."""
        if not self.config.async_scheduling or step.result is not None \
                or getattr(self.block_manager, "enable_prefix_caching", False):
            return False
        for g in groups:
            sp = g.sampling_params
            if (sp.sampling_type == SamplingType.BEAM or sp.presence_penalty != 0
                    or sp.frequency_penalty != 0 or sp.repetition_penalty != 1
                    or (is_prefill and (sp.actual_best_of > 1 or sp.prompt_logprobs is not None))):
                return False
        return True

    def _finish_inflight(self) -> None:
        """Waits for the in-flight step's results and commits them, one
        group at a time (each group's update is its own unit for _recover)."""
        inflight = self._inflight
        t = time.perf_counter()
        with self._guard.allowed():
            result = self.runner.fetch(inflight.step)
        self._wait += time.perf_counter() - t
        for i in range(inflight.num_committed, len(inflight.scheduled)):
            scheduled = inflight.scheduled[i]
            g = scheduled.seq_group
            # A group that finished (stopped one step earlier, or was aborted)
            # since this step was dispatched takes no part.
            if not g.is_finished():
                self._updating = g
                self.scheduler.mark_computed(scheduled)
                self._update(g, inflight.group_rows[i], result)
                if result.prompt_logprobs is not None:
                    self._record_prompt_logprobs(g, inflight.spans, result)
                if g.is_finished():
                    self._emit(self._final_output(g))
                elif g.sampling_params.output_kind != RequestOutputKind.FINAL_ONLY:
                    self._outputs.append(self._stream_output(g))
                self._updating = None
            inflight.num_committed = i + 1
        self._inflight = None

    # ------------------------------------------------------------ failures
    def _recover(self, exc: BaseException) -> None:
        """Undoes the failed step (module docstring): every group it
        concerns is rolled back, or failed with an error output when `exc`
        is an Exception; the group caught mid-update is failed."""
        self.stats["num_failed_steps"] += 1
        touched: dict[int, SequenceGroup] = {}
        for step in (self._inflight, self._launched):
            if step is not None:
                for s in step.scheduled[step.num_committed:]:
                    touched[id(s.seq_group)] = s.seq_group
        if self._scheduled is not None:
            for g in [s.seq_group for s in self._scheduled.scheduled_seq_groups] + \
                    self._scheduled.swapped_out:
                touched[id(g)] = g
        lost = list(self._requests.values())
        if self._in_schedule:
            # The scheduler stopped half-way: only a group still waiting
            # with no blocks is sure to be untouched.
            waiting = {id(g) for g in self.scheduler.waiting}
            touched.update((id(g), g) for g in lost if id(g) not in waiting or any(
                self.block_manager.has_block_table(s) for s in g.get_seqs()))
            lost = []
        elif self.runner.kv_pool_is_valid():
            lost = []
        else:  # the pool's buffers went with a failed call: start a new one
            self.runner.reset_kv_pool()
            self.block_manager.reset_prefix_cache()
            lost = [g for g in lost if any(self.block_manager.has_gpu_block_table(s)
                                           for s in g.get_seqs())]
        mid = self._updating
        self._inflight = self._launched = self._scheduled = self._updating = None
        in_schedule, self._in_schedule = self._in_schedule, False
        fail = isinstance(exc, Exception)
        reason = f"the engine step failed ({type(exc).__name__}: {exc})"
        if fail:
            logger.error("jpaged: %s; failing its requests", reason, exc_info=exc)
        for g in {**touched, **{id(g): g for g in lost}}.values():
            if g.request_id not in self._requests:  # handed back already
                continue
            if g.is_finished() and g is not mid:
                if not any(s.status == SequenceStatus.FINISHED_IGNORED for s in g.get_seqs()):
                    self._emit(self._final_output(g))
                    continue
                for seq in g.get_seqs():  # rejected by the lost schedule: decided again
                    if seq.status == SequenceStatus.FINISHED_IGNORED:
                        seq.status = SequenceStatus.WAITING
            for seq in g.get_seqs():
                seq.drop_placeholder()
            if g is mid:
                self._fail(g, f"{reason}, while the step's results were applied to it")
            elif fail and id(g) in touched:
                self._fail(g, reason)
            else:
                self.scheduler.roll_back(g)
        if in_schedule:
            self.block_manager.reset()

    def _fail(self, g: SequenceGroup, reason: str) -> None:
        """Ends a group with an error output; its blocks are freed."""
        self.scheduler.abort_seq_group(g.request_id)
        for seq in g.get_seqs():
            self.block_manager.free(seq)
            if not seq.is_finished():
                seq.status = SequenceStatus.FINISHED_ABORTED
        g.finished_time = time.monotonic()
        self._emit(self._error_output(g, reason))

    def _emit(self, output: RequestOutput) -> None:
        """Queues a finished request's output for step() to return."""
        group = self._requests.pop(output.request_id, None)
        if group is not None:
            self._forget(group)
        self._outputs.append(output)

    def _forget(self, group: SequenceGroup) -> None:
        for s in group.get_seqs():
            self._states.pop(s.seq_id, None)
        self._finished_beams.pop(group.request_id, None)

    # ------------------------------------------------------------ helpers
    def _build_inputs(self, scheduled, is_prefill):
        seq_inputs, rows, group_rows = [], [], []
        spans, num_tokens = {}, 0  # seq_id -> (first token row, count)
        for sched in scheduled:
            g = sched.seq_group
            sp = g.sampling_params
            entries = []
            group_rows.append(entries)
            for seq in g.get_seqs(status=SequenceStatus.RUNNING):
                table = self.block_manager.get_block_table(seq)
                prev_row = -1
                if is_prefill:
                    start = seq.get_len() - sched.num_new_tokens[seq.seq_id]
                    tokens = seq.get_token_ids()[start:]
                    if seq.ends_with_placeholder():
                        raise RuntimeError(f"sequence {seq.seq_id} is prefilled with an "
                                           "unknown token")
                    self.stats["num_prefill_tokens"] += len(tokens)
                    self.stats["num_cached_prompt_tokens"] += start
                    first = seq.get_output_len() == 0
                    n = sp.actual_best_of if first and sp.sampling_type != SamplingType.BEAM else 1
                else:
                    start, tokens, n = seq.get_len() - 1, [seq.get_last_token_id()], 1
                    if tokens[0] == PLACEHOLDER_TOKEN_ID:  # sampled by the in-flight step
                        prev_row = self._inflight.rows[seq.seq_id]
                next_ids = None
                if is_prefill and sp.prompt_logprobs is not None and seq.get_output_len() == 0:
                    next_ids = seq.get_token_ids()[start + 1:] + [self.model.config.vocab_size]
                spans[seq.seq_id] = (num_tokens, len(tokens))
                num_tokens += len(tokens)
                seq_inputs.append(SeqInput(tokens, start, table, n, next_ids, prev_row))
                state = self._states[seq.seq_id]
                for j in range(n):
                    seed = state.seed if j == 0 else derive_seed(state.seed, j)
                    entries.append((seq, j, seed, len(rows)))
                    rows.append(self._row(seq, sp, seed))
        return seq_inputs, rows, group_rows, spans

    def _record_prompt_logprobs(self, g, spans, result):
        """vLLM's layout: None for the first prompt token, then for each
        later one {token_id: logprob} of that token and the top-k."""
        k = g.sampling_params.prompt_logprobs
        seq = g.get_seqs()[0]
        if k is None or g.prompt_logprobs is not None or seq.seq_id not in spans:
            return
        t0, n = spans[seq.seq_id]
        prompt = seq.prompt_token_ids
        entries = [None]
        for i in range(n - 1):
            row = t0 + i
            entry = {int(tid): float(lp) for tid, lp in
                     zip(result.prompt_topk_token_ids[row][:k],
                         result.prompt_topk_logprobs[row][:k])}
            entry[prompt[i + 1]] = float(result.prompt_logprobs[row])
            entries.append(entry)
        g.prompt_logprobs = entries

    def _row(self, seq, sp, seed):
        greedy = sp.sampling_type in (SamplingType.GREEDY, SamplingType.BEAM)
        banned = ()
        if seq.get_output_len() < sp.min_tokens:  # EOS and stop ids can't end it yet
            banned = list(sp.stop_token_ids)
            if not sp.ignore_eos:
                banned.extend(self.eos_token_ids)
        return dict(temperature=0.0 if greedy else sp.temperature, top_p=sp.top_p,
                    top_k=sp.top_k, min_p=sp.min_p, banned_token_ids=banned,
                    presence_penalty=sp.presence_penalty,
                    frequency_penalty=sp.frequency_penalty,
                    repetition_penalty=sp.repetition_penalty,
                    seed=seed, step=seq.get_output_len(),
                    output_token_ids=seq.output_token_ids,
                    prompt_token_ids=seq.prompt_token_ids)

    def _update(self, g, entries, result):
        """Applies one group's sampled tokens: entries are its sampler rows
        (seq, sample index, seed, row) of the step."""
        entries = [e for e in entries if e[0].status == SequenceStatus.RUNNING]  # not stopped since
        if g.first_token_time is None:
            g.first_token_time = time.monotonic()
        if g.sampling_params.sampling_type == SamplingType.BEAM:
            self._beam_step(g, [(seq, result.topk_token_ids[i], result.topk_logprobs[i])
                                for seq, _, _, i in entries])
            return
        # Parallel samples fork from the prompt before anyone appends.
        targets = []
        for seq, j, seed, i in entries:
            target = seq
            if j > 0:
                target = seq.fork(next(self._seq_ids))
                self._fork(g, seq, target, seed)
            targets.append((target, i))
        sp = g.sampling_params
        for target, i in targets:
            self._append(target, sp, int(result.token_ids[i]), float(result.logprobs[i]),
                         result.topk_token_ids[i], result.topk_logprobs[i])
        for seq in g.get_seqs(status=SequenceStatus.RUNNING):
            if self._check_stop(seq, sp):
                self.scheduler.free_seq(seq)
        if g.is_finished():
            g.finished_time = time.monotonic()

    def _fork(self, g, parent, child, seed):
        self.scheduler.fork_seq(parent, child)
        g.add(child)
        pstate = self._states[parent.seq_id]
        self._states[child.seq_id] = _SeqState(
            seed, pstate.detok.fork() if pstate.detok is not None else None)

    def _append(self, seq, sp, token_id, logprob, topk_ids, topk_lps):
        self.stats["num_generated_tokens"] += 1
        entry = None
        if sp.logprobs is not None:  # building the dict costs host time per token
            entry = {int(t): float(l) for t, l in zip(topk_ids[:sp.logprobs], topk_lps)}
            entry[token_id] = logprob
        if seq.ends_with_placeholder():
            seq.set_last_token_id(token_id, logprob, entry)
        else:
            seq.append_token_id(token_id, logprob, entry)

    def _check_stop(self, seq, sp) -> bool:
        """Sets a finished status on `seq` if a stop condition holds."""
        state = self._states[seq.seq_id]
        token = seq.get_last_token_id()
        num_out = seq.get_output_len()
        is_stop_token = token in sp.stop_token_ids or (
            not sp.ignore_eos and token in self.eos_token_ids)
        stop_str = None
        if state.detok is not None and not is_stop_token:
            # NOTE: EOS and stop-token ids stay out of the text, as in vLLM.
            _, stop_str = self.detokenizer.step(state.detok, token, sp.stop,
                                                sp.include_stop_str_in_output,
                                                check_stop=num_out >= sp.min_tokens)
            seq.output_text = state.detok.output_text
        if self._stops(seq, sp, token, num_out, stop_str):
            if state.detok is not None and stop_str is None:  # trailing bytes, held-back text
                self.detokenizer.flush(state.detok)
                seq.output_text = state.detok.output_text
            return True
        return False

    def _stops(self, seq, sp, token, num_out, stop_str) -> bool:
        if num_out >= sp.min_tokens:
            if stop_str is not None:
                seq.status, seq.stop_reason = SequenceStatus.FINISHED_STOPPED, stop_str
                return True
            if token in sp.stop_token_ids:
                seq.status, seq.stop_reason = SequenceStatus.FINISHED_STOPPED, token
                return True
            if not sp.ignore_eos and token in self.eos_token_ids:
                seq.status = SequenceStatus.FINISHED_STOPPED
                return True
        if (sp.max_tokens is not None and num_out >= sp.max_tokens) or \
                seq.get_len() >= self.config.max_model_len:
            seq.status = SequenceStatus.FINISHED_LENGTH_CAPPED
            return True
        return False

    # ------------------------------------------------------------ beam search
    def _beam_score(self, seq, sp) -> float:
        length = max(1, seq.get_output_len())
        return _length_normalized(seq.cumulative_logprob, length, sp.length_penalty)

    def _beam_step(self, g, parents):
        """One beam-search step over the group's running beams.

        parents: (seq, topk_ids[K], topk_logprobs[K]) per running beam. Keeps
        the beam_width best continuations by cumulative logprob; those that
        end (EOS / stop / length) join the finished pool; parents chosen
        several times fork, parents not chosen are freed.
        """
        sp = g.sampling_params
        width = sp.actual_best_of
        cands = []
        for seq, ids, lps in parents:
            for t, lp in zip(ids[:2 * width], lps[:2 * width]):
                cands.append((seq.cumulative_logprob + float(lp), seq, int(t), float(lp)))
        cands.sort(key=lambda c: -c[0])
        finished = self._finished_beams.setdefault(g.request_id, [])
        running = []
        for _, parent, t, lp in cands[:2 * width]:
            ends = ((not sp.ignore_eos and t in self.eos_token_ids) or t in sp.stop_token_ids
                    or (sp.max_tokens is not None and parent.get_output_len() + 1 >= sp.max_tokens)
                    or parent.get_len() + 1 >= self.config.max_model_len)
            if ends:  # a copy joins the finished pool (only these need one)
                trial = parent.fork(next(self._seq_ids))
                trial.append_token_id(t, lp, {t: lp})
                trial.status = (SequenceStatus.FINISHED_LENGTH_CAPPED
                                if t not in self.eos_token_ids and t not in sp.stop_token_ids
                                else SequenceStatus.FINISHED_STOPPED)
                finished.append(trial)
            elif len(running) < width:
                running.append((parent, t, lp))
        finished.sort(key=lambda s: -self._beam_score(s, sp))
        del finished[width:]
        done = not running or self._beam_search_done(finished, running, sp, width)
        used: set[int] = set()
        all_parents = [p for p, _, _ in parents]
        if not done:
            targets = []
            for parent, t, lp in running:  # forks first, while parents are unchanged
                target = parent
                if parent.seq_id in used:
                    target = parent.fork(next(self._seq_ids))
                    self._fork(g, parent, target, self._states[parent.seq_id].seed)
                used.add(parent.seq_id)
                targets.append((target, t, lp))
            for target, t, lp in targets:
                target.append_token_id(t, lp, {t: lp})
                self.stats["num_generated_tokens"] += 1
        for p in all_parents:
            if done or p.seq_id not in used:
                p.status = SequenceStatus.FINISHED_ABORTED
                self.scheduler.free_seq(p)
        if done:
            g.finished_time = time.monotonic()

    def _beam_search_done(self, finished, running, sp, width) -> bool:
        if len(finished) < width:
            return False
        if sp.early_stopping is True:
            return True
        best_parent, t, lp = running[0]
        cum = best_parent.cumulative_logprob + lp
        if sp.early_stopping == "never" and sp.length_penalty > 0:
            max_len = (sp.max_tokens or self.config.max_model_len)
            best_possible = _length_normalized(cum, max_len, sp.length_penalty)
        else:
            best_possible = _length_normalized(cum, max(1, best_parent.get_output_len() + 1),
                                               sp.length_penalty)
        worst_finished = self._beam_score(finished[-1], sp)
        return worst_finished >= best_possible

    # ------------------------------------------------------------ outputs
    def _new_detok(self, prompt_token_ids, sp):
        if self.detokenizer is None:
            return None
        return self.detokenizer.new_state(prompt_token_ids, sp.skip_special_tokens)

    def _completion(self, index, seq, sp) -> CompletionOutput:
        """One sequence's output: all of it, or with DELTA what was not sent
        yet (text only up to what can no longer start a stop string)."""
        start, chars = 0, len(seq.output_text or "")
        text_from = 0
        if sp.output_kind != RequestOutputKind.FINAL_ONLY:
            state = self._states[seq.seq_id]
            if not seq.is_finished() and state.detok is not None:
                chars = state.detok.num_emitted
            if sp.output_kind == RequestOutputKind.DELTA:
                start, text_from = state.num_sent_tokens, state.num_sent_chars
            state.num_sent_tokens, state.num_sent_chars = seq.get_output_len(), chars
        tokens = seq.output_token_ids[start:]
        logprobs = None
        if sp.logprobs is not None:
            logprobs = [_top_entries(e, sp.logprobs, tok) for e, tok in
                        zip(seq.output_logprobs[start:], tokens)]
        reason = SequenceStatus.get_finished_reason(seq.status)
        return CompletionOutput(index=index, text=(seq.output_text or "")[text_from:chars],
                                token_ids=list(tokens),
                                cumulative_logprob=seq.cumulative_logprob,
                                logprobs=logprobs, finish_reason=reason,
                                stop_reason=seq.stop_reason)

    def _stream_output(self, g) -> RequestOutput:
        """An unfinished request's output so far (DELTA / CUMULATIVE)."""
        first = g.get_seqs()[0]
        return RequestOutput(
            request_id=g.request_id, prompt=first.prompt,
            prompt_token_ids=list(first.prompt_token_ids), prompt_logprobs=g.prompt_logprobs,
            outputs=[self._completion(i, s, g.sampling_params)
                     for i, s in enumerate(g.get_seqs())],
            finished=False, metrics=_metrics(g), error=None)

    def _final_output(self, g) -> RequestOutput:
        sp = g.sampling_params
        if sp.sampling_type == SamplingType.BEAM:
            seqs = self._finished_beams.pop(g.request_id, [])
            seqs = sorted(seqs, key=lambda s: -self._beam_score(s, sp))[:sp.n]
            for s in seqs:
                if self.tokenizer is not None:
                    s.output_text = self.tokenizer.decode(
                        s.output_token_ids, skip_special_tokens=sp.skip_special_tokens)
        else:
            seqs = g.get_seqs()
            if sp.actual_best_of > sp.n:
                seqs = sorted(seqs, key=lambda s: -s.cumulative_logprob)
            seqs = seqs[:sp.n]
        first = g.get_seqs()[0]
        return RequestOutput(
            request_id=g.request_id, prompt=first.prompt,
            prompt_token_ids=list(first.prompt_token_ids), prompt_logprobs=g.prompt_logprobs,
            outputs=[self._completion(i, s, sp) for i, s in enumerate(seqs)],
            finished=True, metrics=_metrics(g), error=None)

    def _error_output(self, g, reason) -> RequestOutput:
        """The output of a request rejected or failed with `reason`."""
        first = g.get_seqs()[0]
        return RequestOutput.from_error(g.request_id, first.prompt, first.prompt_token_ids,
                                        reason, n=g.sampling_params.n, metrics=_metrics(g))


def _length_normalized(logprob: float, length: int, length_penalty: float) -> float:
    """logprob / length**length_penalty, without overflow for any finite
    penalty (the exponent is clamped where the power leaves float range)."""
    exponent = min(700.0, max(-700.0, length_penalty * math.log(length)))
    return logprob * math.exp(-exponent)


def _top_entries(entry, k, token):
    if not isinstance(entry, dict):
        return {token: entry}
    top = dict(sorted(entry.items(), key=lambda kv: -kv[1])[:k])
    top[token] = entry[token]
    return top


def _metrics(g) -> RequestMetrics:
    return RequestMetrics(arrival_time=g.arrival_time,
                          first_scheduled_time=getattr(g, "first_scheduled_time", None),
                          first_token_time=getattr(g, "first_token_time", None),
                          finished_time=getattr(g, "finished_time", None) or time.monotonic())


def _eos_ids(model) -> frozenset[int]:
    eos = tuple(getattr(model.config, "eos_token_ids", ()) or ())
    if not eos and model.tokenizer is not None and model.tokenizer.eos_token_id is not None:
        eos = (model.tokenizer.eos_token_id,)
    return frozenset(eos)


def _resolve_dtype(dtype: str) -> str:
    """"auto": bfloat16 on accelerators, float32 on CPU."""
    if dtype != "auto":
        return dtype
    import jax
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def enable_compilation_cache() -> None:
    """Keeps compiled steps on disk (JPAGED_XLA_CACHE, default
    ~/.cache/jpaged/xla; "off" disables), so a second start of the same
    model and bucket set skips most of its compile time."""
    import os
    import pathlib
    import jax
    path = os.environ.get("JPAGED_XLA_CACHE",
                          str(pathlib.Path.home() / ".cache" / "jpaged" / "xla"))
    if path.lower() in ("off", "0", "") or jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _device_reports_memory() -> bool:
    import jax
    return bool((jax.local_devices()[0].memory_stats() or {}).get("bytes_limit"))
