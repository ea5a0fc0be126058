"""beam_search.replay_step (the host's replay of a device beam step) and
BlockSpaceManager.retable (the beams' new tables), host core only."""
import struct

import pytest

from jpaged import beam_search
from jpaged.beam_search import Hyp, replay_step
from jpaged.block_manager import BlockSpaceManager
from jpaged.sampling_params import SamplingParams
from jpaged.sequence import Sequence, SequenceGroup

EOS = frozenset({2})
BS = 4


def hyps(*cums, tables=None):
    tables = tables or [(10 + r, 20 + r) for r in range(len(cums))]
    return {r: Hyp(r, (), (), c, c, tuple(t)) for r, (c, t) in enumerate(zip(cums, tables))}


def test_packed_ids_and_float32_sums():
    assert beam_search.unpack((3 << beam_search.PARENT_SHIFT) | 12345) == (3, 12345)
    f32 = lambda x: struct.unpack("f", struct.pack("f", x))[0]  # noqa: E731
    a, b = -1.2345678, -0.000123
    assert beam_search.add32(a, b) == f32(f32(a) + f32(b)) != a + b


def test_ranks_take_the_continuing_proposals_in_order():
    sp = SamplingParams(n=2, use_beam_search=True, temperature=0.0, max_tokens=50)
    pool = []
    h = hyps(-1.0, -2.0)
    # best first; token 2 (EOS) ends its beam and joins the pool
    props = [(1, 7, -0.1), (0, 2, -0.5), (1, 8, -0.6), (0, 9, -2.0)]
    out, done = replay_step(h, props, 2, (5, 9), sp, EOS, 64, BS, pool)
    assert not done and sorted(out) == [0, 1]
    assert (out[0].origin, out[0].tokens, out[1].origin, out[1].tokens) == (1, (7,), 1, (8,))
    assert out[0].cumulative == pytest.approx(-2.1)
    # the new token is at position 9, in block 2: blocks before it come from the parent
    assert out[0].table == (11, 21) and out[1].table == (11, 21)
    out2, _ = replay_step({0: Hyp(0, (), (), -1.0, -1.0, (1, 2, 3)),
                           1: Hyp(1, (), (), -2.0, -2.0, (4, 5, 6))},
                          [(1, 7, -0.1), (1, 8, -0.2)], 2, (5, 9), sp, EOS, 64, BS, [])
    assert out2[0].table == (4, 5, 3) and out2[1].table == (4, 5, 6)  # block 2 stays its own
    [(score, (ended, how))] = pool
    assert how == "stop" and ended.tokens == (2,) and score == pytest.approx(-1.5 / 6)


def test_a_rank_without_a_continuing_proposal_ends():
    sp = SamplingParams(n=2, use_beam_search=True, temperature=0.0, max_tokens=50,
                        stop_token_ids=[5, 6])
    pool = []
    # three of the four best end (EOS and two stop ids): one rank continues
    props = [(1, 9, -0.1), (1, 2, -0.2), (1, 5, -0.3), (0, 6, -0.1)]
    out, done = replay_step(hyps(-3.0, -0.5), props, 2, (5, 9), sp, EOS, 64, BS, pool)
    assert not done and list(out) == [0] and out[0].origin == 1 and len(pool) == 2


def test_the_first_step_grows_the_group_and_length_ends_it():
    sp = SamplingParams(n=3, use_beam_search=True, temperature=0.0, max_tokens=2)
    props = [(0, 7, -0.1), (0, 8, -0.2), (0, 9, -0.3), (0, 4, -0.4), (0, 3, -0.5), (0, 1, -0.6)]
    out, done = replay_step(hyps(0.0), props, 3, (0, 4), sp, EOS, 64, BS, [], grow=True)
    assert not done and sorted(out) == [0, 1, 2]
    assert [out[r].tokens for r in range(3)] == [(7,), (8,), (9,)]
    assert all(h.origin == 0 and h.table == (10, 20) for h in out.values())
    pool = []
    out, done = replay_step(out, [(r, 5, -0.1 * r) for r in range(3)] * 2, 3, (1, 5), sp, EOS,
                            64, BS, pool)
    assert done and out == {} and len(pool) == 3  # max_tokens: every proposal ends


def test_early_stopping_ends_once_the_pool_is_full():
    sp = SamplingParams(n=2, use_beam_search=True, temperature=0.0, max_tokens=50,
                        early_stopping=True)
    pool = [(-0.1, "earlier")]
    out, done = replay_step(hyps(-1.0, -2.0), [(0, 2, -0.1), (1, 7, -0.2), (0, 8, -0.3),
                                               (1, 9, -0.4)], 2, (5, 9), sp, EOS, 64, BS, pool)
    assert done and len(pool) == 2 and pool[0] == (-0.1, "earlier")


def test_retable_moves_refcounts_and_frees_what_no_table_holds():
    bm = BlockSpaceManager(BS, 16, 0)
    seqs = [Sequence(i, None, list(range(1, 10)), BS) for i in range(2)]
    g = SequenceGroup("g", seqs[:1], SamplingParams(), 0.0)
    bm.allocate(g)
    bm.fork(seqs[0], seqs[1])
    for s in seqs:
        bm.append_slots(s, 4)  # private last blocks and a window's blocks
    t0, t1 = bm.get_block_table(seqs[0]), bm.get_block_table(seqs[1])
    free = bm.get_num_free_gpu_blocks()
    # both beams continue beam 1's history: beam 0 takes its first three blocks
    bm.retable({0: t1[:3] + t0[3:]})
    bm.check_invariants()
    assert bm.get_block_table(seqs[0]) == t1[:3] + t0[3:]
    assert bm.get_num_free_gpu_blocks() == free + 1  # beam 0's own third block
    bm.free(seqs[0])
    bm.free(seqs[1])
    bm.check_invariants()
    assert bm.get_num_free_gpu_blocks() == bm.get_num_total_gpu_blocks()
