import itertools

import pytest

from jpaged.block_manager import BlockSpaceManager
from jpaged.config import CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig
from jpaged.sampling_params import SamplingParams
from jpaged.scheduler import Scheduler
from jpaged.sequence import Sequence, SequenceGroup, SequenceStatus as S

BS = 4


class Harness:
    def __init__(self, num_gpu_blocks, num_cpu_blocks=16, watermark=0.0, prefix_caching=False, **cfg):
        cfg.setdefault("max_model_len", 32)
        cfg.setdefault("max_num_batched_tokens", 64)
        cfg.setdefault("max_num_seqs", 8)
        cfg.setdefault("preemption_mode", None)
        cfg.setdefault("enable_chunked_prefill", False)
        cfg.setdefault("long_prefill_token_threshold", 0)
        cfg.setdefault("decode_window_between_chunks", 0)
        self.bm = BlockSpaceManager(BS, num_gpu_blocks, num_cpu_blocks, watermark=watermark,
                                    enable_prefix_caching=prefix_caching)
        self.sched = Scheduler(SchedulerConfig(**cfg), self.bm)
        self.ids = itertools.count()

    def add(self, rid, prompt_len, params=None, token=0):
        seq = Sequence(next(self.ids), None, [token] * prompt_len, BS)
        g = SequenceGroup(rid, [seq], params or SamplingParams(), 0.0)
        self.sched.add_seq_group(g)
        return g

    def step(self):
        """Schedules, then appends one token to every running sequence (forking
        a group with best_of > 1 after its prompt, as the engine does)."""
        out = self.sched.schedule()
        self.bm.check_invariants()
        for sg in out.scheduled_seq_groups:
            self.sched.mark_computed(sg)  # the step ran
            g = sg.seq_group
            running = g.get_seqs(S.RUNNING)
            if out.is_prefill and g.num_seqs() < g.sampling_params.actual_best_of:
                for _ in range(g.sampling_params.actual_best_of - 1):
                    child = running[0].fork(next(self.ids))
                    child.append_token_id(1, 0.0)
                    g.add(child)
                    self.sched.fork_seq(running[0], child)
            for seq in running:
                seq.append_token_id(2, 0.0)
        return out

    @staticmethod
    def ids_of(out):
        return [sg.seq_group.request_id for sg in out.scheduled_seq_groups]


def test_prefills_first_then_decodes_fcfs():
    h = Harness(32)
    h.add("a", 5)
    h.add("b", 3)
    out = h.step()
    assert out.is_prefill and h.ids_of(out) == ["a", "b"] and out.num_batched_tokens == 8
    assert [sg.token_chunk_size for sg in out.scheduled_seq_groups] == [5, 3]
    h.add("c", 2)
    out = h.step()
    assert out.is_prefill and h.ids_of(out) == ["c"]
    out = h.step()
    assert not out.is_prefill and h.ids_of(out) == ["a", "b", "c"] and out.num_batched_tokens == 3
    assert all(sg.num_new_tokens == {s.seq_id: 1 for s in sg.seq_group.get_seqs()}
               for sg in out.scheduled_seq_groups)
    g = out.scheduled_seq_groups[0].seq_group
    assert g.first_scheduled_time is not None and g.get_seqs()[0].num_computed_tokens == 6


def test_token_and_sequence_budgets_stop_admission_in_order():
    h = Harness(64, max_num_batched_tokens=10, max_model_len=10, max_num_seqs=4)
    h.add("a", 6)
    h.add("b", 6)
    h.add("c", 1)
    out = h.step()
    assert h.ids_of(out) == ["a"]            # b does not fit the token budget; c waits behind it
    out = h.step()
    assert h.ids_of(out) == ["b", "c"]
    h.add("d", 1, SamplingParams(n=2, best_of=2))
    out = h.step()
    assert h.ids_of(out) == ["a", "b", "c"] and not out.is_prefill   # d reserves 2 of 4 seqs: 3 + 2 > 4


def test_impossible_requests_are_ignored_and_do_not_block():
    h = Harness(5, max_model_len=32, max_num_batched_tokens=64, max_num_seqs=2)  # 4 usable blocks
    h.add("long", 33)
    h.add("huge", 17)
    h.add("wide", 2, SamplingParams(n=3, best_of=3))
    h.add("ok", 4)
    out = h.step()
    assert h.ids_of(out) == ["ok"] and out.is_prefill
    reasons = {g.request_id: r for g, r in out.ignored_seq_groups}
    assert "max_model_len (32)" in reasons["long"]
    assert "more KV cache blocks than the pool holds (4 blocks" in reasons["huge"]
    assert "max_num_seqs (2)" in reasons["wide"]
    for g, _ in out.ignored_seq_groups:
        assert g.is_finished() and g.get_seqs()[0].status == S.FINISHED_IGNORED
    assert len(h.sched.waiting) + len(h.sched.running) + len(h.sched.swapped) == 1


def test_recompute_preemption_of_the_newest_group():
    h = Harness(5, preemption_mode=None,
                        enable_chunked_prefill=False, long_prefill_token_threshold=0,
                        decode_window_between_chunks=0)   # 4 usable blocks
    a = h.add("a", 4)
    b = h.add("b", 4)
    h.step()                                # prefill a, b: 2 blocks
    h.step()                                # decode: each needs a 2nd block: 4 used
    for _ in range(3):
        h.step()
    out = h.step()                          # both need a 3rd block: b is preempted
    assert out.preempted == 1 and h.ids_of(out) == ["a"] and h.sched.stats.num_preemptions == 1
    assert h.sched.stats.num_swaps_out == 0 and not out.blocks_to_swap_out
    sb = b.get_seqs()[0]
    assert sb.status == S.WAITING and sb.num_computed_tokens == 0 and not h.bm.has_block_table(sb)
    assert h.sched.waiting == [b]
    h.add("c", 1)
    assert h.sched.waiting == [b, h.sched.waiting[1]]   # b keeps its place ahead of newer requests
    # a finishes; b is re-prefilled with its prompt and generated tokens.
    a.get_seqs()[0].status = S.FINISHED_STOPPED
    h.sched.free_seq(a.get_seqs()[0])
    out = h.step()
    assert out.is_prefill and h.ids_of(out)[0] == "b"
    assert out.scheduled_seq_groups[0].num_new_tokens == {sb.seq_id: 9}


def test_swap_preemption_of_a_multi_sequence_group_blocks_admission():
    h = Harness(9, num_cpu_blocks=16)        # 8 usable blocks
    a = h.add("a", 4)
    b = h.add("b", 3, SamplingParams(n=2, best_of=2))
    h.step()                        # prefill; b forks into 2 sequences
    out = h.step()
    assert len(out.blocks_to_copy) == 1      # b's shared last block: copy-on-write
    preempted = None
    for _ in range(12):
        out = h.step()
        if out.preempted:
            preempted = out
            break
    assert preempted is not None and preempted.blocks_to_swap_out and h.sched.stats.num_swaps_out == 1
    assert all(s.status == S.SWAPPED for s in b.get_seqs()) and h.sched.swapped == [b]
    gpu_blocks = [gb for gb, _ in preempted.blocks_to_swap_out]
    assert len(gpu_blocks) == len(set(gpu_blocks))
    h.add("c", 1)
    out = h.step()
    assert not out.is_prefill and "c" not in h.ids_of(out)   # nothing admitted while b is out
    a.get_seqs()[0].status = S.FINISHED_STOPPED
    h.sched.free_seq(a.get_seqs()[0])
    out = h.step()
    assert out.blocks_to_swap_in and not out.blocks_to_swap_out and h.ids_of(out) == ["b"]
    assert h.sched.stats.num_swaps_in == 1 and all(s.status == S.RUNNING for s in b.get_seqs())
    assert {c for c, _ in out.blocks_to_swap_in} == {c for _, c in preempted.blocks_to_swap_out}
    out = h.step()
    assert out.is_prefill and h.ids_of(out) == ["c"]


def test_swap_falls_back_to_recompute_when_the_host_pool_is_full():
    h = Harness(9, num_cpu_blocks=1, preemption_mode="swap")
    h.add("a", 4)
    b = h.add("b", 3, SamplingParams(n=2, best_of=2))
    h.step()
    for _ in range(12):
        out = h.step()
        if out.preempted:
            break
    assert out.preempted == 1 and not out.blocks_to_swap_out and h.sched.stats.num_swaps_out == 0
    assert all(s.status == S.WAITING for s in b.get_seqs())


def test_recompute_of_a_multi_sequence_group_reprefills_each_sequence():
    h = Harness(9, preemption_mode="recompute")
    a = h.add("a", 4)
    b = h.add("b", 5, SamplingParams(n=2, best_of=2))
    h.step()
    for _ in range(12):
        out = h.step()
        if out.preempted:
            break
    assert out.preempted == 1 and h.sched.waiting == [b]
    seqs = b.get_seqs()
    assert all(s.status == S.WAITING and s.num_computed_tokens == 0 for s in seqs)
    lens = {s.seq_id: s.get_len() for s in seqs}
    a.get_seqs()[0].status = S.FINISHED_LENGTH_CAPPED
    h.sched.free_seq(a.get_seqs()[0])
    out = h.step()
    assert out.is_prefill and h.ids_of(out) == ["b"]
    sg = out.scheduled_seq_groups[0]
    assert sg.num_new_tokens == lens and sg.token_chunk_size == sum(lens.values())
    t0, t1 = (h.bm.get_block_table(s) for s in seqs)
    assert t0[0] == t1[0]    # the common full prompt block is shared again


def test_a_recomputed_group_larger_than_a_step_prefills_over_steps():
    """Without chunked prefill, a recomputed group of 4 sequences x 10 tokens
    (40 > the 16-token budget) is prefilled in chunks of at most 16 over
    three steps, before anything else runs (a waiting prompt waits); each
    sequence leaves its last token to the group's first decode step, so the
    4 rows decode together."""
    h = Harness(12, preemption_mode="recompute", max_model_len=16, max_num_batched_tokens=16)
    a = h.add("a", 4)
    b = h.add("b", 5, SamplingParams(n=4, best_of=4))
    h.step()
    for _ in range(12):
        if h.step().preempted:
            break
    assert h.sched.waiting == [b] and [s.get_len() for s in b.get_seqs()] == [10] * 4
    a.get_seqs()[0].status = S.FINISHED_LENGTH_CAPPED
    h.sched.free_seq(a.get_seqs()[0])
    chunks = []
    for _ in range(3):
        out = h.sched.schedule()
        h.bm.check_invariants()
        assert out.is_prefill and h.ids_of(out) == ["b"] and out.num_batched_tokens <= 16
        chunks.append([out.scheduled_seq_groups[0].num_new_tokens.get(s.seq_id, 0)
                       for s in b.get_seqs()])
        if len(chunks) == 1:
            h.add("c", 3)  # arrives while b's prefill is under way: it waits
        h.sched.mark_computed(out.scheduled_seq_groups[0])
    # sequence by sequence, 9 tokens each (the 10th is the decode's)
    assert chunks == [[9, 7, 0, 0], [0, 2, 9, 5], [0, 0, 0, 4]]
    assert [s.num_computed_tokens for s in b.get_seqs()] == [9] * 4
    out = h.sched.schedule()
    assert h.ids_of(out) == ["c"] and out.is_prefill  # prefills first, as always
    out = h.sched.schedule()
    assert not out.is_prefill and sorted(h.ids_of(out)) == ["b", "c"]
    sg = next(g for g in out.scheduled_seq_groups if g.seq_group is b)
    assert sg.num_new_tokens == {s.seq_id: 1 for s in b.get_seqs()}


def test_a_group_that_outgrows_the_pool_alone_is_rejected():
    h = Harness(3, max_model_len=32)   # 2 usable blocks: 8 tokens
    g = h.add("a", 7)
    h.step()
    h.step()      # 8 tokens: fits
    out = h.step()  # 9 tokens: cannot grow, nothing to preempt
    assert h.ids_of(out) == [] and [x.request_id for x, _ in out.ignored_seq_groups] == ["a"]
    assert "outgrew the KV cache" in out.ignored_seq_groups[0][1]
    assert g.is_finished() and h.bm.get_num_free_gpu_blocks() == 2 and not h.sched.has_unfinished_seqs()


def test_abort_from_every_queue_frees_blocks():
    h = Harness(9, num_cpu_blocks=16)
    a = h.add("a", 4)
    b = h.add("b", 3, SamplingParams(n=2, best_of=2))
    h.step()
    for _ in range(12):
        if h.step().preempted:
            break
    assert h.sched.swapped == [b]
    c = h.add("c", 2)
    h.sched.abort_seq_group(["b", "c", "unknown"])
    h.sched.abort_seq_group("a")
    for g in (a, b, c):
        assert g.is_finished() and all(s.status == S.FINISHED_ABORTED for s in g.get_seqs())
    assert not h.sched.has_unfinished_seqs()
    assert h.bm.get_num_free_gpu_blocks() == 8 and h.bm.get_num_free_cpu_blocks() == 16
    h.bm.check_invariants()


def test_finished_groups_are_dropped_and_duplicates_rejected():
    h = Harness(16)
    g = h.add("a", 3)
    h.step()
    with pytest.raises(ValueError, match="already scheduled"):
        h.sched.add_seq_group(SequenceGroup("a", [Sequence(99, None, [1], BS)], SamplingParams(), 0.0))
    g.get_seqs()[0].status = S.FINISHED_STOPPED
    h.sched.free_finished_seq_groups()
    assert not h.sched.has_unfinished_seqs() and g.finished_time is not None
    assert h.bm.get_num_free_gpu_blocks() == 15


def test_prefix_cache_hits_reduce_prefill_tokens():
    h = Harness(32, prefix_caching=True)
    h.add("a", 10)
    h.step()
    h.add("b", 10)
    h.add("c", 10)
    out = h.step()
    assert [sg.token_chunk_size for sg in out.scheduled_seq_groups] == [2, 2]   # 8 of 10 cached


def test_scheduler_config_validation():
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(8\) must be >= max_model_len \(16\)"):
        SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=8, max_model_len=16, preemption_mode=None,
                        enable_chunked_prefill=False, long_prefill_token_threshold=0,
                        decode_window_between_chunks=0)
    with pytest.raises(ValueError, match=r"must be >= max_num_seqs \(64\)"):
        SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=32, max_model_len=16, preemption_mode=None,
                        enable_chunked_prefill=False, long_prefill_token_threshold=0,
                        decode_window_between_chunks=0)
    with pytest.raises(ValueError, match="preemption_mode must be one of"):
        SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=16,
                        preemption_mode="drop", enable_chunked_prefill=False,
                        long_prefill_token_threshold=0, decode_window_between_chunks=0)


def test_engine_config_defaults_and_resolution():
    c = EngineConfig()
    assert (c.model, c.dtype, c.block_size, c.max_num_seqs, c.preemption_mode) == ("smollm2-135m", "auto", 16,
                                                                                 256, None)
    s = c.get_scheduler_config(8192)
    # chunked prefill (the default): the budget need not hold a whole prompt
    assert c.enable_chunked_prefill and s.enable_chunked_prefill
    assert (s.max_model_len, s.max_num_batched_tokens, s.max_num_seqs) == (8192, 2048, 256)
    assert EngineConfig(max_num_batched_tokens=1024).get_scheduler_config(2048) \
        .max_num_batched_tokens == 1024
    s = EngineConfig(enable_chunked_prefill=False).get_scheduler_config(8192)
    assert (s.max_model_len, s.max_num_batched_tokens, s.enable_chunked_prefill) == (8192, 8192, False)
    assert EngineConfig(max_model_len=512).get_scheduler_config(8192).max_num_batched_tokens == 2048
    # decode windows between a long prompt's chunks: 16 steps, at most max_decode_window,
    # none without chunked prefill
    assert c.decode_window_between_chunks == 16
    assert c.get_scheduler_config(8192).decode_window_between_chunks == 16
    assert EngineConfig(max_decode_window=4).get_scheduler_config(8192) \
        .decode_window_between_chunks == 4
    assert s.decode_window_between_chunks == 0
    with pytest.raises(ValueError, match="exceeds the model's maximum context length"):
        EngineConfig(max_model_len=9000).get_scheduler_config(8192)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        EngineConfig(max_num_batched_tokens=1024,
                     enable_chunked_prefill=False).get_scheduler_config(2048)
    with pytest.raises(ValueError, match="must be >= max_num_seqs"):
        EngineConfig(max_num_batched_tokens=128).get_scheduler_config(2048)
    # The sub-configs the components take whole carry the engine's values.
    c = EngineConfig(block_size=8, swap_space=1.5, enable_prefix_caching=True, watermark=0.1,
                     num_gpu_blocks=40, gpu_memory_utilization=0.5, tensor_parallel_size=2,
                     data_parallel_size=3)
    assert c.cache_config() == CacheConfig(block_size=8, num_gpu_blocks=40,
                                           gpu_memory_utilization=0.5, swap_space=1.5,
                                           enable_prefix_caching=True, watermark=0.1)
    assert c.parallel_config() == ParallelConfig(tensor_parallel_size=2, data_parallel_size=3)


@pytest.mark.parametrize("kwargs, match", [
    (dict(model=""), "model must be a non-empty string"),
    (dict(dtype="int8"), "dtype must be one of"),
    (dict(block_size=12), r"block_size must be a power of two in \[1, 256\]"),
    (dict(block_size=512), r"block_size must be a power of two in \[1, 256\]"),
    (dict(max_num_seqs=0), "max_num_seqs must be an int >= 1"),
    (dict(max_num_batched_tokens=0), "max_num_batched_tokens must be an int >= 1 or None"),
    (dict(max_model_len=0), "max_model_len must be an int >= 1 or None"),
    (dict(num_gpu_blocks=1), "num_gpu_blocks must be an int >= 2 or None"),
    (dict(gpu_memory_utilization=0.0), r"gpu_memory_utilization must be in \(0, 1\]"),
    (dict(gpu_memory_utilization=1.5), r"gpu_memory_utilization must be in \(0, 1\]"),
    (dict(swap_space=-1), "swap_space must be a number of GiB >= 0"),
    (dict(preemption_mode="evict"), "preemption_mode must be one of"),
    (dict(enable_prefix_caching=1), "enable_prefix_caching must be a bool"),
    (dict(watermark=1.0), r"watermark must be in \[0, 1\)"),
    (dict(seed=-3), "seed must be an int >= 0"),
    (dict(tensor_parallel_size=0), "tensor_parallel_size must be an int >= 1"),
    (dict(data_parallel_size=0), "data_parallel_size must be an int >= 1, got 0"),
    (dict(data_parallel_size=2.0), "data_parallel_size must be an int >= 1, got 2.0"),
    (dict(attention_backend="cuda"), "attention_backend must be one of"),
    (dict(max_model_len=4096, max_num_batched_tokens=2048, enable_chunked_prefill=False),
     r"max_num_batched_tokens \(2048\) must be >="),
    (dict(max_num_seqs=256, max_num_batched_tokens=128), r"must be >= max_num_seqs \(256\)"),
    (dict(enable_chunked_prefill=1), "enable_chunked_prefill must be a bool"),
    (dict(long_prefill_token_threshold=-1), "long_prefill_token_threshold must be an int >= 0"),
    (dict(long_prefill_token_threshold=True), "long_prefill_token_threshold must be an int >= 0"),
    (dict(long_prefill_token_threshold=64, enable_chunked_prefill=False),
     r"long_prefill_token_threshold \(64\) caps the chunks of chunked prefill: it needs "
     "enable_chunked_prefill"),
    (dict(decode_window_between_chunks=3), "decode_window_between_chunks must be 0 or a power "
     "of two, got 3"),
    (dict(decode_window_between_chunks=-2), "decode_window_between_chunks must be 0 or a power"),
])
def test_engine_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(**kwargs)
