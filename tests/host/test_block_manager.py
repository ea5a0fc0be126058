import pytest

from jpaged.block_manager import AllocStatus, BlockSpaceManager
from jpaged.sampling_params import SamplingParams
from jpaged.sequence import Sequence, SequenceGroup, SequenceStatus as S

BS = 4


def group(rid, *prompts, seq_id=0, params=None):
    seqs = [Sequence(seq_id + i, None, list(p), BS) for i, p in enumerate(prompts)]
    return SequenceGroup(rid, seqs, params or SamplingParams(), 0.0)


def admit(bm, g):
    """Allocate as the scheduler does, and pretend the prefill ran."""
    assert bm.can_allocate(g) == AllocStatus.OK
    bm.allocate(g)
    for s in g.get_seqs(S.WAITING):
        s.status = S.RUNNING
        s.num_computed_tokens = s.get_len()
    bm.mark_blocks_as_computed(g)
    bm.check_invariants()


def test_allocate_and_free_a_prompt():
    bm = BlockSpaceManager(BS, 8, 4, watermark=0.0)
    g = group("a", range(10))
    admit(bm, g)
    seq = g.get_seqs()[0]
    table = bm.get_block_table(seq)
    assert len(table) == 3 and 0 not in table
    assert all(bm.gpu_allocator.get_ref_count(b) == 1 for b in table)
    assert bm.get_num_free_gpu_blocks() == 7 - 3
    bm.free(seq)
    bm.free(seq)  # freeing twice is a no-op
    assert bm.get_num_free_gpu_blocks() == 7 and not bm.has_block_table(seq)
    bm.check_invariants()


def test_waiting_seqs_of_a_group_share_the_prompt():
    bm = BlockSpaceManager(BS, 8, 4, watermark=0.0)
    g = group("a", range(6), range(6), range(6))
    admit(bm, g)
    tables = [bm.get_block_table(s) for s in g.get_seqs()]
    assert tables[0] == tables[1] == tables[2]
    assert bm.get_block_usage() == (6, 2)
    assert [bm.gpu_allocator.get_ref_count(b) for b in tables[0]] == [3, 3]


def test_append_at_block_boundary_allocates_without_copy():
    bm = BlockSpaceManager(BS, 8, 4, watermark=0.0)
    g = group("a", range(4))
    admit(bm, g)
    seq = g.get_seqs()[0]
    seq.append_token_id(9, 0.0)
    assert bm.can_append_slots(g)
    assert bm.append_slots(seq) == []
    assert len(bm.get_block_table(seq)) == 2
    seq.append_token_id(9, 0.0)
    assert bm.append_slots(seq) == [] and len(bm.get_block_table(seq)) == 2


def test_fork_then_copy_on_write_of_the_shared_last_block():
    bm = BlockSpaceManager(BS, 8, 4, watermark=0.0)
    g = group("a", range(6))
    admit(bm, g)
    parent = g.get_seqs()[0]
    child = parent.fork(1)
    g.add(child)
    bm.fork(parent, child)
    shared = bm.get_block_table(parent)
    assert bm.get_block_table(child) == shared
    assert [bm.gpu_allocator.get_ref_count(b) for b in shared] == [2, 2]
    parent.append_token_id(7, 0.0)
    child.append_token_id(8, 0.0)
    free_before = bm.get_num_free_gpu_blocks()
    assert bm.can_append_slots(g)
    copies = bm.append_slots(parent)
    assert len(copies) == 1
    src, dst = copies[0]
    assert src == shared[1] and dst not in shared
    assert bm.get_block_table(parent) == [shared[0], dst]
    assert bm.append_slots(child) == []  # the last holder writes in place
    assert bm.get_block_table(child) == shared
    assert bm.gpu_allocator.get_ref_count(shared[0]) == 2
    assert bm.gpu_allocator.get_ref_count(shared[1]) == 1
    assert bm.get_num_free_gpu_blocks() == free_before - 1
    bm.check_invariants()
    for s in (parent, child):
        bm.free(s)
    assert bm.get_num_free_gpu_blocks() == 7


def test_cannot_append_when_full_and_unchecked_append_is_reported():
    bm = BlockSpaceManager(BS, 3, 0, watermark=0.0)   # 2 usable blocks
    g = group("a", range(8))
    admit(bm, g)
    seq = g.get_seqs()[0]
    seq.append_token_id(1, 0.0)
    assert not bm.can_append_slots(g)
    with pytest.raises(RuntimeError, match="call can_append_slots"):
        bm.append_slots(seq)


def test_can_allocate_never_later_ok_and_watermark():
    bm = BlockSpaceManager(BS, 11, 0, watermark=0.2)   # 10 usable, watermark 2 blocks
    assert bm.can_allocate(group("big", range(41))) == AllocStatus.NEVER
    # An idle pool admits a prompt that uses every block, watermark or not.
    assert bm.can_allocate(group("all", range(40))) == AllocStatus.OK
    admit(bm, group("a", range(24), seq_id=0))              # 6 blocks, 4 left
    assert bm.can_allocate(group("b", range(8), seq_id=5)) == AllocStatus.OK      # leaves 2
    assert bm.can_allocate(group("c", range(9), seq_id=5)) == AllocStatus.LATER   # would leave 1
    assert not bm.can_allocate(group("c", range(9), seq_id=5))
    with pytest.raises(RuntimeError, match="already has a block table"):
        bm.allocate(group("dup", range(3), seq_id=0))


def test_recomputed_group_gets_each_sequence_its_own_table():
    bm = BlockSpaceManager(BS, 16, 0, watermark=0.0)
    prompt = list(range(5))
    g = group("a", prompt, prompt)
    a, b = g.get_seqs()
    for s, toks in ((a, [1, 2, 3, 4]), (b, [5, 6])):
        for t in toks:
            s.append_token_id(t, 0.0)
    bm.allocate(g)   # both WAITING after a recompute preemption
    ta, tb = bm.get_block_table(a), bm.get_block_table(b)
    assert len(ta) == 3 and len(tb) == 2
    assert ta[0] == tb[0] and bm.gpu_allocator.get_ref_count(ta[0]) == 2   # the common full block
    assert ta[1] != tb[1]
    bm.check_invariants()


def test_swap_out_and_in_round_trip_keeps_sharing():
    bm = BlockSpaceManager(BS, 10, 6, watermark=0.0)
    g = group("a", range(6))
    admit(bm, g)
    parent = g.get_seqs()[0]
    child = parent.fork(1)
    g.add(child)
    bm.fork(parent, child)
    child.append_token_id(3, 0.0)
    bm.append_slots(child)
    assert bm.can_swap_out(g)
    gpu_tables = {s.seq_id: bm.get_block_table(s) for s in g.get_seqs()}
    out = bm.swap_out(g)
    assert len(out) == 3   # shared block 0 once, two private last blocks
    assert {gb for gb, _ in out} == set(gpu_tables[0]) | set(gpu_tables[1])
    for s in g.get_seqs():
        s.status = S.SWAPPED
    assert bm.get_num_free_gpu_blocks() == 9 and bm.get_num_free_cpu_blocks() == 3
    cpu_tables = {s.seq_id: bm.get_cpu_block_table(s) for s in g.get_seqs()}
    gpu_to_cpu = dict(out)
    for sid, t in gpu_tables.items():
        assert cpu_tables[sid] == [gpu_to_cpu[b] for b in t]
    assert bm.cpu_allocator.get_ref_count(cpu_tables[0][0]) == 2
    bm.check_invariants()
    assert bm.can_swap_in(g) == AllocStatus.OK
    back = bm.swap_in(g)
    for s in g.get_seqs():
        s.status = S.RUNNING
    cpu_to_gpu = dict(back)
    assert len(back) == 3 and set(cpu_to_gpu) == set(gpu_to_cpu.values())
    for sid, t in cpu_tables.items():
        assert bm.get_block_table(g.seqs_dict[sid]) == [cpu_to_gpu[b] for b in t]
    assert bm.gpu_allocator.get_ref_count(cpu_to_gpu[cpu_tables[0][0]]) == 2
    assert bm.get_num_free_cpu_blocks() == 6
    bm.check_invariants()


def test_swap_is_all_or_nothing():
    bm = BlockSpaceManager(BS, 10, 2, watermark=0.0)
    g = group("a", range(12))   # 3 blocks, host pool holds 2
    admit(bm, g)
    assert not bm.can_swap_out(g)
    with pytest.raises(RuntimeError, match="can_swap_out"):
        bm.swap_out(g)
    assert bm.get_num_free_cpu_blocks() == 2 and len(bm.get_block_table(g.get_seqs()[0])) == 3
    bm.check_invariants()


def test_swap_in_never_when_the_group_outgrew_the_pool():
    bm = BlockSpaceManager(BS, 4, 8, watermark=0.0)   # 3 usable
    g = group("a", range(12))
    admit(bm, g)
    bm.swap_out(g)
    seq = g.get_seqs()[0]
    seq.status = S.SWAPPED
    seq.append_token_id(1, 0.0)   # needs a 4th block after swap-in
    assert bm.can_swap_in(g) == AllocStatus.NEVER


def test_prefix_cache_hits_only_computed_full_blocks():
    bm = BlockSpaceManager(BS, 16, 0, watermark=0.0, enable_prefix_caching=True)
    a = group("a", range(10), seq_id=0)
    admit(bm, a)
    b = group("b", list(range(9)) + [99], seq_id=1)
    admit(bm, b)
    sa, sb = a.get_seqs()[0], b.get_seqs()[0]
    assert bm.get_num_cached_tokens(sb) == 8
    ta, tb = bm.get_block_table(sa), bm.get_block_table(sb)
    assert tb[:2] == ta[:2] and tb[2] != ta[2]
    assert [bm.gpu_allocator.get_ref_count(x) for x in ta] == [2, 2, 1]


def test_block_of_the_last_prompt_token_is_never_a_hit():
    bm = BlockSpaceManager(BS, 16, 0, watermark=0.0, enable_prefix_caching=True)
    admit(bm, group("a", range(8), seq_id=0))
    b = group("b", range(8), seq_id=1)
    bm.allocate(b)
    assert bm.get_num_cached_tokens(b.get_seqs()[0]) == 4   # (8 - 1) // 4 blocks


def test_uncomputed_blocks_give_no_hits():
    bm = BlockSpaceManager(BS, 16, 0, watermark=0.0, enable_prefix_caching=True)
    a = group("a", range(10), seq_id=0)
    bm.allocate(a)   # admitted in this step, not computed yet
    b = group("b", range(10), seq_id=1)
    bm.allocate(b)
    assert bm.get_num_cached_tokens(b.get_seqs()[0]) == 0
    assert set(bm.get_block_table(a.get_seqs()[0])).isdisjoint(bm.get_block_table(b.get_seqs()[0]))


def test_freed_blocks_stay_cached_and_revive():
    bm = BlockSpaceManager(BS, 6, 0, watermark=0.0, enable_prefix_caching=True)
    a = group("a", range(10), seq_id=0)
    admit(bm, a)
    old = bm.get_block_table(a.get_seqs()[0])
    bm.free(a.get_seqs()[0])
    assert bm.get_num_free_gpu_blocks() == 5   # cached blocks count as free
    b = group("b", range(10), seq_id=1)
    assert bm.can_allocate(b) == AllocStatus.OK
    bm.allocate(b)
    sb = b.get_seqs()[0]
    assert bm.get_num_cached_tokens(sb) == 8 and bm.get_block_table(sb)[:2] == old[:2]
    bm.check_invariants()


def test_eviction_is_least_recently_used_and_tail_first():
    bm = BlockSpaceManager(BS, 6, 0, watermark=0.0, enable_prefix_caching=True)   # 5 usable
    a = group("a", range(8), seq_id=0)
    admit(bm, a)
    c = group("c", range(100, 108), seq_id=1)
    admit(bm, c)
    ta, tc = bm.get_block_table(a.get_seqs()[0]), bm.get_block_table(c.get_seqs()[0])
    bm.free(a.get_seqs()[0])
    bm.free(c.get_seqs()[0])
    # One plain free block, then evictions: a's blocks (freed first) tail first.
    order = [bm.gpu_allocator.allocate() for _ in range(5)]
    assert order[1:] == [ta[1], ta[0], tc[1], tc[0]]


def test_caching_off_prompt_logprobs_and_reset_give_no_hits():
    for kwargs in (dict(enable_prefix_caching=False), dict(enable_prefix_caching=True)):
        bm = BlockSpaceManager(BS, 16, 0, watermark=0.0, **kwargs)
        admit(bm, group("a", range(10), seq_id=0))
        hit = group("b", range(10), seq_id=1)
        bm.allocate(hit)
        assert bm.get_num_cached_tokens(hit.get_seqs()[0]) == (8 if kwargs["enable_prefix_caching"] else 0)
    bm = BlockSpaceManager(BS, 16, 0, watermark=0.0, enable_prefix_caching=True)
    admit(bm, group("a", range(10), seq_id=0))
    logp = group("b", range(10), seq_id=1, params=SamplingParams(prompt_logprobs=1))
    bm.allocate(logp)
    assert bm.get_num_cached_tokens(logp.get_seqs()[0]) == 0
    assert bm.reset_prefix_cache()
    late = group("c", range(10), seq_id=2)
    bm.allocate(late)
    assert bm.get_num_cached_tokens(late.get_seqs()[0]) == 0
    bm.check_invariants()


def test_check_invariants_catches_corruption():
    bm = BlockSpaceManager(BS, 8, 2, watermark=0.0)
    g = group("a", range(6))
    admit(bm, g)
    bm.gpu_allocator.incref(bm.get_block_table(g.get_seqs()[0])[0])   # a reference no table holds
    with pytest.raises(AssertionError, match="refcount 2 but held by 1"):
        bm.check_invariants()


def test_bad_arguments():
    with pytest.raises(ValueError, match="watermark"):
        BlockSpaceManager(BS, 8, 2, watermark=1.0)
    with pytest.raises(ValueError, match="num_gpu_blocks"):
        BlockSpaceManager(BS, 1, 2)


def test_can_append_slots_all_adds_the_groups_costs():
    """Three single-sequence groups of 5 tokens fill 6 of 7 usable blocks; a
    sixth token lands in each one's second block (cost 0), a ninth needs a
    new block each (cost 3 > 1 free), whatever each group alone could do."""
    bm = BlockSpaceManager(BS, 8, 4, watermark=0.0)
    groups = [group(str(i), range(5), seq_id=i) for i in range(3)]
    for g in groups:
        admit(bm, g)
    assert bm.get_num_free_gpu_blocks() == 1
    for g in groups:
        g.get_seqs()[0].append_token_id(7, 0.0)
    # more sequences than free blocks, but none needs a block: the exact count
    assert bm.can_append_slots_all(groups)
    for g in groups:  # tokens 7, 8, 9: the ninth needs a third block
        for _ in range(3):
            g.get_seqs()[0].append_token_id(7, 0.0)
    assert all(bm.can_append_slots(g) for g in groups)  # each alone: 1 block, 1 free
    assert not bm.can_append_slots_all(groups)
    assert bm.can_append_slots_all(groups[:1])
