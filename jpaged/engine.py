"""LLMEngine: continuous batching over a paged KV cache.

One engine step:
  1. schedule: ``Scheduler.schedule()`` picks the groups that run (with
     chunked prefill, decodes and prompt chunks in one ragged step up to
     the token budget, else all prefill or all decode; a decode-only step
     runs a window of up to max_decode_window tokens per sequence, its
     blocks reserved ahead),
     preempting the latest arrivals when the pool runs dry, and lists block
     swaps and copy-on-write copies.
  2. execute: the runner moves blocks (swaps, copies), applies the step's
     changes to the persistent batch on the device (jpaged.slots: one packed
     transfer), and dispatches one jitted call: a ragged step (prompts,
     chunks, and decode rows that read their token from the device), or a
     decode window whose steps, sampling and stop rules all run on the device.
  3. update (commit): once the step's results are on the host, each group
     records its computed tokens (with prefix caching, publishing the blocks
     now written), then jpaged.output_processor appends its tokens, checks
     stop strings, forks or ends beams, and builds its outputs; finished
     sequences give back their blocks and slots.

Async scheduling (``EngineConfig.async_scheduling``, on by default) overlaps
the host with the device: unless a step needs a host decision before the
next one (beam search, prompt logprobs), it stays in flight. Its sequences
get placeholder tokens (as many as the step may produce), the next step is
scheduled and dispatched at once and reads those tokens on the device, and
only then does the host wait for the first step's results and update (3).
A sequence that stopped in the first step may have computed tokens in the
second, which are dropped. A ragged step, short beside a decode window,
leaves the decode step before it in flight as well (``overlap_ragged_updates``):
both are updated once the next step is dispatched, so the device runs the
ragged step while the host catches up. Before scheduling, the in-flight
steps are finished first whenever the next schedule could preempt, so
preemption and swapping only ever see known tokens.

A step is all or nothing. If anything raises before a group's update is
done (an error on the device, a bug, an interrupt), ``_recover`` undoes the
step: every group it concerns is rolled back by recompute preemption, which
keeps the tokens the host holds and frees every block, so nothing the step
recorded stays visible. An interrupt (KeyboardInterrupt) then propagates and
those groups resume on a later step; any other exception fails exactly
those groups, each with an error output, and ``step`` returns normally. A
group caught half-way through its own update is failed either way. Since
the device's slots may no longer match the host, every other running group
is rolled back too (it resumes by recomputation), and a KV pool lost with a
failed call is allocated again. A real Ctrl-C is held (``InterruptGuard``)
until the step's host state is whole, except while the host waits for the
device.
"""
from __future__ import annotations

import dataclasses
import gc
import itertools
import logging
import time

import numpy as np

from jpaged import inputs
from jpaged.block_manager import BlockSpaceManager
from jpaged.config import EngineConfig
from jpaged.detokenizer import Detokenizer
from jpaged.interrupts import InterruptGuard
from jpaged.model_runner import (MAX_LOGPROBS, ModelRunner, PendingStep, PrefillSeq, Runner,
                                 mode_needs)
from jpaged.output_processor import OutputProcessor, SeqState
from jpaged.outputs import RequestOutput
from jpaged.sampler import MAX_BANNED, derive_seed
from jpaged.sampling_params import RequestOutputKind, SamplingParams, SamplingType
from jpaged.scheduler import ScheduledSequenceGroup, Scheduler, SchedulerOutput
from jpaged.sequence import PLACEHOLDER_TOKEN_ID, SequenceGroup, SequenceStatus
from jpaged.slots import MAX_STOP, SlotAllocator, SlotDiff, sampling_row
from jpaged.stats import EngineStats


logger = logging.getLogger(__name__)


@dataclasses.dataclass
class _InFlight:
    """A dispatched step and what its update needs.

    scheduled: the step's groups, in order; the first ``num_committed`` of
      them have been updated with its results.
    group_rows: per scheduled group, (seq, column of the step's output,
      tokens it may produce) per sequence it runs.
    spans: seq_id -> (first token row, count, first position) of a prompt
      chunk (prompt logprobs).
    """
    scheduled: list[ScheduledSequenceGroup]
    group_rows: list[list]
    spans: dict
    step: PendingStep
    ahead: bool
    ragged: bool  # a ragged step (prompt work), not a decode window
    num_committed: int = 0


class LLMEngine:
    """Adds requests, steps the schedule -> execute -> update loop."""

    def __init__(self, config: EngineConfig, model=None, warm_up: bool = True,
                 progress: bool = True, block_manager_factory=None, devices=None,
                 runner: Runner | None = None):
        """block_manager_factory: optional callable with BlockSpaceManager's
        signature (block_size, num_gpu_blocks, num_cpu_blocks, watermark=,
        enable_prefix_caching=) returning a compatible manager, e.g. the
        contiguous-reservation baseline of jpaged.bench.reservation.
        devices: the devices this engine runs on (ModelRunner's; a
        data-parallel replica's group); None: the first ones.
        runner: a runner already built for this model and config (a
          ModelRunner, or anything with jpaged.model_runner.Runner's
          surface), used instead of building one (devices is then unused);
          ValueError when its shapes (block_size, max_num_seqs,
          max_model_len, max_num_batched_tokens, max_decode_window,
          num_gpu_blocks when the config sets it) or its EOS ids differ
          from this engine's. The engine's stats are the runner's
          (``runner.stats``), so compiles before the hand-over count too.

        One engine is one replica: config.data_parallel_size must be 1
        (jpaged.data_parallel.DataParallelEngine runs several; LLM picks it).
        """
        if config.data_parallel_size != 1:
            raise ValueError(f"LLMEngine runs one replica, got data_parallel_size="
                             f"{config.data_parallel_size}: use jpaged.data_parallel."
                             "DataParallelEngine (LLM picks it)")
        enable_compilation_cache()
        if model is None:
            model = load_model(config)
        self.model = model
        self.tokenizer = model.tokenizer
        sched_config = config.get_scheduler_config(model.config.max_position_embeddings)
        max_model_len = sched_config.max_model_len
        max_batched = sched_config.max_num_batched_tokens
        self.config = config = dataclasses.replace(
            config, max_model_len=max_model_len, max_num_batched_tokens=max_batched)
        self.eos_token_ids = _eos_ids(model)  # every id that ends a sequence (Llama 3: several)
        if runner is None:
            runner = ModelRunner(
                model, config.cache_config(), sched_config, config.parallel_config(),
                attention_backend=config.attention_backend,
                max_decode_window=config.max_decode_window, eos_token_ids=self.eos_token_ids,
                devices=devices)
        else:
            _check_runner(runner, config, self.eos_token_ids)
        self.runner = runner
        self.block_manager = self._new_block_manager(block_manager_factory,
                                                     self.runner.num_gpu_blocks)
        # every counter (jpaged.stats); the runner counts its compiles there
        self.stats: EngineStats = runner.stats
        self.scheduler = Scheduler(sched_config, self.block_manager, self.stats)
        self.detokenizer = Detokenizer(self.tokenizer) if self.tokenizer is not None else None
        self._seq_ids = itertools.count()
        self._rng = np.random.default_rng(config.seed)
        self._requests: dict[str, SequenceGroup] = {}  # every request not yet finished
        self._outputs: list[RequestOutput] = []        # finished, not yet returned by step()
        self._states: dict[int, SeqState] = {}
        self._slots = SlotAllocator(config.max_num_seqs)
        self._diff = SlotDiff(self.runner.diff_layouts)
        # The step in progress, for _recover: its schedule, the step just
        # dispatched from it, the earlier steps whose results are awaited
        # (oldest first; at most two), and the group being updated.
        self._inflight: list[_InFlight] = []
        self._launched: _InFlight | None = None
        self._scheduled: SchedulerOutput | None = None
        self._updating: SequenceGroup | None = None
        self._in_schedule = False
        # time.monotonic() of the last request added (an offline batch, once
        # queued, clears it: clear_arrivals)
        self._last_arrival = -float("inf")
        self._guard = InterruptGuard()
        self._wait = 0.0  # seconds of the current step spent waiting for the device
        self.output_processor = OutputProcessor(
            self.tokenizer, self.detokenizer, self.eos_token_ids, max_model_len, self._states,
            self.stats, free_seq=self._free_seq, fork_seq=self._fork,
            new_seq_id=lambda: next(self._seq_ids), block_size=config.block_size,
            block_table=lambda seq: self.block_manager.block_table(seq),
            set_block_tables=self._set_tables)
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
        from jpaged.sequence import Sequence
        prompt_token_ids = self.prepare_request(request_id, prompt, sampling_params,
                                                prompt_token_ids)
        seq = Sequence(next(self._seq_ids), prompt, prompt_token_ids, self.config.block_size)
        seed = sampling_params.seed
        if seed is None:
            seed = int(self._rng.integers(0, 1 << 31))
        group = SequenceGroup(request_id, [seq], sampling_params,
                              arrival_time if arrival_time is not None else time.monotonic())
        self._states[seq.seq_id] = SeqState(seed, self._new_detok(prompt_token_ids,
                                                                  sampling_params))
        if sampling_params.use_beam_search:  # an id unique among running groups
            self._states[seq.seq_id].beam_group = seq.seq_id & 0x7FFFFFFF
        self._last_arrival = time.monotonic()
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
        if sp.use_beam_search and (sp.presence_penalty != 0 or sp.frequency_penalty != 0
                                   or sp.repetition_penalty != 1):
            raise ValueError(f"{name}: penalties are not supported with beam search")
        if (sp.logprobs or 0) > MAX_LOGPROBS:
            raise ValueError(f"{name}: logprobs={sp.logprobs}, at most {MAX_LOGPROBS}")
        if (sp.prompt_logprobs or 0) > MAX_LOGPROBS:
            raise ValueError(f"{name}: prompt_logprobs={sp.prompt_logprobs}, "
                             f"at most {MAX_LOGPROBS}")
        num_eos = len(self.eos_token_ids)
        if sp.min_tokens and len(sp.stop_token_ids) + num_eos > MAX_BANNED:
            raise ValueError(f"{name}: with min_tokens, at most {MAX_BANNED - num_eos} "
                             "stop_token_ids")
        if sp.min_tokens and len(sp.stop_token_ids) > MAX_STOP:
            raise ValueError(f"{name}: with min_tokens, at most {MAX_STOP} stop_token_ids")
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
            self.scheduler.abort_seq_group(rid)
            for seq in group.get_seqs():  # also a group no queue holds
                self.block_manager.free(seq)
                self._release_slot(seq)
                if not seq.is_finished():
                    seq.status = SequenceStatus.FINISHED_ABORTED
            self._forget(group)
        # a step none of whose groups is left: nothing reads its results
        self._inflight = [step for step in self._inflight
                          if not all(s.seq_group.is_finished() for s in step.scheduled)]

    def clear_arrivals(self) -> None:
        """Declares the requests queued so far an offline batch: no request
        is expected to arrive while they run, so they hold no decode window
        back (max_decode_window). LLM.generate calls it once its batch is
        queued; a loop that adds a batch and steps it should too."""
        self._last_arrival = -float("inf")

    def has_request(self, request_id: str) -> bool:
        """Whether the id names a request not yet handed back by step()."""
        return request_id in self._requests or any(
            o.request_id == request_id for o in self._outputs)

    def get_request(self, request_id: str) -> SequenceGroup | None:
        """The unfinished request's SequenceGroup (read it, never change it),
        or None once it has finished (or was never added)."""
        return self._requests.get(request_id)

    def use_block_manager(self, block_manager_factory=None, num_blocks: int | None = None,
                          **config_changes) -> None:
        """Gives the idle engine a fresh block manager (from the factory, as
        in the constructor; default BlockSpaceManager) and scheduler, and
        zeroes its stats; the model runner, its compiled steps and the KV
        pool stay. How benchmarks compare systems on one warmed-up engine.

        num_blocks: hand out only the first num_blocks blocks of the pool
          (null block included), as a smaller pool would; default all.
        config_changes: EngineConfig fields that need no recompile
          (async_scheduling, max_decode_window up to the compiled one,
          enable_prefix_caching, preemption_mode, enable_chunked_prefill: off
          needs a token budget that holds max_model_len,
          long_prefill_token_threshold, decode_window_between_chunks,
          overlap_ragged_updates).
        """
        if self.has_unfinished_requests():
            raise RuntimeError("use_block_manager() needs an idle engine")
        pool = self.runner.num_gpu_blocks
        num_blocks = pool if num_blocks is None else num_blocks
        if not 2 <= num_blocks <= pool:
            raise ValueError(f"num_blocks must be in [2, {pool}] (the pool), got {num_blocks}")
        unknown = set(config_changes) - {"async_scheduling", "max_decode_window",
                                         "enable_prefix_caching", "enable_chunked_prefill",
                                         "preemption_mode", "long_prefill_token_threshold",
                                         "decode_window_between_chunks",
                                         "overlap_ragged_updates"}
        if unknown:
            raise ValueError(f"use_block_manager() cannot change {sorted(unknown)} "
                             "(they need another model runner)")
        window = config_changes.get("max_decode_window", self.config.max_decode_window)
        if not 1 <= window <= max(self.runner.window_sizes):
            raise ValueError(f"max_decode_window must be in [1, {max(self.runner.window_sizes)}] "
                             f"(the compiled windows), got {window!r}")
        self.config = dataclasses.replace(self.config, **config_changes)
        sched_config = dataclasses.replace(  # (validated: the budget rule of the mode)
            self.scheduler.config, enable_chunked_prefill=self.config.enable_chunked_prefill,
            preemption_mode=self.config.preemption_mode,
            long_prefill_token_threshold=self.config.long_prefill_token_threshold,
            decode_window_between_chunks=self.config.scheduler_window_between_chunks())
        self.block_manager = self._new_block_manager(block_manager_factory, num_blocks)
        self.scheduler = Scheduler(sched_config, self.block_manager, self.stats)
        self._last_arrival = -float("inf")  # no arrival history either
        self.stats.reset()

    def _new_block_manager(self, factory, num_gpu_blocks: int):
        cache = self.config.cache_config()
        return (factory or BlockSpaceManager)(
            cache.block_size, num_gpu_blocks, self.runner.num_cpu_blocks,
            watermark=cache.watermark, enable_prefix_caching=cache.enable_prefix_caching)

    def has_unfinished_requests(self) -> bool:
        """Whether step() has more to do or to return."""
        return bool(self._outputs) or self.scheduler.has_unfinished_seqs()

    def has_unfinished_seqs(self) -> bool:
        """Whether step() has more to do (outputs kept for return aside)."""
        return self.scheduler.has_unfinished_seqs()

    def keep_outputs(self, outputs: list[RequestOutput]) -> None:
        """Hands finished outputs back: the next step() returns them again
        (LLM.generate does this with the requests of other callers)."""
        self._outputs.extend(outputs)

    # ------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        """Runs one schedule -> execute -> update round; returns the
        requests that finished in it (rejected and failed ones included,
        with `error` set), and for streamed requests their progress. With
        async scheduling the update is that of the previous step, run while
        this one is on the device. A step that fails is undone (module
        docstring): an exception fails the requests it concerns, a
        KeyboardInterrupt propagates after the rollback. A Ctrl-C held
        during host work is raised once the step is whole: at its end, or,
        when it has outputs to return, at the start of the next call (so no
        finished output is lost to it)."""
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
            self.stats.host_seconds += time.perf_counter() - t0 - self._wait
            self.stats.device_seconds += self._wait
        outputs, self._outputs = self._outputs, []
        if not outputs:  # a held Ctrl-C acts now; with outputs, at the next step's start
            self._guard.raise_pending()
        return outputs

    def _step(self) -> None:
        if self._inflight and self._must_finish_inflight():
            self._finish_inflight(keep=0)
        self._in_schedule = True
        idle = time.monotonic() - self._last_arrival >= self.config.decode_window_idle_s
        out = self._scheduled = self.scheduler.schedule(self._max_window(), idle)
        self._in_schedule = False
        for g, reason in out.ignored_seq_groups:
            self._emit(OutputProcessor.error_output(g, reason))
        for g in out.swapped_out + out.recomputed:  # preempted: off the device batch
            for seq in g.get_seqs():
                self._release_slot(seq)
        if out.blocks_to_swap_out:
            self.runner.swap_out(out.blocks_to_swap_out)
        if out.blocks_to_swap_in:
            self.runner.swap_in(out.blocks_to_swap_in)
        if out.blocks_to_copy:
            self.runner.copy_blocks(out.blocks_to_copy)
        launched = None
        if out.scheduled_seq_groups:
            launched = self._launched = self._launch(out)
        # the earlier steps, while this one runs
        self._finish_inflight(keep=int(launched is not None and self._overlaps(launched)))
        if launched is not None:
            if launched.ahead:
                for entries in launched.group_rows:
                    for seq, _, n in entries:
                        if seq.status == SequenceStatus.RUNNING:
                            seq.append_placeholders(n)
            self._inflight.append(launched)
            self._launched = None
            if not launched.ahead:
                self._finish_inflight(keep=0)
        self._scheduled = None
        self.scheduler.free_finished_seq_groups()
        if self._inflight and not self.scheduler.has_unfinished_seqs():
            self._finish_inflight(keep=0)  # only stopped sequences: leave the engine idle
        used = self.runner.num_gpu_blocks - 1 - self.block_manager.get_num_free_gpu_blocks()
        self.stats.peak_blocks_used = max(self.stats.peak_blocks_used, used)

    def _max_window(self) -> int:
        """One step while a beam group takes its first (the host forks its
        beams after it), else max_decode_window."""
        if any(_forks_beams(g) for g in self.scheduler.running):
            return 1
        return self.config.max_decode_window

    def _launch(self, out: SchedulerOutput) -> _InFlight:
        """Sends the step's slot changes and dispatches it."""
        t = time.perf_counter()
        groups = [s.seq_group for s in out.scheduled_seq_groups]
        needs = 0
        for g in groups:
            needs |= mode_needs(g.sampling_params)
        spans = {}
        if out.is_prefill:
            seqs, group_rows, spans = self._prefill_inputs(out.scheduled_seq_groups)
            self.runner.apply_diff(self._diff)
            step = self.runner.dispatch_prefill(seqs, needs)
        else:
            group_rows = self._decode_inputs(out.scheduled_seq_groups, out.num_steps)
            self.runner.apply_diff(self._diff)
            step = self.runner.dispatch_decode(out.num_steps, needs)
            self.stats.num_decode_steps += out.num_steps
        self.stats.dispatch_seconds += time.perf_counter() - t
        self.stats.num_steps += 1
        self.stats.num_steps_ahead += bool(self._inflight)
        self.stats.num_steps_two_ahead += len(self._inflight) >= 2
        return _InFlight(out.scheduled_seq_groups, group_rows, spans, step,
                         ahead=self._may_run_ahead(out.scheduled_seq_groups),
                         ragged=out.is_prefill)

    def _must_finish_inflight(self) -> bool:
        """Whether the in-flight steps' results are needed before the next
        schedule: it could preempt, or every running sequence ends with the
        in-flight tokens (a step run ahead would be all waste)."""
        if not self.scheduler.can_decode_without_preemption():
            return True
        for g in self.scheduler.running:
            max_len = self.scheduler.max_len(g)
            for seq in g.get_seqs(SequenceStatus.RUNNING):
                if seq.get_len() < max_len:
                    return False
        return True

    def _may_run_ahead(self, scheduled) -> bool:
        """Whether the next step may be scheduled before this one's results
        are on the host: nothing in it needs a host decision first (a beam
        group's first step, whose new beams the host forks; a prompt's
        logprobs)."""
        if not self.config.async_scheduling:
            return False
        for s in scheduled:
            sp = s.seq_group.sampling_params
            if (s.decode and _forks_beams(s.seq_group)) or (not s.decode and
                                                            sp.prompt_logprobs is not None):
                return False
        return True

    def _overlaps(self, launched: _InFlight) -> bool:
        """Whether the step just dispatched leaves the one before it in
        flight (overlap_ragged_updates): a ragged step run ahead, after a
        decode step (a ragged one's update publishes prompt blocks to the
        prefix cache, which the next schedule should see) with no beam
        group (whose update retables its beams)."""
        if not (self.config.overlap_ragged_updates and launched.ahead
                and launched.ragged and self._inflight):
            return False
        before = self._inflight[-1]
        return not before.ragged and not any(
            s.seq_group.sampling_params.sampling_type == SamplingType.BEAM
            for s in before.scheduled)

    def _finish_inflight(self, keep: int) -> None:
        """Commits the in-flight steps, oldest first, until `keep` are left."""
        while len(self._inflight) > keep:
            self._finish_oldest()

    def _finish_oldest(self) -> None:
        """Waits for the oldest in-flight step's results and commits them,
        one group at a time (each group's update is its own unit for
        _recover)."""
        inflight = self._inflight[0]
        t = time.perf_counter()
        with self._guard.allowed():
            result = self.runner.fetch(inflight.step)
        self._wait += time.perf_counter() - t
        now = time.monotonic()  # when the step's tokens reached the host
        proc = self.output_processor
        for i in range(inflight.num_committed, len(inflight.scheduled)):
            scheduled = inflight.scheduled[i]
            g = scheduled.seq_group
            # A group that finished (stopped one step earlier, or was aborted)
            # since this step was dispatched takes no part.
            if not g.is_finished():
                self._updating = g
                self.scheduler.mark_computed(scheduled)
                entries = inflight.group_rows[i]  # none: a prompt chunk that samples nothing
                if entries:
                    proc.update(g, entries, result, now)
                if result.prompt_logprobs is not None:
                    proc.record_prompt_logprobs(g, inflight.spans, result)
                if g.is_finished():
                    self._emit(proc.final_output(g))
                elif entries and g.sampling_params.output_kind != RequestOutputKind.FINAL_ONLY:
                    self._outputs.append(proc.stream_output(g))
                self._updating = None
            inflight.num_committed = i + 1
        self._inflight.pop(0)

    # ------------------------------------------------------------ step inputs
    def _prefill_inputs(self, scheduled):
        """The ragged step's sequences and rows: prompt work (whole prompts
        or chunks) and, with chunked prefill, one decode token for each
        sequence of a ``decode`` group (read from its slot on the device).

        A sequence gets its slot at its first chunk, inactive; the chunk
        that ends its prefill activates it, and samples its first token
        when the prefill ends at its last token (a single-sequence group).
        A fresh group with best_of > 1 forks its samples then: they share
        its prompt blocks, each gets a slot and its own sampler row, and its
        next steps can run ahead."""
        bm = self.block_manager
        seqs, group_rows, spans = [], [], {}
        num_tokens = num_rows = 0
        vocab = self.model.config.vocab_size
        for sched in scheduled:
            g = sched.seq_group
            sp = g.sampling_params
            running = g.get_seqs(SequenceStatus.RUNNING)
            entries = []
            if sched.decode:
                for seq in running:
                    slot = self._decode_slot(seq, g, bm.block_table(seq))
                    seqs.append(PrefillSeq([], seq.get_len() - 1, slot, [], seq.get_prompt_len(),
                                           [(slot, -1)], decode=True))
                    entries.append((seq, num_rows, 1))
                    num_tokens += 1
                    num_rows += 1
                group_rows.append(entries)
                continue
            for seq in running:
                n = sched.num_new_tokens.get(seq.seq_id, 0)
                if n == 0:
                    continue
                table = bm.get_block_table(seq)
                end = sched.num_computed_tokens[seq.seq_id]
                start = end - n
                all_ids = seq.get_token_ids()
                tokens = all_ids[start:end]
                if PLACEHOLDER_TOKEN_ID in tokens:
                    raise RuntimeError(f"sequence {seq.seq_id} is prefilled with an unknown token")
                self.stats.num_prefill_tokens += n
                state = self._states[seq.seq_id]
                slot = state.slot
                if slot < 0 or state.refill:  # the prefill's first chunk
                    slot = self._fill_slot(seq, g, table, active=False)
                    self.stats.num_cached_prompt_tokens += start
                samples = end == seq.get_len()
                rows = [(slot, -1)] if samples else []
                if rows:
                    entries.append((seq, num_rows, 1))
                if (samples and sp.actual_best_of > 1 and sp.sampling_type != SamplingType.BEAM
                        and g.num_seqs() == 1 and seq.get_output_len() == 0):
                    for child in self._fork_samples(sched, seq):
                        rows.append((self._fill_slot(child, g, table), slot))
                        entries.append((child, num_rows + len(rows) - 1, 1))
                next_ids = None
                if sp.prompt_logprobs is not None and seq.get_output_len() == 0:
                    next_ids = all_ids[start + 1:end + 1] + [vocab] * (end == len(all_ids))
                spans[seq.seq_id] = (num_tokens, n, start)
                num_tokens += n
                num_rows += len(rows)
                seqs.append(PrefillSeq(tokens, start, slot, table, seq.get_prompt_len(), rows,
                                       next_ids, activate=end == seq.prefill_end))
            group_rows.append(entries)
        return seqs, group_rows, spans

    def _fork_samples(self, sched, parent) -> list:
        """best_of - 1 children of a fresh group's prompt, each with its own seed."""
        g = sched.seq_group
        children = []
        for j in range(1, g.sampling_params.actual_best_of):
            child = parent.fork(next(self._seq_ids))
            self._fork(g, parent, child, derive_seed(self._states[parent.seq_id].seed, j))
            sched.num_computed_tokens[child.seq_id] = sched.num_computed_tokens[parent.seq_id]
            children.append(child)
        return children

    def _decode_inputs(self, scheduled, num_steps):
        """The decode window's rows (one per slot), and the slot changes:
        whole rows for sequences new to the device (swapped in, forked
        beams), block-table entries for the tables that changed."""
        bm = self.block_manager
        group_rows = []
        for sched in scheduled:
            max_len = self.scheduler.max_len(sched.seq_group)
            entries = []
            for seq in sched.seq_group.get_seqs(SequenceStatus.RUNNING):
                slot = self._decode_slot(seq, sched.seq_group, bm.block_table(seq))
                entries.append((seq, slot, min(num_steps, max_len - seq.get_len())))
            group_rows.append(entries)
        return group_rows

    def _decode_slot(self, seq, g, table) -> int:
        """A decoding sequence's slot: its whole row for a sequence new to
        the device (swapped in, forked beams, or a multi-sequence group's
        prefill just ended: its penalty counts kept), else the block-table
        entries that changed."""
        state = self._states[seq.seq_id]
        if state.slot < 0 or state.refill:
            return self._fill_slot(seq, g, table)
        # NOTE: a table only grows, or a copy-on-write replaces the block of
        # the sequence's last token: compare from there.
        sent = state.sent_table
        first = min(len(sent), (seq.get_len() - 1) // self.config.block_size)
        if len(table) != len(sent) or (first < len(sent) and table[first] != sent[first]):
            for i in range(first, len(table)):
                if i >= len(sent) or sent[i] != table[i]:
                    self._diff.set_block(state.slot, i, table[i])
            state.sent_table = list(table)
        return state.slot

    def _fill_slot(self, seq, g, table, active: bool = True) -> int:
        """Gives seq a slot (its own, or a free one) and sends its whole row
        (inactive for a prefill: the step that ends it activates it)."""
        state = self._states[seq.seq_id]
        if state.slot < 0:
            state.slot = self._slots.allocate()
        sp = g.sampling_params
        greedy = sp.sampling_type in (SamplingType.GREEDY, SamplingType.BEAM)
        beam = None
        if sp.sampling_type == SamplingType.BEAM:
            beam = (state.beam_group, state.beam_rank, sp.actual_best_of)
        self._diff.fill(state.slot, sampling_row(sp, greedy=greedy, seed=state.seed,
                                                 max_len=self.scheduler.max_len(g)),
                        token=seq.get_last_token_id(), position=seq.get_len() - 1,
                        num_generated=seq.get_output_len(), table=table,
                        counts_from=state.counts_from, active=active, beam=beam,
                        cum_logprob=state.cum32)
        state.sent_table, state.counts_from, state.refill = list(table), -1, False
        return state.slot

    def _release_slot(self, seq) -> None:
        state = self._states.get(seq.seq_id)
        if state is not None and state.slot >= 0:
            self._diff.switch_off(state.slot)
            self._slots.free(state.slot)
            state.slot, state.sent_table = -1, None

    def _free_seq(self, seq) -> None:
        """A finished sequence gives back its blocks and its slot."""
        self.scheduler.free_seq(seq)
        self._release_slot(seq)

    def _set_tables(self, tables) -> None:
        """New block tables for beams (their device rows changed them already)."""
        self.block_manager.retable({seq.seq_id: table for seq, table in tables.items()})
        for seq, table in tables.items():
            state = self._states[seq.seq_id]
            if state.sent_table is not None:
                state.sent_table = list(table)

    def _fork(self, g, parent, child, seed) -> None:
        self.scheduler.fork_seq(parent, child)
        g.add(child)
        pstate = self._states[parent.seq_id]
        self._states[child.seq_id] = SeqState(
            seed, pstate.detok.fork() if pstate.detok is not None else None,
            counts_from=pstate.slot)

    # ------------------------------------------------------------ failures
    def _recover(self, exc: BaseException) -> None:
        """Undoes the failed step (module docstring): the groups it concerns
        are rolled back, or failed with an error output when `exc` is an
        Exception; the group caught mid-update is failed; every other group
        on the device is rolled back."""
        self.stats.num_failed_steps += 1
        touched: dict[int, SequenceGroup] = {}
        for step in (*self._inflight, self._launched):
            if step is not None:
                for s in step.scheduled[step.num_committed:]:
                    touched[id(s.seq_group)] = s.seq_group
        if self._scheduled is not None:
            for g in [s.seq_group for s in self._scheduled.scheduled_seq_groups] + \
                    self._scheduled.swapped_out:
                touched[id(g)] = g
        waiting = {id(g) for g in self.scheduler.waiting}
        if self._in_schedule:
            # The scheduler stopped half-way: only a group still waiting
            # with no blocks is sure to be untouched.
            touched.update((id(g), g) for g in self._requests.values()
                           if id(g) not in waiting or any(
                               self.block_manager.has_block_table(s) for s in g.get_seqs()))
        if not self.runner.pool.is_valid():  # the pool's buffers went with a failed call
            self.runner.pool.reset()
            self.block_manager.reset_prefix_cache()
        # The device's slots are no longer sure: every group there recomputes.
        on_device = [g for g in self._requests.values()
                     if any(self.block_manager.has_gpu_block_table(s) for s in g.get_seqs())]
        mid = self._updating
        self._inflight = []
        self._launched = self._scheduled = self._updating = None
        in_schedule, self._in_schedule = self._in_schedule, False
        fail = isinstance(exc, Exception)
        reason = f"the engine step failed ({type(exc).__name__}: {exc})"
        if fail:
            logger.error("jpaged: %s; failing its requests", reason, exc_info=exc)
        for g in {**touched, **{id(g): g for g in on_device}}.values():
            if g.request_id not in self._requests:  # handed back already
                continue
            if g.is_finished() and g is not mid:
                if not any(s.status == SequenceStatus.FINISHED_IGNORED for s in g.get_seqs()):
                    self._emit(self.output_processor.final_output(g))
                    continue
                for seq in g.get_seqs():  # rejected by the lost schedule: decided again
                    if seq.status == SequenceStatus.FINISHED_IGNORED:
                        seq.status = SequenceStatus.WAITING
            for seq in g.get_seqs():
                seq.drop_placeholders()
            if g is mid:
                self._fail(g, f"{reason}, while the step's results were applied to it")
            elif fail and id(g) in touched:
                self._fail(g, reason)
            else:
                self.scheduler.roll_back(g)
        for state in self._states.values():
            state.slot, state.sent_table, state.counts_from, state.refill = -1, None, -1, False
        self._slots.reset()
        self._diff.clear()
        self.runner.reset_slots()
        if in_schedule:
            self.block_manager.reset()
        # groups that finished in the step (their outputs are out) leave now
        self.scheduler.free_finished_seq_groups()

    def _fail(self, g: SequenceGroup, reason: str) -> None:
        """Ends a group with an error output; its blocks are freed."""
        self.scheduler.abort_seq_group(g.request_id)
        for seq in g.get_seqs():
            self.block_manager.free(seq)
            if not seq.is_finished():
                seq.status = SequenceStatus.FINISHED_ABORTED
        g.finished_time = time.monotonic()
        self._emit(OutputProcessor.error_output(g, reason))

    def _emit(self, output: RequestOutput) -> None:
        """Queues a finished request's output for step() to return."""
        group = self._requests.pop(output.request_id, None)
        if group is not None:
            self._forget(group)
        self._outputs.append(output)

    def _forget(self, group: SequenceGroup) -> None:
        for s in group.get_seqs():
            self._release_slot(s)
            self._states.pop(s.seq_id, None)
        self.output_processor.finished_beams.pop(group.request_id, None)

    def _new_detok(self, prompt_token_ids, sp):
        if self.detokenizer is None:
            return None
        return self.detokenizer.new_state(prompt_token_ids, sp.skip_special_tokens)


def _forks_beams(g: SequenceGroup) -> bool:
    """A beam group before its first step: it runs one beam, and the host
    forks the others from that step's proposals."""
    sp = g.sampling_params
    if not sp.use_beam_search or sp.actual_best_of == 1 or g.num_seqs() != 1:
        return False
    return next(iter(g.seqs_dict.values())).get_output_len() == 0


def _check_runner(runner: Runner, config: EngineConfig, eos_token_ids) -> None:
    """ValueError naming each shape in which a runner built apart differs
    from the engine's resolved config."""
    wanted = dict(block_size=config.block_size, max_num_seqs=config.max_num_seqs,
                  max_model_len=config.max_model_len,
                  max_num_batched_tokens=config.max_num_batched_tokens,
                  max_decode_window=config.max_decode_window,
                  eos_token_ids=tuple(sorted(eos_token_ids)))
    got = dict(block_size=runner.block_size, max_num_seqs=runner.max_num_seqs,
               max_model_len=runner.max_model_len,
               max_num_batched_tokens=runner.max_num_batched_tokens,
               max_decode_window=max(runner.window_sizes),
               eos_token_ids=tuple(runner.eos_token_ids))
    if config.num_gpu_blocks is not None:
        wanted["num_gpu_blocks"] = config.num_gpu_blocks
        got["num_gpu_blocks"] = runner.num_gpu_blocks
    wrong = [f"{k}: the runner's {got[k]}, the config's {wanted[k]}"
             for k in wanted if got[k] != wanted[k]]
    if wrong:
        raise ValueError("the runner given to LLMEngine was built for another config ("
                         + "; ".join(wrong) + "): build it with this config's "
                         "sub-configs, or leave runner=None")


def _eos_ids(model) -> frozenset[int]:
    eos = tuple(getattr(model.config, "eos_token_ids", ()) or ())
    if not eos and model.tokenizer is not None and model.tokenizer.eos_token_id is not None:
        eos = (model.tokenizer.eos_token_id,)
    return frozenset(eos)


def load_model(config: EngineConfig):
    """The models.LoadedModel that config.model names, in config.dtype (its
    params on this process's first device)."""
    import models
    return models.load_model(config.model, dtype=_resolve_dtype(config.dtype),
                             attention_backend=config.attention_backend)


def _resolve_dtype(dtype: str) -> str:
    """"auto": bfloat16 on accelerators, float32 on CPU."""
    if dtype != "auto":
        return dtype
    import jax
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def freeze_heap() -> None:
    """Collects, then moves every object alive now out of the cycle
    collector's reach (gc.freeze), as vLLM's engine process does after its
    start-up: a later full collection then does not walk the start-up heap
    (model, compiled programs, engine), which on the H200 machine paused a
    run for 0.72 s. For a process with one engine (the scripts, from the
    command line): an object frozen here is never collected if it later
    becomes cyclic garbage, so a process that builds and drops engines
    (the tests) must not call it."""
    gc.collect()
    gc.freeze()


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
