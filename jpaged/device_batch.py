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

Penalty counts (i32[S, V] output-token counts, bool[S, V] prompt tokens) are
kept for every slot: a prefill fills them from its input tokens, every step
adds its token. Slots with penalties therefore never swap (they are
recomputed) and take no prefix-cache hits (jpaged.block_manager).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jpaged import sampler as sampler_lib
from jpaged.slots import DIFF_FLOAT_FIELDS, ROW, MAX_STOP, SlotDiffLayout
from kernels_pallas import AttentionMetadata

NO_TOKEN = -1  # outputs of an inactive slot


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
    state = dataclasses.replace(state, active=state.active.at[off].set(False, mode="drop"))
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


def pack_outputs(out: sampler_lib.SamplerOutput, live, num_logprobs: int):
    """One i32[R, C] array per step: token (-1 where not live), its raw
    logprob's bits, then the top-k ids and logprob bits when asked for."""
    bits = lambda x: jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)  # noqa: E731
    cols = [jnp.where(live, out.sampled_token_ids, NO_TOKEN)[:, None],
            bits(out.sampled_logprobs)[:, None]]
    if num_logprobs:
        cols += [out.topk_token_ids[:, :num_logprobs], bits(out.topk_logprobs[:, :num_logprobs])]
    return jnp.concatenate(cols, axis=1)
