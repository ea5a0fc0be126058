"""Scheduler: which sequence groups run in the next step.

Three queues: ``waiting`` (FCFS by arrival; new requests and groups preempted
by recomputation), ``running`` and ``swapped``.

With chunked prefill (``SchedulerConfig.enable_chunked_prefill``, vLLM V1's
rule) a step is filled up to ``max_num_batched_tokens``: while prompt work
can run, every decoding group gets one token (step 3 below, window 1; it may
preempt), then prompt chunks take the rest of the budget: the prefills under
way oldest first, then new groups from ``waiting`` (admitted as in step 2,
none once this step preempted or while a group is swapped out), each group's
chunk at most ``long_prefill_token_threshold`` tokens when that is set. A group's
blocks are all allocated at admission; each sequence's prefill runs to
``Sequence.prefill_end`` over as many steps as it needs
(``num_scheduled_tokens`` counts what is dispatched, ahead of
``num_computed_tokens``). A prefill under way is preempted by recompute,
never swapped. When no prompt work can run, the step decodes (a window).
With ``decode_window_between_chunks`` set, a step that leaves a prefill
under way with more than a step's budget still to run (a prompt longer than
the budget, the rest of it over two steps or more) is followed by a
decode window of the other sequences (up to that many steps) before the
next chunk, while no prefilling group has a sequence whose prefill ended
already: the decodes beside a long prompt then get most of their tokens
from windows, the prompt's first token comes later. A prompt cut at the
end of a step's budget and finished in the next is not held up.
A step that ran all the prompt work it could (the budget was not what
stopped it: every admissible prompt fitted) while requests still wait for
room is followed by a decode step when no prefill is under way:
otherwise, with every slot taken, each step would free a sequence or two
and admit just those, one token per decoding sequence a step, and the
decode windows would never run (measured on the H200: 0.88x the
throughput of chunking off on ShareGPT-1000); new prompts wait at most
one window then, as they do with chunking off.

Without it (vLLM V0's rule) a step is all-prefill or all-decode, prefills
first. One ``schedule()`` call:

1. Drop finished groups from ``running`` and free their blocks.
2. Prefill, only while no group is swapped out: take groups from the head of
   ``waiting`` in arrival order. A group whose sequence is longer than
   ``max_model_len``, that needs more blocks than the whole pool, or that
   may run more sequences than ``max_num_seqs`` is rejected (FINISHED_IGNORED,
   listed in ``ignored_seq_groups`` with the reason) and the queue moves on.
   Stop at the first group that does not fit now (blocks above the
   watermark, ``max_num_batched_tokens``, ``max_num_seqs`` counting each
   group's ``get_max_num_running_seqs()``). Admitted groups get their block
   tables (prefix-cache hits included) and move to ``running``. If any was
   admitted, the step is this prefill. A group recomputed after preemption
   may hold more tokens than ``max_num_batched_tokens`` (several sequences):
   admitted first, its prefill runs in chunks of the budget over the next
   steps (its sequences' last tokens left to the group's first decode step,
   as chunked prefill does), and those chunks come before anything else.
3. Decode otherwise: walk ``running`` oldest first. While a group cannot get
   a slot for each of its sequences' next token, preempt the most recently
   arrived running group, all its sequences together: swap it to the host
   pool or free its blocks for recomputation (default: recompute a
   single-sequence group, swap a multi-sequence one; recompute whenever the
   host pool cannot take it). With no younger group left the group preempts
   itself, and a group that cannot grow even alone is rejected. Groups that
   fit append their slots (copy-on-write copies go to ``blocks_to_copy``).
4. If nothing was preempted in this step, swap groups back in, oldest
   first, while blocks and ``max_num_seqs`` allow.
5. Nothing is taken as computed yet: once the step's results are back,
   the engine calls ``mark_computed`` for each group, which advances
   ``num_computed_tokens`` and registers the now-written full blocks in the
   prefix cache. A step that fails or is interrupted is undone with
   ``roll_back`` (recompute preemption: the tokens known on the host stay,
   every block goes back), so the prefix cache never names a block whose
   K/V were not written.

The model runner executes ``blocks_to_swap_out``, then ``blocks_to_swap_in``
(the two never occur in the same step), then ``blocks_to_copy``, then the
model. Host core: stdlib only, never imports jax.
"""
from __future__ import annotations

import bisect
import dataclasses
import itertools
import os
import time

from jpaged.block_manager import AllocStatus, BlockSpaceManager
from jpaged.sequence import Sequence, SequenceGroup, SequenceStatus
from jpaged.stats import EngineStats


@dataclasses.dataclass
class ScheduledSequenceGroup:
    """A group that runs in this step.

    Attributes:
      seq_group: the group; its RUNNING sequences are the rows of the step.
      token_chunk_size: new tokens of the group in this step (all its rows).
      num_new_tokens: seq_id -> tokens that row computes: its last k tokens,
        positions ``[seq.get_len() - k, seq.get_len())`` (decode: k = 1). The
        keys are the group's RUNNING sequences, in order.
      num_computed_tokens: seq_id -> tokens whose K/V are in the pool once
        the step has run (``seq.get_len()`` when it was scheduled; a prompt
        chunk's end); ``Scheduler.mark_computed`` applies it.
      decode: its rows decode one token each from their slots on the device
        (else they compute prompt tokens: a whole prefill or a chunk, listed
        in num_new_tokens, with 0-token sequences left out).
    """
    seq_group: SequenceGroup
    token_chunk_size: int
    num_new_tokens: dict[int, int] = dataclasses.field(default_factory=dict)
    num_computed_tokens: dict[int, int] = dataclasses.field(default_factory=dict)
    decode: bool = False


@dataclasses.dataclass
class SchedulerOutput:
    """What the next step runs.

    Attributes:
      scheduled_seq_groups: groups to run, in order.
      is_prefill: the step computes prompt tokens (its groups that are not
        ``decode``; with chunked prefill, decode groups ride along in the
        same ragged step), else it decodes one token (or a window) per sequence.
      num_batched_tokens: sum of token_chunk_size; at most max_num_batched_tokens,
        except when a single recomputed multi-sequence group alone needs more
        (then it is the only group; each of its rows is <= max_model_len).
      blocks_to_swap_in: (cpu_block, gpu_block) copies, host -> device.
      blocks_to_swap_out: (gpu_block, cpu_block) copies, device -> host.
      blocks_to_copy: (src_block, dst_block) device copies (copy-on-write).
      ignored_seq_groups: (group, reason) of rejected requests (FINISHED_IGNORED).
      preempted: groups preempted in this step.
      swapped_out: the groups preempted by swapping in this step (their host
        blocks hold valid K/V only once blocks_to_swap_out has run).
      recomputed: the groups preempted by recomputation in this step.
      num_steps: decode steps the step runs (a window of tokens per
        sequence; the blocks for them are reserved); 1 for a prefill.
    """
    scheduled_seq_groups: list[ScheduledSequenceGroup] = dataclasses.field(default_factory=list)
    is_prefill: bool = False
    num_batched_tokens: int = 0
    blocks_to_swap_in: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    blocks_to_swap_out: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    blocks_to_copy: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    ignored_seq_groups: list[tuple[SequenceGroup, str]] = dataclasses.field(default_factory=list)
    preempted: int = 0
    swapped_out: list[SequenceGroup] = dataclasses.field(default_factory=list)
    recomputed: list[SequenceGroup] = dataclasses.field(default_factory=list)
    num_steps: int = 1

class Scheduler:
    """FCFS iteration-level scheduler with preemption by recompute or swap.

    Args:
      config: a SchedulerConfig (max_num_seqs, max_num_batched_tokens,
        max_model_len, preemption_mode).
      block_manager: the BlockSpaceManager of the engine.
      stats: the engine's EngineStats (its preemption and swap counters are
        written here); default a fresh one.
    """

    def __init__(self, config, block_manager: BlockSpaceManager, stats: EngineStats | None = None):
        self.config = config
        self.block_manager = block_manager
        self.waiting: list[SequenceGroup] = []
        self.running: list[SequenceGroup] = []
        self.swapped: list[SequenceGroup] = []
        self._order: dict[str, int] = {}     # request_id -> arrival rank (FCFS key)
        self._counter = itertools.count()
        self.stats = stats if stats is not None else EngineStats()
        # JPAGED_CHECK_INVARIANTS=1: the block manager checks its refcounts and
        # tables after every schedule (slow; for debugging the host core)
        self._check_invariants = os.environ.get("JPAGED_CHECK_INVARIANTS") == "1"
        self._decode_turn = False  # chunked prefill: the next step decodes (module docstring)
        self._window_turn = False  # the next step is a window between chunks

    # -- requests ------------------------------------------------------------

    def add_seq_group(self, seq_group: SequenceGroup) -> None:
        """Queues a new request (its sequences WAITING) behind every earlier one."""
        if seq_group.request_id in self._order:
            raise ValueError(f"request {seq_group.request_id!r} is already scheduled")
        for seq in seq_group.get_seqs():
            if seq.status != SequenceStatus.WAITING:
                raise ValueError(f"request {seq_group.request_id!r}: a new group's sequences must be "
                                 f"WAITING, sequence {seq.seq_id} is {seq.status.name}")
        self._order[seq_group.request_id] = next(self._counter)
        self.waiting.append(seq_group)

    def abort_seq_group(self, request_id) -> None:
        """Aborts one request id (or an iterable of ids): its unfinished
        sequences become FINISHED_ABORTED and their blocks are freed. Unknown ids are ignored."""
        ids = {request_id} if isinstance(request_id, str) else set(request_id)
        for queue in (self.waiting, self.running, self.swapped):
            for group in [g for g in queue if g.request_id in ids]:
                queue.remove(group)
                for seq in group.get_seqs():
                    if not seq.is_finished():
                        seq.status = SequenceStatus.FINISHED_ABORTED
                    self.block_manager.free(seq)
                self._order.pop(group.request_id, None)

    def has_unfinished_seqs(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def fork_seq(self, parent_seq: Sequence, child_seq: Sequence) -> None:
        """The child shares the parent's blocks (the engine adds it to the group)."""
        self.block_manager.fork(parent_seq, child_seq)

    def free_seq(self, seq: Sequence) -> None:
        """Frees a finished (or dropped) sequence's blocks."""
        self.block_manager.free(seq)

    def free_finished_seq_groups(self) -> None:
        """Drops finished groups from running, freeing any blocks they still hold."""
        keep = []
        for group in self.running:
            if group.is_finished():
                for seq in group.get_seqs():
                    self.block_manager.free(seq)
                self._order.pop(group.request_id, None)
                if group.finished_time is None:
                    group.finished_time = time.monotonic()
            else:
                keep.append(group)
        self.running = keep

    def can_decode_without_preemption(self) -> bool:
        """Whether every running group can get its next slots together now,
        so the next schedule() preempts and rejects nothing."""
        return self.block_manager.can_append_slots_all(self.running)

    # -- one step ------------------------------------------------------------

    def schedule(self, max_window: int = 1, idle: bool = True) -> SchedulerOutput:
        """Decides the next step (see the module docstring). A decode step
        may run up to `max_window` tokens per sequence (a power of two): when
        requests wait that could not be admitted, or when `idle` (no request
        arrived lately); else one, so the next arrival is not held up."""
        self.free_finished_seq_groups()
        out = SchedulerOutput()
        if self.config.enable_chunked_prefill:
            turn, self._decode_turn = self._decode_turn, False
            between, self._window_turn = self._window_turn, False
            if between and self._may_window_between_chunks():
                window = self.config.decode_window_between_chunks
                self._schedule_decodes(out, min(max_window, window), skip=self._prefilling)
            elif self._has_prompt_work(out) and not (turn and self._may_decode_turn()):
                self._schedule_mixed(out)
            else:  # no prompt can start now, or the decodes' turn
                self._schedule_decodes(out, max_window if idle or self.waiting else 1)
        else:
            admitted = False
            if any(self._prefilling(g) for g in self.running):
                self._continue_prefills(out, self.config.max_num_batched_tokens)
            elif not self.swapped:
                admitted = self._schedule_prefills(out)
            if admitted and not out.scheduled_seq_groups:
                # a split group whose prefix was all cached: its first decode
                # step is this one, one token (max_window was chosen before
                # it ran, e.g. without its beams)
                self._schedule_decodes(out, 1)
            elif not out.scheduled_seq_groups:
                # NOTE: prefills were tried first: a group still waiting cannot be admitted now
                self._schedule_decodes(out, max_window if idle or self.waiting else 1)
        now = time.monotonic()
        for scheduled in out.scheduled_seq_groups:
            group = scheduled.seq_group
            if group.first_scheduled_time is None:
                group.first_scheduled_time = now
            if not scheduled.num_computed_tokens:
                scheduled.num_computed_tokens = {s.seq_id: s.get_len()
                                                 for s in group.get_seqs(SequenceStatus.RUNNING)}
        out.num_batched_tokens = sum(s.token_chunk_size for s in out.scheduled_seq_groups)
        if self._check_invariants:
            self.block_manager.check_invariants()
        return out

    def mark_computed(self, scheduled: ScheduledSequenceGroup) -> None:
        """Records that a scheduled group's step has run: its sequences'
        ``num_computed_tokens`` advance and their full blocks enter the
        prefix cache. Call it only once the step's results are back."""
        group = scheduled.seq_group
        for seq_id, n in scheduled.num_computed_tokens.items():
            seq = group.seqs_dict.get(seq_id)
            if seq is not None and seq.status == SequenceStatus.RUNNING:
                seq.num_computed_tokens = max(seq.num_computed_tokens, n)
        self.block_manager.mark_blocks_as_computed(group)

    def roll_back(self, group: SequenceGroup) -> None:
        """Undoes whatever a failed step did to an unfinished group: its
        blocks are freed (device and host), its unfinished sequences wait
        for a recompute of every token they hold, and it rejoins
        ``waiting`` at its arrival rank. The caller drops tokens the host
        never received (placeholders) first."""
        for queue in (self.running, self.swapped, self.waiting):
            if group in queue:
                queue.remove(group)
        for seq in group.get_seqs():
            self.block_manager.free(seq)
            if not seq.is_finished():
                seq.status = SequenceStatus.WAITING
                seq.reset_computed()
        if group.request_id not in self._order:  # lost mid-schedule: it goes last
            self._order[group.request_id] = next(self._counter)
        bisect.insort(self.waiting, group, key=self._key)

    def _head_admissible(self, out: SchedulerOutput, num_seqs: int) -> bool:
        """Whether the head of ``waiting`` can be admitted now (beside
        num_seqs running sequences); rejects the heads that never can."""
        cfg, bm = self.config, self.block_manager
        while self.waiting:
            group = self.waiting[0]
            max_len = max(s.get_len() for s in group.get_seqs(SequenceStatus.WAITING))
            if max_len > cfg.max_model_len:
                self._ignore(out, self.waiting.pop(0),
                             f"the sequence holds {max_len} tokens, more than max_model_len "
                             f"({cfg.max_model_len})")
                continue
            if group.get_max_num_running_seqs() > cfg.max_num_seqs:
                self._ignore(out, self.waiting.pop(0),
                             f"the request runs {group.get_max_num_running_seqs()} sequences "
                             f"(best_of), more than max_num_seqs ({cfg.max_num_seqs})")
                continue
            status = bm.can_allocate(group)
            if status == AllocStatus.NEVER:
                self._ignore(out, self.waiting.pop(0),
                             f"the request needs more KV cache blocks than the pool holds "
                             f"({bm.get_num_total_gpu_blocks()} blocks of {bm.block_size} tokens)")
                continue
            return (status != AllocStatus.LATER
                    and num_seqs + group.get_max_num_running_seqs() <= cfg.max_num_seqs)
        return False

    def _admit_head(self, split: bool = False) -> SequenceGroup:
        """Moves the head of ``waiting`` to ``running`` with its block tables;
        its sequences' prefills start after their cached prefix. ``split``:
        its prefill will run over several steps (chunked prefill does that
        to every group)."""
        group = self.waiting.pop(0)
        bm = self.block_manager
        bm.allocate(group)
        seqs = group.get_seqs(SequenceStatus.WAITING)
        # NOTE: a sequence of a multi-sequence group whose prefill may be
        # split leaves its last token to the group's decode step, so its rows
        # start decoding together; so does a beam search's, whose steps the
        # decode steps decide (jpaged.device_batch).
        split = split or self.config.enable_chunked_prefill
        beam = group.sampling_params is not None and group.sampling_params.use_beam_search
        last = 1 if (len(seqs) > 1 and split) or beam else 0
        for seq in seqs:
            seq.status = SequenceStatus.RUNNING
            seq.num_computed_tokens = seq.num_scheduled_tokens = bm.get_num_cached_tokens(seq)
            seq.prefill_end = max(seq.num_scheduled_tokens, seq.get_len() - last)
        self.running.append(group)
        return group

    def _schedule_prefills(self, out: SchedulerOutput) -> bool:
        """Without chunked prefill: whole prompts, while they fit the budget.
        Returns whether a group was admitted."""
        cfg = self.config
        num_seqs = sum(g.get_max_num_running_seqs() for g in self.running)
        num_tokens = 0
        admitted = False
        while self._head_admissible(out, num_seqs):
            seqs = self.waiting[0].get_seqs(SequenceStatus.WAITING)
            # Budget with the full length (cache hits are known only at allocate).
            if out.scheduled_seq_groups and num_tokens + sum(s.get_len() for s in seqs) > \
                    cfg.max_num_batched_tokens:
                break
            if sum(s.get_len() for s in seqs) > cfg.max_num_batched_tokens:
                # NOTE: only a group recomputed after preemption holds more
                # tokens than a step (one sequence is at most max_model_len,
                # within the budget): its prefill runs in chunks over the
                # next steps, each within the budget, before anything decodes.
                group = self._admit_head(split=True)
                self._schedule_chunk(out, group, cfg.max_num_batched_tokens)
                out.is_prefill = bool(out.scheduled_seq_groups)
                return True
            group = self._admit_head()
            admitted = True
            new_tokens, computed = {}, {}
            for seq in seqs:
                if seq.prefill_end > seq.num_computed_tokens:
                    new_tokens[seq.seq_id] = seq.prefill_end - seq.num_computed_tokens
                    computed[seq.seq_id] = seq.prefill_end
                seq.num_scheduled_tokens = seq.prefill_end
            chunk = sum(new_tokens.values())
            num_tokens += chunk
            num_seqs += group.get_max_num_running_seqs()
            if chunk:  # (else all its prefix was cached: it decodes next)
                out.scheduled_seq_groups.append(ScheduledSequenceGroup(group, chunk, new_tokens,
                                                                       computed))
        out.is_prefill = bool(out.scheduled_seq_groups)
        return admitted

    def _continue_prefills(self, out: SchedulerOutput, budget: int) -> int:
        """The next chunks of the prefills under way, oldest first, within
        budget tokens; returns the budget left. (Without chunked prefill:
        the oversized recomputed groups split over steps.)"""
        for group in sorted([g for g in self.running if self._prefilling(g)], key=self._key):
            budget -= self._schedule_chunk(out, group, budget)
        out.is_prefill = True
        return budget

    # -- chunked prefill -------------------------------------------------------

    def _prefilling(self, group: SequenceGroup) -> bool:
        return any(s.is_prefilling() for s in group.seqs_dict.values()
                   if s.status == SequenceStatus.RUNNING)

    def _prefill_left(self, group: SequenceGroup) -> int:
        """Prompt tokens of the group's prefill under way not yet scheduled."""
        return sum(s.prefill_end - s.num_scheduled_tokens for s in group.seqs_dict.values()
                   if s.status == SequenceStatus.RUNNING and s.is_prefilling())

    def _has_prompt_work(self, out: SchedulerOutput) -> bool:
        """Whether a prompt chunk can run now: a prefill under way, or a
        waiting group that can be admitted (heads that never can are
        rejected into `out` on the way)."""
        if any(self._prefilling(g) for g in self.running):
            return True
        if not self.waiting or self.swapped:
            return False
        return self._head_admissible(out, sum(g.get_max_num_running_seqs()
                                              for g in self.running))

    def _may_decode_turn(self) -> bool:
        """Whether a decode step may run before the prompt work: no prefill
        is under way and some sequence decodes."""
        return (not any(self._prefilling(g) for g in self.running)
                and any(g.get_seqs(SequenceStatus.RUNNING) for g in self.running))

    def _may_window_between_chunks(self) -> bool:
        """Whether a decode window may run while a prefill is under way: some
        sequence decodes, and no prefilling group has a sequence whose
        prefill ended (its slot is active: a window would run it, though
        its group takes no slots before all of its prefills end)."""
        decoding = False
        for g in self.running:
            seqs = g.get_seqs(SequenceStatus.RUNNING)
            if self._prefilling(g):
                if not all(s.is_prefilling() for s in seqs):
                    return False
            elif seqs:
                decoding = True
        return decoding

    def _schedule_mixed(self, out: SchedulerOutput) -> None:
        """With chunked prefill: one token for every decoding sequence first,
        then prompt chunks in the rest of the token budget, the prefills
        under way oldest first, then new groups (none once this step
        preempted; a new group that would not end in this step only as
        the step's first prompt work). Every chunk's sequences hold all
        their blocks already (allocated at admission)."""
        cfg = self.config
        self._schedule_decodes(out, 1, skip=self._prefilling)
        budget = cfg.max_num_batched_tokens - sum(s.token_chunk_size
                                                  for s in out.scheduled_seq_groups)
        budget = self._continue_prefills(out, budget)
        full = budget <= 0  # prompt work was left for later steps
        if out.preempted == 0 and not self.swapped:
            num_seqs = sum(g.get_max_num_running_seqs() for g in self.running)
            while not full and self._head_admissible(out, num_seqs):
                # NOTE: a new prompt starts only if it ends in this step,
                # unless it is the step's first prompt work: one admitted
                # beside another's first chunk would miss the prefix-cache
                # hits that chunk's blocks give once they are written.
                seqs = self.waiting[0].get_seqs(SequenceStatus.WAITING)
                if (any(not s.decode for s in out.scheduled_seq_groups)
                        and sum(s.get_len() for s in seqs) > self._chunk_cap(budget)):
                    full = True
                    break
                group = self._admit_head()
                num_seqs += group.get_max_num_running_seqs()
                budget -= self._schedule_chunk(out, group, budget)
                full = budget <= 0
        # NOTE: a ragged step even when no chunk fit: a decode window would
        # run every active slot, a multi-sequence group's finished prefills too.
        out.is_prefill = bool(out.scheduled_seq_groups)
        # the decodes' turn: every admissible prompt ran and the queue's head
        # waits for room (a sequence that finishes); a head that arrived
        # into room is admitted at once
        self._decode_turn = not full and out.preempted == 0 and bool(self.waiting)
        # a prefill goes on over more than the next step: the decodes' window comes first
        self._window_turn = (self.config.decode_window_between_chunks > 0
                             and any(self._prefill_left(g) > cfg.max_num_batched_tokens
                                     for g in self.running))

    def _chunk_cap(self, budget: int) -> int:
        """Tokens one group's chunk may take of what is left of the budget
        (long_prefill_token_threshold, with chunked prefill)."""
        cap = self.config.long_prefill_token_threshold
        return min(budget, cap) if cap and self.config.enable_chunked_prefill else budget

    def _schedule_chunk(self, out: SchedulerOutput, group: SequenceGroup, budget: int) -> int:
        """The next chunk of a prefilling group, within budget tokens (and
        long_prefill_token_threshold): its sequences in order, each up to
        its prefill's end. Returns its tokens."""
        budget = self._chunk_cap(budget)
        new_tokens, computed = {}, {}
        used = 0
        for seq in group.get_seqs(SequenceStatus.RUNNING):
            n = min(seq.prefill_end - seq.num_scheduled_tokens, budget - used)
            if n <= 0:
                continue
            seq.num_scheduled_tokens += n
            new_tokens[seq.seq_id] = n
            computed[seq.seq_id] = seq.num_scheduled_tokens
            used += n
        if used:
            out.scheduled_seq_groups.append(ScheduledSequenceGroup(group, used, new_tokens,
                                                                   computed))
        return used

    def max_len(self, group: SequenceGroup) -> int:
        """Tokens a sequence of the group may hold at most (prompt + max_tokens,
        capped by max_model_len)."""
        limit = self.config.max_model_len
        params = group.sampling_params
        if params is None or params.max_tokens is None:
            return limit
        return min(limit, group.prompt_len + params.max_tokens)

    def _window(self, queue: list[SequenceGroup], max_window: int) -> int:
        """Decode steps for this step: max_window, halved until the pool can
        reserve every running sequence's slots that far ahead, and no more
        than the longest sequence still needs; 1 while a group is swapped out
        (it comes back between steps). 0: not even one step fits (preempt)."""
        bm = self.block_manager
        if max_window <= 1 or self.swapped:
            return 1 if bm.can_append_slots_all(queue) else 0
        need = 0
        for g in queue:
            limit = self.max_len(g)
            for s in g.seqs_dict.values():
                if s.status == SequenceStatus.RUNNING:
                    need = max(need, limit - s.get_len())
        k = max_window
        while k > 1 and k // 2 >= need:
            k //= 2
        windows = [k >> i for i in range(k.bit_length())]  # k, k/2, ..., 1
        free = bm.get_num_free_gpu_blocks()
        num_seqs = sum(g.num_seqs(SequenceStatus.RUNNING) for g in queue)
        if num_seqs * (1 + -(-(k - 1) // bm.block_size)) <= free:  # a cheap bound first
            return k
        for window, cost in zip(windows, bm.window_costs(queue, windows, self.max_len)):
            if cost <= free:
                return window
        return 0

    def _schedule_decodes(self, out: SchedulerOutput, max_window: int = 1,
                          skip=None) -> None:
        """Decode steps of the running groups (`skip(group)`: a group that
        stays running but decodes nothing now, a prefill under way)."""
        bm = self.block_manager
        queue = sorted(self.running, key=self._key)
        grows = (lambda g: True) if skip is None else (lambda g: not skip(g))
        running: list[SequenceGroup] = []
        decoding = [g for g in queue if grows(g)]
        window = self._window(decoding, max_window) if decoding else 1
        out.num_steps = max(1, window)
        if window:  # nobody is preempted
            for group in decoding:
                self._append_slots(out, group, out.num_steps - 1)
            running, queue = queue, []
        while queue:
            group = queue.pop(0)
            if not grows(group):
                running.append(group)
                continue
            while not bm.can_append_slots(group):
                if queue:
                    self._preempt(out, queue.pop())
                elif running:
                    self._preempt(out, group)
                    break
                else:  # it holds every used block and still cannot grow
                    self._ignore(out, group, f"the request outgrew the KV cache "
                                             f"({bm.get_num_total_gpu_blocks()} blocks of "
                                             f"{bm.block_size} tokens)")
                    break
            else:
                self._append_slots(out, group)
                running.append(group)
        self.running = running

        if out.preempted == 0:
            num_seqs = sum(g.get_max_num_running_seqs() for g in self.running)
            self.swapped.sort(key=self._key)
            while self.swapped:
                group = self.swapped[0]
                status = bm.can_swap_in(group)
                if status == AllocStatus.NEVER or (status == AllocStatus.LATER and not self.running):
                    # Nothing else holds device blocks, so it can never come back.
                    self.swapped.pop(0)
                    self._ignore(out, group, f"the request outgrew the KV cache "
                                             f"({bm.get_num_total_gpu_blocks()} blocks of "
                                             f"{bm.block_size} tokens)")
                    continue
                if status == AllocStatus.LATER:
                    break
                if num_seqs + group.get_max_num_running_seqs() > self.config.max_num_seqs:
                    break
                self.swapped.pop(0)
                out.blocks_to_swap_in.extend(bm.swap_in(group))
                for seq in group.get_seqs(SequenceStatus.SWAPPED):
                    seq.status = SequenceStatus.RUNNING
                self.stats.num_swaps_in += 1
                num_seqs += group.get_max_num_running_seqs()
                self._append_slots(out, group)
                self.running.append(group)

        for group in self.running:
            if grows(group):
                seqs = group.get_seqs(SequenceStatus.RUNNING)
                out.scheduled_seq_groups.append(ScheduledSequenceGroup(
                    group, len(seqs), {s.seq_id: 1 for s in seqs}, decode=True))
        out.is_prefill = False

    def _append_slots(self, out: SchedulerOutput, group: SequenceGroup,
                      num_lookahead: int = 0) -> None:
        max_len = self.max_len(group)
        for seq in group.get_seqs(SequenceStatus.RUNNING):
            out.blocks_to_copy.extend(self.block_manager.append_slots(seq, num_lookahead,
                                                                      max_len))

    def _preempt(self, out: SchedulerOutput, group: SequenceGroup) -> None:
        bm = self.block_manager
        mode = self.config.preemption_mode
        if mode is None:
            mode = "recompute" if group.get_max_num_running_seqs() == 1 else "swap"
        if mode == "swap" and (not bm.can_swap_out(group) or group.has_penalties()
                               or self._prefilling(group)):
            # (the device's penalty counts stay with the slot; a prompt half
            # prefilled has no slot state worth keeping)
            mode = "recompute"
        if mode == "swap":
            out.blocks_to_swap_out.extend(bm.swap_out(group))
            for seq in group.get_seqs(SequenceStatus.RUNNING):
                seq.status = SequenceStatus.SWAPPED
            self.swapped.append(group)
            out.swapped_out.append(group)
            self.stats.num_swaps_out += 1
        else:
            for seq in group.get_seqs(SequenceStatus.RUNNING):
                bm.free(seq)
                seq.status = SequenceStatus.WAITING
                seq.reset_computed()
            # Back in the waiting queue at its arrival rank (ahead of every newer request).
            bisect.insort(self.waiting, group, key=self._key)
            out.recomputed.append(group)
        out.preempted += 1
        group.num_preemptions += 1
        self.stats.num_preemptions += 1

    def _ignore(self, out: SchedulerOutput, group: SequenceGroup, reason: str) -> None:
        for seq in group.get_unfinished_seqs():
            seq.status = SequenceStatus.FINISHED_IGNORED
            self.block_manager.free(seq)
        group.finished_time = time.monotonic()
        self._order.pop(group.request_id, None)
        out.ignored_seq_groups.append((group, reason))

    def _key(self, group: SequenceGroup) -> int:
        return self._order[group.request_id]
