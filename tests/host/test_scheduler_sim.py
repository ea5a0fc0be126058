"""Randomised simulations of the scheduler and block manager with a fake model.

The fake engine appends random tokens, forks beams and parallel samples,
finishes and aborts sequences at random, over pools small enough to force
preemption. A fake KV pool stores, in every slot, a hash of the prefix whose
K/V the slot holds; the simulation executes swaps and copies as a model
runner would and checks that every sequence reads exactly its own prefix.
Some steps fail at a random point (before the block moves, before the K/V
writes, or before the update) and are rolled back as the engine does; a
rolled-back step must leave no prefix-cache entry for a block it did not
write, and every request must still finish.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jpaged.block_manager import BlockSpaceManager
from jpaged.config import SchedulerConfig
from jpaged.sampling_params import SamplingParams
from jpaged.scheduler import Scheduler
from jpaged.sequence import Sequence, SequenceGroup, SequenceStatus

VOCAB = 3      # a tiny vocabulary makes shared prefixes (and cache hits) common
MAX_BEST_OF = 3
BASES = [[random.Random(b).randrange(VOCAB) for _ in range(64)] for b in range(3)]


@dataclasses.dataclass
class Request:
    prompt_len: int
    base: int
    best_of: int
    beam: bool
    max_tokens: int
    arrival_step: int


@dataclasses.dataclass
class SimConfig:
    block_size: int
    max_model_len: int
    requests: list[Request]
    preemption_mode: str | None
    prefix_caching: bool
    extra_gpu_blocks: int
    num_cpu_blocks: int
    watermark: float
    max_num_seqs: int
    seed: int
    stop_prob: float = 0.1
    abort_prob: float = 0.02
    fail_prob: float = 0.0
    max_window: int = 1
    # chunked prefill with this token budget (None: off, whole prompts)
    chunk_budget: int | None = None
    # with chunked prefill: long_prefill_token_threshold (0: off)
    chunk_cap: int = 0
    # with chunked prefill: decode_window_between_chunks (0: off)
    between_window: int = 0


def prefix_hashes(token_ids):
    """h[i] stands for the K/V of token i: it depends on tokens 0..i."""
    out, prev = [], None
    for t in token_ids:
        prev = hash((prev, t))
        out.append(prev)
    return out


class FakePool:
    """The KV pools as the model runner would hold them: one value per slot."""

    def __init__(self, num_gpu, num_cpu, block_size):
        self.gpu = [[None] * block_size for _ in range(num_gpu)]
        self.cpu = [[None] * block_size for _ in range(num_cpu)]

    def run_block_ops(self, out):
        assert not (out.blocks_to_swap_in and out.blocks_to_swap_out)
        for g, c in out.blocks_to_swap_out:
            self.cpu[c] = list(self.gpu[g])
        for c, g in out.blocks_to_swap_in:
            self.gpu[g] = list(self.cpu[c])
        for src, dst in out.blocks_to_copy:
            self.gpu[dst] = list(self.gpu[src])


def check_tables(sched, bm):
    """Refcounts equal table counts, free and used are disjoint, ids in range, block 0 unused."""
    bm.check_invariants()
    gpu_counts, cpu_counts = collections.Counter(), collections.Counter()
    for g in sched.running:
        for s in g.get_seqs():
            if s.status == SequenceStatus.RUNNING:
                gpu_counts.update(bm.get_block_table(s))
            else:
                assert s.is_finished() and not bm.has_block_table(s)
    for g in sched.swapped:
        for s in g.get_seqs(SequenceStatus.SWAPPED):
            cpu_counts.update(bm.get_cpu_block_table(s))
    for g in sched.waiting:
        for s in g.get_seqs():
            assert not bm.has_block_table(s)
    for alloc, counts in ((bm.gpu_allocator, gpu_counts), (bm.cpu_allocator, cpu_counts)):
        assert all(alloc.first_block_id <= b < alloc.num_blocks for b in counts)
        for b in range(alloc.first_block_id, alloc.num_blocks):
            assert alloc.get_ref_count(b) == counts[b], (alloc.device, b)
        free = alloc.get_free_block_ids()
        assert free.isdisjoint(counts)
        assert len(free) + len(counts) == alloc.num_usable_blocks
    assert 0 not in gpu_counts


def roll_back(sched, out):
    """The engine's undo of a failed step: every group the step scheduled or
    swapped out is recomputed from the tokens it holds."""
    for g in [sg.seq_group for sg in out.scheduled_seq_groups] + out.swapped_out:
        if not g.is_finished():
            sched.roll_back(g)
            assert all(s.is_finished() or s.status == SequenceStatus.WAITING
                       for s in g.get_seqs())


def run_sim(cfg: SimConfig) -> dict:
    rng = random.Random(cfg.seed)
    bs = cfg.block_size
    # A group's most blocks: every sequence at its longest, nothing shared.
    worst = [(max(2, r.best_of) if r.beam else r.best_of)
             * math.ceil(min(cfg.max_model_len, r.prompt_len + r.max_tokens) / bs)
             for r in cfg.requests]
    # Around the largest group: a negative slack makes some groups too big for the pool.
    num_gpu = max(2, 1 + max(worst) + cfg.extra_gpu_blocks)
    bm = BlockSpaceManager(bs, num_gpu, cfg.num_cpu_blocks, watermark=cfg.watermark,
                           enable_prefix_caching=cfg.prefix_caching)
    chunked = cfg.chunk_budget is not None
    budget = (max(cfg.chunk_budget, cfg.max_num_seqs) if chunked
              else max(cfg.max_model_len, cfg.max_num_seqs) + 4)
    sched_cfg = SchedulerConfig(max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=budget,
                                max_model_len=cfg.max_model_len, preemption_mode=cfg.preemption_mode,
                                enable_chunked_prefill=chunked,
                                long_prefill_token_threshold=cfg.chunk_cap if chunked else 0,
                                decode_window_between_chunks=cfg.between_window if chunked else 0)
    sched = Scheduler(sched_cfg, bm)
    pool = FakePool(num_gpu, cfg.num_cpu_blocks, bs)
    seq_ids = iter(range(10**9))
    groups: dict[str, SequenceGroup] = {}
    finished: dict[str, SequenceStatus | str] = {}
    admitted: list[int] = []
    too_long = {str(i) for i, r in enumerate(cfg.requests) if r.prompt_len > cfg.max_model_len}
    too_big = {str(i) for i, w in enumerate(worst) if w > num_gpu - 1}
    stats = collections.Counter()

    def finish(rid, how):
        assert rid not in finished, f"request {rid} finished twice"
        finished[rid] = how

    for step in range(3000):
        for i, r in enumerate(cfg.requests):
            if r.arrival_step == step:
                split = r.prompt_len * 2 // 3
                prompt = BASES[r.base][:split] + [rng.randrange(VOCAB) for _ in range(r.prompt_len - split)]
                if r.beam:
                    params = SamplingParams(best_of=max(2, r.best_of), use_beam_search=True,
                                            temperature=0.0, max_tokens=r.max_tokens)
                else:
                    params = SamplingParams(best_of=r.best_of, temperature=1.0, max_tokens=r.max_tokens)
                g = SequenceGroup(str(i), [Sequence(next(seq_ids), None, prompt, bs)], params, float(step))
                groups[str(i)] = g
                sched.add_seq_group(g)
        if step > max(r.arrival_step for r in cfg.requests) and not sched.has_unfinished_seqs():
            break

        def ends(seq, params):
            if seq.get_output_len() >= params.max_tokens or seq.get_len() >= cfg.max_model_len:
                seq.status = SequenceStatus.FINISHED_LENGTH_CAPPED
            elif rng.random() < cfg.stop_prob:
                seq.status = SequenceStatus.FINISHED_STOPPED
            return seq.is_finished()

        had_swapped = bool(sched.swapped)
        beams = any(g.sampling_params.use_beam_search for g in sched.running)
        out = sched.schedule(1 if beams else cfg.max_window)
        check_tables(sched, bm)
        stats["preempted"] += out.preempted
        for g, reason in out.ignored_seq_groups:
            if "max_model_len" in reason:
                assert g.request_id in too_long, reason
            else:  # only a group that may outgrow the pool is rejected for its size
                assert g.request_id in too_big and "KV cache" in reason, reason
            assert g.is_finished() and any(s.status == SequenceStatus.FINISHED_IGNORED
                                           for s in g.get_seqs())
            finish(g.request_id, "ignored")
        assert out.num_batched_tokens == sum(s.token_chunk_size for s in out.scheduled_seq_groups)
        # every step within the budget, an oversized recomputed group's
        # prefill included (the scheduler splits it over steps)
        assert out.num_batched_tokens <= sched_cfg.max_num_batched_tokens
        fresh = set()
        # admitted now, in admission order (new groups join `running` last;
        # one whose prefill is empty, a beam's one-token prompt or a prompt
        # all cached, has no prompt work in the step, and its first decode
        # may preempt it by swapping in the step that admitted it)
        for g in sched.running + sched.swapped:
            if int(g.request_id) not in admitted:
                assert not had_swapped, "admitted a request while a group was swapped out"
                admitted.append(int(g.request_id))
                fresh.add(int(g.request_id))
        if not out.is_prefill:
            assert sum(len(sg.num_new_tokens) for sg in out.scheduled_seq_groups) <= cfg.max_num_seqs
            # a decode window (one that runs: it schedules someone) runs every
            # active slot on the device: each running sequence whose prefill
            # ended takes its slots in it (a prefill under way leaves its
            # sequences out, none of them active)
            grown = {sid for sg in out.scheduled_seq_groups for sid in sg.num_new_tokens}
            for g in sched.running if grown else []:
                for seq in g.get_seqs(SequenceStatus.RUNNING):
                    assert seq.is_prefilling() or seq.seq_id in grown, (g.request_id, seq.seq_id)

        # A failed step: undone at one of three points, as the engine's _recover does.
        fail_at = rng.randrange(3) if rng.random() < cfg.fail_prob else None
        if fail_at == 0:
            roll_back(sched, out)
            continue
        # The model runner: block operations, then the context must already be
        # in the pool, then the new tokens' K/V are written.
        pool.run_block_ops(out)
        rows = []
        for sg in out.scheduled_seq_groups:
            group = sg.seq_group
            running = group.get_seqs(SequenceStatus.RUNNING)
            # a prompt chunk: tokens [end - k, end); without chunked prefill a
            # whole prompt is the chunk that ends it
            chunk = not sg.decode
            if chunk:
                assert list(sg.num_new_tokens) == [s.seq_id for s in running
                                                   if s.seq_id in sg.num_new_tokens]
            else:
                assert list(sg.num_new_tokens) == [s.seq_id for s in running]
            assert sg.token_chunk_size == sum(sg.num_new_tokens.values())
            if chunk and sched_cfg.long_prefill_token_threshold:
                assert sg.token_chunk_size <= sched_cfg.long_prefill_token_threshold
            for seq in running:
                if seq.seq_id not in sg.num_new_tokens:
                    continue
                k = sg.num_new_tokens[seq.seq_id]
                n = seq.get_len()
                end = sg.num_computed_tokens[seq.seq_id] if chunk else n
                assert 1 <= k <= end <= n and (not sg.decode or k == 1)
                # (after a window, the tokens it generated count once the next step ran)
                assert sg.num_computed_tokens[seq.seq_id] == end
                assert seq.num_computed_tokens == end - k or (
                    sg.decode and seq.num_computed_tokens < n - k)
                table = bm.get_block_table(seq)
                cover = n if chunk else min(n + out.num_steps - 1, max(n, sched.max_len(group)))
                assert len(table) == math.ceil(cover / bs) and 0 not in table
                ph = prefix_hashes(seq.get_token_ids())
                for p in range(end - k):
                    assert pool.gpu[table[p // bs]][p % bs] == ph[p], "read a stale or foreign slot"
                if int(group.request_id) in fresh:  # admitted now: its cache hits
                    stats["cached_tokens"] += end - k
                stats["chunks"] += chunk and (k < n or end < n)
                rows.append((seq, table, ph, end - k, end))
        if fail_at == 1:
            roll_back(sched, out)
            continue
        for seq, table, ph, start, end in rows:
            for p in range(start, end):
                pool.gpu[table[p // bs]][p % bs] = ph[p]
        for seq, table, ph, start, end in rows:
            for p in range(end):
                assert pool.gpu[table[p // bs]][p % bs] == ph[p], "two sequences wrote one slot"

        if fail_at == 2:
            roll_back(sched, out)
            continue
        stats["steps_done"] += 1
        # The engine's update: the step's tokens are computed, then sample, fork, finish.
        for sg in out.scheduled_seq_groups:
            sched.mark_computed(sg)
            group = sg.seq_group
            assert all(seq.num_computed_tokens == sg.num_computed_tokens[seq.seq_id]
                       for seq in group.get_seqs(SequenceStatus.RUNNING)
                       if seq.seq_id in sg.num_computed_tokens)
            params = group.sampling_params
            running = group.get_seqs(SequenceStatus.RUNNING)
            if not sg.decode and any(sg.num_computed_tokens.get(s.seq_id) != s.get_len()
                                     for s in running):
                # a chunk that does not end a prompt samples nothing (a
                # multi-sequence group whose prefill may be split, chunking
                # on or an oversized recomputed group, samples its rows
                # together when it decodes next)
                assert all(sg.num_computed_tokens.get(s.seq_id, 0) < s.get_len()
                                       for s in running)
                continue
            if params.use_beam_search:
                width = params.actual_best_of - sum(s.is_finished() for s in group.get_seqs())
                parents = collections.Counter(rng.choice(running).seq_id for _ in range(width))
                for parent in running:
                    uses = parents[parent.seq_id]
                    if uses == 0:
                        group.remove(parent.seq_id)
                        sched.free_seq(parent)
                        continue
                    for _ in range(uses - 1):
                        child = parent.fork(next(seq_ids))
                        child.append_token_id(rng.randrange(VOCAB), -1.0)
                        group.add(child)
                        sched.fork_seq(parent, child)
                        stats["forks"] += 1
                    parent.append_token_id(rng.randrange(VOCAB), -1.0)
            else:
                if group.num_seqs() < params.actual_best_of:
                    assert out.is_prefill and len(running) == 1
                    for _ in range(params.actual_best_of - 1):
                        child = running[0].fork(next(seq_ids))
                        child.append_token_id(rng.randrange(VOCAB), -1.0)
                        group.add(child)
                        sched.fork_seq(running[0], child)
                        stats["forks"] += 1
                    running[0].append_token_id(rng.randrange(VOCAB), -1.0)
                else:
                    for seq in running:
                        for j in range(out.num_steps):  # a decode window: tokens on the device
                            if j > 0:  # the token sampled last step is this step's input
                                p = seq.get_len() - 1
                                table = bm.get_block_table(seq)
                                assert p // bs < len(table), "a window wrote past its blocks"
                                pool.gpu[table[p // bs]][p % bs] = \
                                    prefix_hashes(seq.get_token_ids())[p]
                                stats["window_tokens"] += 1
                            seq.append_token_id(rng.randrange(VOCAB), -1.0)
                            if j + 1 < out.num_steps and ends(seq, params):
                                sched.free_seq(seq)
                                break
            for seq in group.get_seqs(SequenceStatus.RUNNING):
                ends(seq, params)
                if seq.is_finished():
                    sched.free_seq(seq)
            if group.is_finished():
                finish(group.request_id, "done")
        sched.free_finished_seq_groups()
        if rng.random() < cfg.abort_prob:
            live = [g for g in groups.values() if not g.is_finished()]
            if live:
                victim = rng.choice(live)
                sched.abort_seq_group(victim.request_id)
                assert victim.is_finished()
                finish(victim.request_id, "aborted")
        check_tables(sched, bm)
    else:
        pytest.fail("the simulation did not finish: starvation or livelock")

    assert set(finished) == {str(i) for i in range(len(cfg.requests))}, "a request was lost"
    ignored = {rid for rid, how in finished.items() if how == "ignored"}
    assert too_long - ignored <= {rid for rid, how in finished.items() if how == "aborted"}
    stats["ignored_for_size"] = len(ignored - too_long)
    assert admitted == sorted(admitted), f"admission not FCFS: {admitted}"
    assert bm.get_num_free_gpu_blocks() == bm.get_num_total_gpu_blocks()
    assert bm.get_num_free_cpu_blocks() == cfg.num_cpu_blocks
    assert all(bm.gpu_allocator.get_ref_count(b) == 0 for b in range(1, num_gpu))
    stats["swaps_out"] = sched.stats.num_swaps_out
    stats["swaps_in"] = sched.stats.num_swaps_in
    stats["recomputes"] = sched.stats.num_preemptions - sched.stats.num_swaps_out
    return stats


requests_st = st.lists(st.builds(
    Request,
    prompt_len=st.integers(1, 20),
    base=st.integers(0, 2),
    best_of=st.integers(1, MAX_BEST_OF),
    beam=st.booleans(),
    max_tokens=st.integers(1, 20),
    arrival_step=st.integers(0, 4),
), min_size=1, max_size=12).map(lambda rs: sorted(rs, key=lambda r: r.arrival_step))

sim_st = st.builds(
    SimConfig,
    block_size=st.sampled_from([1, 2, 4]),
    max_model_len=st.integers(10, 24),
    requests=requests_st,
    preemption_mode=st.sampled_from([None, "recompute", "swap"]),
    prefix_caching=st.booleans(),
    extra_gpu_blocks=st.integers(-8, 4),
    num_cpu_blocks=st.sampled_from([0, 4, 16, 64]),
    watermark=st.sampled_from([0.0, 0.05]),
    max_num_seqs=st.integers(MAX_BEST_OF, 12),
    seed=st.integers(0, 2**16),
    stop_prob=st.sampled_from([0.0, 0.02, 0.1]),
    fail_prob=st.sampled_from([0.0, 0.0, 0.15]),
    max_window=st.sampled_from([1, 4]),
    chunk_budget=st.sampled_from([None, None, 1, 3, 7]),
    chunk_cap=st.sampled_from([0, 0, 1, 2, 5]),
    between_window=st.sampled_from([0, 0, 1, 2, 4]),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sim_st)
def test_random_workloads_keep_invariants(cfg):
    run_sim(cfg)


def _busy(mode, prefix_caching, seed):
    rs = [Request(prompt_len=6 + i % 5, base=i % 3, best_of=1 + i % 3, beam=i % 4 == 1,
                  max_tokens=12, arrival_step=i // 4) for i in range(12)]
    return SimConfig(block_size=2, max_model_len=18, requests=rs, preemption_mode=mode,
                     prefix_caching=prefix_caching, extra_gpu_blocks=0, num_cpu_blocks=64,
                     watermark=0.0, max_num_seqs=8, seed=seed, stop_prob=0.02, abort_prob=0.0)


@pytest.mark.parametrize("prefix_caching", [False, True])
@pytest.mark.parametrize("mode", [None, "recompute", "swap"])
def test_tiny_pool_forces_preemption(mode, prefix_caching):
    totals = collections.Counter()
    for seed in range(3):
        totals.update(run_sim(_busy(mode, prefix_caching, seed)))
    assert totals["forks"] > 0
    if mode == "recompute":
        assert totals["recomputes"] > 0 and totals["swaps_out"] == 0
    elif mode == "swap":
        assert totals["swaps_out"] > 0 and totals["swaps_in"] == totals["swaps_out"]
    else:  # the paper's default: both kinds happen on this mixed workload
        assert totals["recomputes"] > 0 and totals["swaps_out"] > 0
    if prefix_caching:
        assert totals["cached_tokens"] > 0


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_failed_steps_roll_back_cleanly(prefix_caching):
    """A third of the steps fail: every request still ends, the reads stay
    exact (no cache hit on an unwritten block), the pools end empty."""
    totals = collections.Counter()
    for seed in range(3):
        cfg = _busy(None, prefix_caching, seed)
        cfg.fail_prob = 0.3
        totals.update(run_sim(cfg))
    assert totals["steps_done"] > 0 and totals["forks"] > 0
    if prefix_caching:
        assert totals["cached_tokens"] > 0


@pytest.mark.parametrize("mode", [None, "recompute", "swap"])
def test_decode_windows_reserve_and_preempt(mode):
    """Decode windows of up to 4 tokens on the busy workload: blocks are
    reserved ahead (checked at every step), the pool still forces
    preemption, every read stays exact."""
    totals = collections.Counter()
    for seed in range(3):
        cfg = _busy(mode, True, seed)
        cfg.max_window = 4
        cfg.requests = [dataclasses.replace(r, beam=False) for r in cfg.requests]
        totals.update(run_sim(cfg))
    assert totals["window_tokens"] > 0 and totals["preempted"] > 0


def test_recompute_when_host_pool_is_full():
    cfg = _busy("swap", False, 0)
    cfg.num_cpu_blocks = 0
    stats = run_sim(cfg)
    assert stats["swaps_out"] == 0 and stats["recomputes"] > 0


@pytest.mark.parametrize("mode", [None, "recompute", "swap"])
@pytest.mark.parametrize("budget", [1, 5])
def test_chunked_prefill_keeps_every_read_exact(mode, budget):
    """Chunked prefill on the busy workload (prompts of 6-10 tokens, steps
    of max(budget, max_num_seqs) = 8 tokens, decodes first): prompts
    split over steps, preemption in the middle of them, prefix caching and
    failed steps; every read stays exact and the pools end empty."""
    totals = collections.Counter()
    for seed in range(3):
        cfg = _busy(mode, True, seed)
        cfg.chunk_budget = budget
        cfg.fail_prob = 0.1
        totals.update(run_sim(cfg))
    assert totals["chunks"] > 0 and totals["preempted"] > 0 and totals["forks"] > 0
