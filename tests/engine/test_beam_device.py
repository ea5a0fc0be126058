"""device_batch's beam step on hand-made inputs: which proposals a group
keeps, which rank takes which, a rank that ends, and the adoption of
another rank's history (table entries and the partly written block)."""
import dataclasses

import jax.numpy as jnp
import numpy as np

from jpaged import beam_search, device_batch

S, MB, V, C = 6, 4, 32, 2 * device_batch.BEAM_MAX


def state_with(groups, positions, max_len=50, stop=()):
    """groups: {slot: (group, rank, width, cum)}; every other slot is no beam."""
    st = device_batch.init_state(S, MB, V)
    g = np.full(S, -1, np.int32)
    rank, width, cum = np.zeros(S, np.int32), np.zeros(S, np.int32), np.zeros(S, np.float32)
    for s, (gr, r, w, c) in groups.items():
        g[s], rank[s], width[s], cum[s] = gr, r, w, c
    stop_ids = np.full((S, st.stop_ids.shape[1]), -1, np.int32)
    stop_ids[:, :len(stop)] = stop
    tables = np.arange(1, S * MB + 1, dtype=np.int32).reshape(S, MB)
    return dataclasses.replace(
        st, beam_group=jnp.asarray(g), beam_rank=jnp.asarray(rank),
        beam_width=jnp.asarray(width), cum_logprob=jnp.asarray(cum),
        active=jnp.ones(S, bool), positions=jnp.full(S, positions, jnp.int32),
        max_len=jnp.full(S, max_len, jnp.int32), stop_ids=jnp.asarray(stop_ids),
        block_tables=jnp.asarray(tables))


def topk(rows):
    """rows: {slot: [(token, logprob), ...]} best first, padded past them."""
    ids = np.zeros((S, C), np.int32)
    lps = np.full((S, C), -1e9, np.float32)
    for s, entries in rows.items():
        for j, (t, lp) in enumerate(entries):
            ids[s, j], lps[s, j] = t, lp
    return jnp.asarray(ids), jnp.asarray(lps)


def test_ranks_take_the_best_continuing_proposals_of_their_group():
    # group 7: slots 4 (rank 0) and 1 (rank 1); slot 2 is a width-1 group of its own
    st = state_with({4: (7, 0, 2, -1.0), 1: (7, 1, 2, -0.5), 2: (9, 0, 1, 0.0)}, positions=5)
    ids, lps = topk({4: [(3, -0.1), (5, -0.2), (6, -3.0), (8, -4.0)],
                     1: [(10, -0.2), (2, -0.3), (11, -2.0), (12, -2.5)],
                     2: [(13, -0.4), (14, -0.9)]})
    ch = device_batch.beam_select(st, jnp.ones(S, bool), ids, lps, eos_ids=(2,))
    # the group's 4 best: (1:10) -0.7, (1:EOS) -0.8, (0:3) -1.1, (0:5) -1.2
    packed = np.asarray(ch.packed[4, :4])
    assert [beam_search.unpack(int(p)) for p in packed] == [(1, 10), (1, 2), (0, 3), (0, 5)]
    assert (np.asarray(ch.packed[1, :4]) == packed).all() and (np.asarray(ch.packed[4, 4:]) == -1).all()
    # rank 0 takes the first continuing one (parent: slot 1), rank 1 the second
    assert bool(ch.takes[4]) and int(ch.token[4]) == 10 and int(ch.parent[4]) == 1
    assert bool(ch.takes[1]) and int(ch.token[1]) == 3 and int(ch.parent[1]) == 4
    np.testing.assert_allclose(float(ch.cum[4]), -0.7, rtol=1e-6)
    assert bool(ch.takes[2]) and int(ch.token[2]) == 13 and int(ch.parent[2]) == 2
    assert not np.asarray(ch.is_beam)[[0, 3, 5]].any()


def test_a_rank_left_without_a_continuing_proposal_ends():
    st = state_with({0: (3, 0, 2, 0.0), 1: (3, 1, 2, -5.0)}, positions=5, stop=(6, 7))
    ids, lps = topk({0: [(6, -0.1), (2, -0.2), (7, -0.3), (9, -0.4)],
                     1: [(4, -0.1), (5, -0.2)]})
    ch = device_batch.beam_select(st, jnp.ones(S, bool), ids, lps, eos_ids=(2,))
    assert bool(ch.takes[0]) and int(ch.token[0]) == 9
    assert not bool(ch.takes[1])  # three of the four best ended: one beam continues
    # the length cap ends every proposal
    ch = device_batch.beam_select(state_with({0: (3, 0, 2, 0.0), 1: (3, 1, 2, -5.0)},
                                             positions=48), jnp.ones(S, bool), ids, lps, (2,))
    assert not np.asarray(ch.takes).any()


def test_adoption_takes_the_parents_blocks_and_copies_the_partial_one():
    st = state_with({0: (3, 0, 2, 0.0), 1: (3, 1, 2, 0.0)}, positions=6)  # new tokens at 6
    kv = (jnp.arange(2 * 30 * 1 * 4 * 1, dtype=jnp.float32).reshape(2, 30, 1, 4, 1),)
    adopting = jnp.asarray([True] + [False] * (S - 1))
    parent = jnp.asarray([1] + list(range(1, S)), jnp.int32)
    new_kv, new = device_batch.beam_adopt(kv, st, adopting, parent, num_blocks=30)
    tables = np.asarray(new.block_tables)
    old = np.asarray(st.block_tables)
    # position 6 is in block column 1 (block size 4): column 0 from the parent,
    # column 1 stays its own block and gets a copy of the parent's
    assert tables[0].tolist() == [old[1, 0], old[0, 1], old[0, 2], old[0, 3]]
    assert (tables[1:] == old[1:]).all()
    k = np.asarray(new_kv[0])
    assert (k[:, old[0, 1]] == np.asarray(kv[0])[:, old[1, 1]]).all()
    untouched = [b for b in range(30) if b != old[0, 1]]
    assert (k[:, untouched] == np.asarray(kv[0])[:, untouched]).all()
    # at a block boundary nothing is copied
    st8 = dataclasses.replace(st, positions=jnp.full(S, 8, jnp.int32))
    kv8, new8 = device_batch.beam_adopt(kv, st8, adopting, parent, num_blocks=30)
    assert (np.asarray(kv8[0]) == np.asarray(kv[0])).all()
    assert np.asarray(new8.block_tables)[0].tolist() == [old[1, 0], old[1, 1], old[0, 2], old[0, 3]]
