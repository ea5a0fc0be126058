"""The persistent batch on the device: one row (slot) per running sequence.

Everything a decode step needs of a sequence lives in ``SlotState``, a
fixed-shape pytree of device arrays that every step takes and returns
(donated): its last token and position, its block-table row, its sampling
settings and stop rules, and its penalty counts. A decode step builds its
attention metadata and sampling tensors from these arrays on the device, so
the host sends only what changed (``jpaged.slots.SlotDiff``, one packed
int32 buffer a step) and reads back one packed output array.

Stop rules that need no text are decided here, per slot and per step, with
the engine's own rules (jpaged.engine ``_check_stop``): a sampled token ends
the slot when it is an EOS id (unless ignore_eos) or a stop token id and at
least min_tokens tokens were generated, or when the sequence holds max_len
tokens (min(prompt + max_tokens, max_model_len)). While fewer than min_tokens
tokens were generated, EOS and stop ids are banned from sampling. An ended
slot is inactive: it writes no K/V, and its later outputs are padding (-1).

Beam search (jpaged.beam_search) is decided here too, so its steps run in
windows like any other: the slots of a group (``beam_group``, each with its
``beam_rank``) propose the top 2W tokens of each live rank, scored by the
rank's ``cum_logprob``; the 2W best proposals are kept (ties: lower rank,
then higher logprob first); those that end a beam (EOS unless ignore_eos, a
stop id, the length cap) are left to the host's finished pool, and the
j-th live rank takes the j-th continuing proposal, a rank left without one
going inactive for good. A rank that takes another rank's proposal adopts
that rank's history: the block-table entries before the new token's block,
and a copy of the block the new token goes into (its own, private block,
reserved by the host for the window). Every beam slot writes the group's
proposals into its top-logprob columns, so the host can replay the step
with the same rules (jpaged.output_processor).

Penalty counts (i32[S, V] output-token counts, bool[S, V] prompt tokens) are
kept for every slot: a prefill fills them from its input tokens, every step
adds its token. Slots with penalties therefore never swap (they are
recomputed) and take no prefix-cache hits (jpaged.block_manager).
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jpaged import sampler as sampler_lib
from jpaged.beam_search import PARENT_SHIFT, TOKEN_MASK  # a proposal's packed id
from jpaged.slots import DIFF_FLOAT_FIELDS, ROW, MAX_STOP, SlotDiffLayout
from kernels_pallas import AttentionMetadata

NO_TOKEN = -1  # outputs of an inactive slot
BEAM_MAX = sampler_lib.MAX_LOGPROBS // 2  # widest beam: its 2W proposals fill the columns


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SlotState:
    """Per-slot state of the persistent batch (S slots, all device arrays)."""
    tokens: Any          # i32[S]       last token: the next step's input
    positions: Any       # i32[S]       its position
    block_tables: Any    # i32[S, MB]   physical block ids (0: unused)
    active: Any          # bool[S]      running, not stopped
    num_generated: Any   # i32[S]       output tokens so far (the sample step)
    max_len: Any         # i32[S]       the slot stops when its sequence holds this many tokens
    min_tokens: Any      # i32[S]
    ignore_eos: Any      # bool[S]
    top_k: Any           # i32[S]       0: off
    seed: Any            # u32[S]
    temperature: Any     # f32[S]       0: greedy
    top_p: Any           # f32[S]
    min_p: Any           # f32[S]
    presence_penalty: Any     # f32[S]
    frequency_penalty: Any    # f32[S]
    repetition_penalty: Any   # f32[S]
    stop_ids: Any        # i32[S, MAX_STOP]  padded with -1
    beam_group: Any      # i32[S]       the slot's beam-search group id, -1: none
    beam_rank: Any       # i32[S]       its rank in the group
    beam_width: Any      # i32[S]       the group's width W (0: not beam search)
    cum_logprob: Any     # f32[S]       a beam's cumulative logprob
    counts: Any          # i32[S, V]    output-token counts
    in_prompt: Any       # bool[S, V]   prompt tokens


def init_state(num_slots: int, max_blocks: int, vocab_size: int, sharding=None) -> SlotState:
    """Every slot empty (inactive)."""
    S = num_slots
    z = lambda shape, dtype: jnp.zeros(shape, dtype)  # noqa: E731
    state = SlotState(
        tokens=z(S, jnp.int32), positions=z(S, jnp.int32),
        block_tables=z((S, max_blocks), jnp.int32), active=z(S, jnp.bool_),
        num_generated=z(S, jnp.int32), max_len=z(S, jnp.int32), min_tokens=z(S, jnp.int32),
        ignore_eos=z(S, jnp.bool_), top_k=z(S, jnp.int32), seed=z(S, jnp.uint32),
        temperature=z(S, jnp.float32), top_p=jnp.ones(S, jnp.float32), min_p=z(S, jnp.float32),
        presence_penalty=z(S, jnp.float32), frequency_penalty=z(S, jnp.float32),
        repetition_penalty=jnp.ones(S, jnp.float32),
        stop_ids=jnp.full((S, MAX_STOP), -1, jnp.int32),
        beam_group=jnp.full(S, -1, jnp.int32), beam_rank=z(S, jnp.int32),
        beam_width=z(S, jnp.int32), cum_logprob=z(S, jnp.float32),
        counts=z((S, vocab_size), jnp.int32), in_prompt=z((S, vocab_size), jnp.bool_))
    # NOTE: committed to a device like the params, so a jitted step sees the
    # same placement on its first call as on later ones (no recompile).
    return jax.device_put(state, sharding if sharding is not None else jax.local_devices()[0])


def apply_diff(state: SlotState, buf, layout: SlotDiffLayout) -> SlotState:
    """Applies one packed SlotDiff (jpaged.slots): switch-offs first (a slot
    freed and refilled within one diff ends up filled), then whole rows
    (penalty counts copied from their source slot, read before any row is
    written), then block-table entries. Padding entries name slot S and are
    dropped."""
    S = state.tokens.shape[0]
    rows, blocks, off = layout.split(buf)
    # (a slot switched off leaves its beam group: its rank may come back elsewhere)
    state = dataclasses.replace(state, active=state.active.at[off].set(False, mode="drop"),
                                beam_group=state.beam_group.at[off].set(-1, mode="drop"))
    slot = rows[:, ROW.slot]
    col = lambda name: rows[:, getattr(ROW, name)]  # noqa: E731
    f32 = lambda name: jax.lax.bitcast_convert_type(col(name), jnp.float32)  # noqa: E731
    src = rows[:, ROW.counts_from]
    has_src = (src >= 0)[:, None]
    src_i = jnp.clip(src, 0, S - 1)
    counts = jnp.where(has_src, state.counts[src_i], 0)
    in_prompt = jnp.where(has_src, state.in_prompt[src_i], False)

    def put(x, value):
        return x.at[slot].set(value.astype(x.dtype), mode="drop")

    new = dataclasses.replace(
        state,
        tokens=put(state.tokens, col("token")), positions=put(state.positions, col("position")),
        block_tables=put(state.block_tables, rows[:, ROW.table:ROW.table + layout.max_blocks]),
        active=put(state.active, col("active") != 0),
        num_generated=put(state.num_generated, col("num_generated")),
        max_len=put(state.max_len, col("max_len")), min_tokens=put(state.min_tokens, col("min_tokens")),
        ignore_eos=put(state.ignore_eos, col("ignore_eos") != 0),
        top_k=put(state.top_k, col("top_k")),
        seed=put(state.seed, jax.lax.bitcast_convert_type(col("seed"), jnp.uint32)),
        stop_ids=put(state.stop_ids, rows[:, ROW.stop:ROW.stop + MAX_STOP]),
        beam_group=put(state.beam_group, col("beam_group")),
        beam_rank=put(state.beam_rank, col("beam_rank")),
        beam_width=put(state.beam_width, col("beam_width")),
        counts=put(state.counts, counts), in_prompt=put(state.in_prompt, in_prompt),
        **{name: put(getattr(state, name), f32(name)) for name in DIFF_FLOAT_FIELDS})
    # block entries (slot, column, block): tables grow, or a copy-on-write
    # replaces the last block
    new.block_tables = new.block_tables.at[blocks[:, 0], blocks[:, 1]].set(
        blocks[:, 2], mode="drop")
    return new


def decode_metadata(state: SlotState, block_size: int, num_slots_in_pool: int):
    """Attention metadata of one decode step over every slot: inactive slots
    attend to nothing and write to a dropped slot."""
    S = state.tokens.shape[0]
    pos = state.positions
    page = jnp.take_along_axis(state.block_tables, (pos // block_size)[:, None], axis=1)[:, 0]
    slot_mapping = jnp.where(state.active, page * block_size + pos % block_size,
                             num_slots_in_pool)
    context_lens = jnp.where(state.active, pos + 1, 0)
    return AttentionMetadata(slot_mapping.astype(jnp.int32), state.block_tables,
                             context_lens.astype(jnp.int32),
                             jnp.arange(S + 1, dtype=jnp.int32), is_decode=True)


def sampling_tensors(state: SlotState, slots, eos_ids: tuple[int, ...], vocab_size: int):
    """SamplingTensors of the rows that sample for `slots` (i32[R], clipped
    into range by the caller), with EOS and stop ids banned below min_tokens."""
    g = lambda x: x[slots]  # noqa: E731
    below = (g(state.num_generated) < g(state.min_tokens))[:, None]
    eos = jnp.asarray(eos_ids or (-1,), jnp.int32)[None, :]
    eos = jnp.where(g(state.ignore_eos)[:, None], -1, eos)
    banned = jnp.concatenate([g(state.stop_ids), jnp.broadcast_to(eos, (slots.shape[0],
                                                                         eos.shape[1]))], 1)
    banned = jnp.where(below & (banned >= 0), banned, vocab_size)
    return sampler_lib.SamplingTensors(
        temperatures=g(state.temperature), top_ps=g(state.top_p), top_ks=g(state.top_k),
        min_ps=g(state.min_p), presence_penalties=g(state.presence_penalty),
        frequency_penalties=g(state.frequency_penalty),
        repetition_penalties=g(state.repetition_penalty), seeds=g(state.seed),
        sample_steps=g(state.num_generated), output_token_ids=None, prompt_token_ids=None,
        banned_token_ids=banned.astype(jnp.int32))


def ends(state: SlotState, slots, tokens, eos_ids: tuple[int, ...]):
    """Whether each sampled token ends its slot's sequence (bool[R]); the
    slots' num_generated and positions are those before the token."""
    g = lambda x: x[slots]  # noqa: E731
    num_out = g(state.num_generated) + 1
    may_stop = num_out >= g(state.min_tokens)
    is_stop = jnp.any(tokens[:, None] == g(state.stop_ids), axis=1)
    if eos_ids:
        is_eos = jnp.any(tokens[:, None] == jnp.asarray(eos_ids, jnp.int32)[None, :], axis=1)
        is_stop = is_stop | (is_eos & ~g(state.ignore_eos))
    # the sequence then holds position + 2 tokens (the input one and the new one)
    return (may_stop & is_stop) | (g(state.positions) + 2 >= g(state.max_len))


def record_tokens(state: SlotState, slots, tokens, live, ended) -> SlotState:
    """The sampled tokens of live rows become their slots' next input (one
    position on), their counts include them, and a slot whose token `ended`
    it goes inactive. Rows that are not live change nothing."""
    S = state.tokens.shape[0]
    idx = jnp.where(live, slots, S)  # dropped
    return dataclasses.replace(
        state,
        tokens=state.tokens.at[idx].set(tokens, mode="drop"),
        positions=state.positions.at[idx].add(1, mode="drop"),
        num_generated=state.num_generated.at[idx].add(1, mode="drop"),
        active=state.active.at[jnp.where(ended, idx, S)].set(False, mode="drop"),
        counts=state.counts.at[idx, tokens].add(1, mode="drop"))


class BeamChoice(NamedTuple):
    """One step's beam-search decisions, per slot (jpaged.device_batch's
    module docstring; meaningful where ``is_beam``)."""
    is_beam: Any    # bool[S]  a live slot of a beam group
    takes: Any      # bool[S]  it continues (else its rank ends for good)
    token: Any      # i32[S]   the token it takes
    logprob: Any    # f32[S]   that token's raw logprob
    cum: Any        # f32[S]   its new cumulative logprob
    parent: Any     # i32[S]   the slot whose history it continues
    packed: Any     # i32[S, 2 BEAM_MAX]  the group's proposals: parent rank, token
    logprobs: Any   # f32[S, 2 BEAM_MAX]  their raw logprobs


def beam_peers(state: SlotState):
    """i32[S, BEAM_MAX]: the slot of each rank of a slot's beam group (-1: none)."""
    S = state.tokens.shape[0]
    g = state.beam_group
    same = (g[:, None] == g[None, :]) & (g[:, None] >= 0)
    ranks = state.beam_rank[None, :, None] == jnp.arange(BEAM_MAX)[None, None, :]
    return jnp.max(jnp.where(same[:, :, None] & ranks, jnp.arange(S)[None, :, None], -1), axis=1)


def beam_select(state: SlotState, live, topk_ids, topk_lps, eos_ids: tuple[int, ...]):
    """One beam-search step of every beam group (module docstring).

    live: bool[S], the slots that sampled; topk_ids, topk_lps: [S, 2 BEAM_MAX],
    each live slot's top raw logprobs. Returns a BeamChoice."""
    S, C = topk_ids.shape
    peers = beam_peers(state)
    pc = jnp.clip(peers, 0, S - 1)
    proposing = (peers >= 0) & live[pc]
    cand = jnp.where(proposing[:, :, None],
                     state.cum_logprob[pc][:, :, None] + topk_lps[pc], -jnp.inf)
    # NOTE: exact_top_k keeps the lower index first among equal values: rank,
    # then the rank's own order (the host's replay reads this order, never
    # redoes it); no sort (XLA's top_k is one on the GPU)
    vals, idx = sampler_lib.exact_top_k(cand.reshape(S, -1), C)
    parent_rank, j = idx // C, idx % C
    parent_slot = jnp.take_along_axis(pc, parent_rank, axis=1)
    token = topk_ids[parent_slot, j]
    lp = topk_lps[parent_slot, j]
    valid = (jnp.arange(C)[None, :] < 2 * state.beam_width[:, None]) & jnp.isfinite(vals)
    stop = jnp.any(token[:, :, None] == state.stop_ids[:, None, :], axis=-1)
    if eos_ids:
        eos = jnp.any(token[:, :, None] == jnp.asarray(eos_ids, jnp.int32)[None, None, :], -1)
        stop = stop | (eos & ~state.ignore_eos[:, None])
    length = (state.positions + 2 >= state.max_len)[:, None]
    cont = valid & ~stop & ~length
    order = jnp.cumsum(cont, axis=1) - 1  # index among the continuing proposals
    # this slot's index among its group's proposing ranks
    mine = jnp.sum(proposing & (jnp.arange(BEAM_MAX)[None, :] < state.beam_rank[:, None]), 1)
    pick = cont & (order == mine[:, None])
    is_beam = (state.beam_width > 0) & (state.beam_group >= 0) & live
    q = jnp.argmax(pick, axis=1)[:, None]
    take = lambda x: jnp.take_along_axis(x, q, axis=1)[:, 0]  # noqa: E731
    packed = jnp.where(valid, (parent_rank << PARENT_SHIFT) | token, -1)
    return BeamChoice(is_beam, is_beam & jnp.any(pick, axis=1), take(token), take(lp),
                      take(vals), take(parent_slot), packed.astype(jnp.int32),
                      jnp.where(valid, lp, 0.0))


def beam_adopt(kv_caches, state: SlotState, adopting, parent, num_blocks: int):
    """Ranks that took another rank's proposal continue its history: the
    block-table entries before the new token's block, and a copy of the
    block the new token goes into when it is partly written (into the
    slot's own block there). `state.positions`: the new tokens'. All reads
    are of the tables and blocks before any rank adopts."""
    S, MB = state.block_tables.shape
    bs = kv_caches[0].shape[3]
    pos = state.positions
    col = jnp.minimum(pos // bs, MB - 1)
    ptab = state.block_tables[parent]
    tables = jnp.where(adopting[:, None] & (jnp.arange(MB)[None, :] < col[:, None]),
                       ptab, state.block_tables)
    partial = adopting & (pos % bs != 0)
    src = jnp.where(partial, jnp.take_along_axis(ptab, col[:, None], 1)[:, 0], 0)
    dst = jnp.where(partial, jnp.take_along_axis(state.block_tables, col[:, None], 1)[:, 0],
                    num_blocks)
    kv_caches = tuple(c.at[:, dst].set(c[:, src], mode="drop") for c in kv_caches)
    return kv_caches, dataclasses.replace(state, block_tables=tables)


def beam_step(state: SlotState, slots, live, res, ended, eos_ids):
    """Beam search over a step's rows (slots: i32[R] clipped, live: bool[R],
    res: their SamplerOutput, ended: their stop rules): beam rows take their
    group's decisions instead of their samples. Returns (BeamChoice, the
    rows' SamplerOutput, ended, live rows of the outputs); record_tokens
    must follow, then `finish_beams`."""
    S = state.tokens.shape[0]
    at = jnp.where(live, slots, S)
    slot_live = jnp.zeros(S, jnp.bool_).at[at].set(True, mode="drop")
    C = res.topk_token_ids.shape[1]
    ids = jnp.zeros((S, C), jnp.int32).at[at].set(res.topk_token_ids, mode="drop")
    lps = jnp.full((S, C), -jnp.inf, jnp.float32).at[at].set(res.topk_logprobs, mode="drop")
    choice = beam_select(state, slot_live, ids, lps, eos_ids)
    g = lambda x: x[slots]  # noqa: E731
    beam = g(choice.is_beam) & live
    takes = g(choice.takes)
    res = res._replace(
        sampled_token_ids=jnp.where(beam, g(choice.token), res.sampled_token_ids),
        sampled_logprobs=jnp.where(beam, g(choice.logprob), res.sampled_logprobs),
        topk_token_ids=jnp.where(beam[:, None], g(choice.packed), res.topk_token_ids),
        topk_logprobs=jnp.where(beam[:, None], g(choice.logprobs), res.topk_logprobs))
    return choice, res, jnp.where(beam, ~takes, ended), live & ~(beam & ~takes)


def finish_beams(kv_caches, state: SlotState, choice: BeamChoice, num_blocks: int):
    """After record_tokens: the continuing beams' cumulative logprobs, and
    the histories of those that took another rank's proposal."""
    S = state.tokens.shape[0]
    own = jnp.arange(S, dtype=jnp.int32)
    state = dataclasses.replace(state, cum_logprob=jnp.where(choice.takes, choice.cum,
                                                             state.cum_logprob))
    adopting = choice.takes & (choice.parent != own)
    return beam_adopt(kv_caches, state, adopting, choice.parent, num_blocks)


def pack_outputs(out: sampler_lib.SamplerOutput, live, num_logprobs: int):
    """One i32[R, C] array per step: token (-1 where not live), its raw
    logprob's bits, then the top-k ids and logprob bits when asked for."""
    bits = lambda x: jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)  # noqa: E731
    cols = [jnp.where(live, out.sampled_token_ids, NO_TOKEN)[:, None],
            bits(out.sampled_logprobs)[:, None]]
    if num_logprobs:
        cols += [out.topk_token_ids[:, :num_logprobs], bits(out.topk_logprobs[:, :num_logprobs])]
    return jnp.concatenate(cols, axis=1)
