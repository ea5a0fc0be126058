"""Ragged (prefill / mixed) paged attention for GPU (Pallas, Triton backend).

The flat token axis holds each sequence's new tokens back to back. It is cut
into query tiles of ``block_q`` tokens that never straddle two sequences; a
tile table built in XLA (a cumsum over the per-sequence tile counts) tells
each program which sequence and which tokens it owns. One program owns
(tile, KV head) and stacks the whole GQA group of that head on the row axis:
rows = block_q tokens x group_pad heads, so every K/V chunk fetched through
the block table feeds ``block_q * group`` query rows (a real matmul, not a
matrix-vector product).

The KV walk has two phases: chunks entirely before the tile's first query
position need no mask at all (the cached prefix and the causal past), then
the few chunks on the diagonal are masked causally. Tiles past the last
sequence cover the padding tokens and write zeros.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels_pallas.gpu._util import (LOG2E, check_attention, compiler_params,
                                      dot_precision, next_pow2)


def _ragged_kernel(tile_seq_ref,        # i32[num_tiles] sequence of a tile (num_seqs: padding)
                   tile_start_ref,      # i32[num_tiles] first flat token of a tile
                   query_start_loc_ref,  # i32[num_seqs + 1]
                   block_tables_ref,    # i32[num_seqs, max_blocks_per_seq]
                   context_lens_ref,    # i32[num_seqs]
                   q_ref,               # [num_tokens, num_heads, head_dim]
                   kv_ref,              # [2, num_blocks, num_kv_heads, block_size, head_dim]
                   o_ref,               # [num_tokens, num_heads, head_dim]
                   *, scale, group, num_heads, num_seqs, num_tokens, head_dim,
                   group_pad, dim_pad, block_q, block_size, chunk_tokens,
                   max_blocks, precision):
    tile, kv_head = pl.program_id(0), pl.program_id(1)
    seq = tile_seq_ref[tile]
    is_pad = seq >= num_seqs
    seq_c = jnp.minimum(seq, num_seqs - 1)
    tile_start = tile_start_ref[tile]
    seq_start = query_start_loc_ref[seq_c]
    q_end = jnp.where(is_pad, num_tokens, query_start_loc_ref[seq_c + 1])
    context_len = context_lens_ref[seq_c]
    # position of the sequence's first new token in its context
    pos0 = context_len - (q_end - seq_start)

    rows = block_q * group_pad
    r = jnp.arange(rows)
    token = tile_start + r // group_pad  # [R]
    g = r % group_pad
    d = jnp.arange(dim_pad)
    d_ok = d < head_dim
    row_ok = (token < q_end) & (g < group)
    heads = kv_head * group + g  # distinct per row (see paged_attention.py)
    q = plgpu.load(
        q_ref.at[jnp.minimum(token, num_tokens - 1)[:, None],
                 jnp.minimum(heads, num_heads - 1)[:, None], d[None, :]],
        mask=row_ok[:, None] & d_ok[None, :], other=0)
    pos = pos0 + (token - seq_start)  # [R] causal limit of each row
    last_token = jnp.minimum(tile_start + block_q, q_end) - 1
    first_pos = pos0 + (tile_start - seq_start)
    last_pos = pos0 + (last_token - seq_start)
    num_kv = jnp.where(is_pad | (last_token < tile_start), 0, last_pos + 1)
    num_full = jnp.clip((first_pos + 1) // chunk_tokens, 0, pl.cdiv(num_kv, chunk_tokens))
    num_chunks = pl.cdiv(num_kv, chunk_tokens)
    qk_scale = scale * LOG2E

    def step(i, carry, masked):
        acc, m, l = carry
        tok = i * chunk_tokens + jnp.arange(chunk_tokens)  # [C]
        page = jnp.minimum(tok // block_size, max_blocks - 1)
        blk = plgpu.load(block_tables_ref.at[seq_c, page])
        off = tok % block_size
        idx = (blk[:, None], kv_head, off[:, None], d[None, :])
        if masked:
            kv_mask = (tok < num_kv)[:, None] & d_ok[None, :]
        else:
            kv_mask = jnp.broadcast_to(d_ok[None, :], (chunk_tokens, dim_pad))
        k = plgpu.load(kv_ref.at[(0, *idx)], mask=kv_mask, other=0)  # [C, Dp]
        v = plgpu.load(kv_ref.at[(1, *idx)], mask=kv_mask, other=0)
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                                preferred_element_type=jnp.float32) * qk_scale
        if masked:
            s = jnp.where(tok[None, :] <= pos[:, None], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp2(m - m_safe)
        p = jnp.exp2(s - m_safe[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                 precision=precision,
                                 preferred_element_type=jnp.float32)
        return acc * alpha[:, None] + pv, m_new, l

    carry = (jnp.zeros((rows, dim_pad), jnp.float32),
             jnp.full((rows,), -jnp.inf, jnp.float32),
             jnp.zeros((rows,), jnp.float32))
    carry = jax.lax.fori_loop(0, num_full, functools.partial(step, masked=False), carry)
    carry = jax.lax.fori_loop(num_full, num_chunks, functools.partial(step, masked=True), carry)
    acc, _, l = carry
    out = acc / jnp.where(l > 0, l, 1.0)[:, None]
    out = jnp.where(is_pad, 0.0, out)
    plgpu.store(o_ref.at[token[:, None], heads[:, None], d[None, :]],
                out.astype(o_ref.dtype),
                mask=((token < q_end) & (g < group))[:, None] & d_ok[None, :])


def check_ragged_metadata(block_tables, context_lens, query_start_loc) -> None:
    """Raises ValueError unless context_lens is [num_seqs] and
    query_start_loc [num_seqs + 1] for block_tables' num_seqs."""
    num_seqs = block_tables.shape[0]
    if context_lens.shape != (num_seqs,) or query_start_loc.shape != (num_seqs + 1,):
        raise ValueError("context_lens must be [num_seqs] and query_start_loc "
                         f"[num_seqs + 1]; got {context_lens.shape}, "
                         f"{query_start_loc.shape} for {num_seqs} sequences")


def tile_table(query_start_loc, num_tokens: int, block_q: int):
    """Query tiles of block_q tokens that never straddle two sequences.
    Returns (query_start_loc as i32, tile_seq i32[num_tiles], tile_start
    i32[num_tiles], num_tiles): each tile's sequence (num_seqs for padding
    tokens) and first token; num_tiles bounds the tiles any split of
    num_tokens over the sequences can need."""
    num_seqs = query_start_loc.shape[0] - 1
    num_tiles = pl.cdiv(num_tokens, block_q) + num_seqs + 1
    qsl = query_start_loc.astype(jnp.int32)
    return (qsl, *_tile_table(qsl, num_tokens, block_q, num_tiles), num_tiles)


def _tile_table(query_start_loc, num_tokens, block_q, num_tiles):
    """Maps each query tile to (sequence, first token); padding tokens get
    sequence id num_seqs. Returns i32[num_tiles] x 2."""
    num_seqs = query_start_loc.shape[0] - 1
    starts = jnp.concatenate([query_start_loc[:-1],
                              query_start_loc[-1:]]).astype(jnp.int32)
    ends = jnp.concatenate([query_start_loc[1:],
                            jnp.full((1,), num_tokens, jnp.int32)]).astype(jnp.int32)
    lens = jnp.maximum(ends - starts, 0)  # [num_seqs + 1], last = padding
    tiles = (lens + block_q - 1) // block_q
    cum = jnp.cumsum(tiles)
    i = jnp.arange(num_tiles, dtype=jnp.int32)
    seq = jnp.searchsorted(cum, i, side="right").astype(jnp.int32)  # may be num_seqs+1
    seq_c = jnp.minimum(seq, num_seqs)
    first_tile = cum[seq_c] - tiles[seq_c]
    tile_start = starts[seq_c] + (i - first_tile) * block_q
    tile_start = jnp.where(seq > num_seqs, num_tokens, tile_start)
    return jnp.minimum(seq, num_seqs), tile_start.astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=(
    "scale", "interpret", "block_q", "chunk_tokens", "num_warps", "num_stages"))
def ragged_paged_attention(q, kv_cache, block_tables, context_lens,
                           query_start_loc, *, scale, interpret=False,
                           block_q=None, chunk_tokens=None, num_warps=None,
                           num_stages=None):
    """Prefill / mixed attention through block tables (contract: the facade).

    Args:
      q:               [num_tokens, num_heads, head_dim]
      kv_cache:        [2, num_blocks, num_kv_heads, block_size, head_dim]
      block_tables:    i32[num_seqs, max_blocks_per_seq]
      context_lens:    i32[num_seqs]
      query_start_loc: i32[num_seqs + 1]
      scale:           softmax scale.
      interpret:       Pallas interpret mode (CPU).
      block_q:         query tokens per tile (power of two; None: 128 rows).
      chunk_tokens:    KV tokens per inner step (power of two >= 16; None: 32).
      num_warps, num_stages: Triton launch settings (None: 8 and 2).
    Returns:
      [num_tokens, num_heads, head_dim] in q's dtype.
    """
    check_attention(q, kv_cache)
    num_tokens, num_heads, head_dim = q.shape
    _, _, num_kv_heads, block_size, _ = kv_cache.shape
    num_seqs, max_blocks = block_tables.shape
    check_ragged_metadata(block_tables, context_lens, query_start_loc)
    group = num_heads // num_kv_heads
    group_pad = next_pow2(group)
    dim_pad = max(16, next_pow2(head_dim))
    if block_q is None:
        block_q = max(1, 128 // group_pad)
    if block_q != next_pow2(block_q) or block_q * group_pad < 16:
        raise ValueError(f"block_q must be a power of two with block_q * group >= 16, got {block_q}")
    chunk_tokens = chunk_tokens or 32
    if chunk_tokens < 16 or chunk_tokens != next_pow2(chunk_tokens):
        raise ValueError(f"chunk_tokens must be a power of two >= 16, got {chunk_tokens}")
    qsl, tile_seq, tile_start, num_tiles = tile_table(query_start_loc, num_tokens, block_q)

    kernel = functools.partial(
        _ragged_kernel, scale=float(scale), group=group, num_heads=num_heads,
        num_seqs=num_seqs, num_tokens=num_tokens, head_dim=head_dim,
        group_pad=group_pad, dim_pad=dim_pad, block_q=block_q,
        block_size=block_size, chunk_tokens=chunk_tokens, max_blocks=max_blocks,
        precision=dot_precision(kv_cache.dtype))
    return pl.pallas_call(
        kernel, grid=(num_tiles, num_kv_heads),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=compiler_params(num_warps or 8, num_stages or 2),
        interpret=interpret, name="jpaged_ragged_paged_attention",
    )(tile_seq, tile_start, qsl, block_tables.astype(jnp.int32),
      context_lens.astype(jnp.int32), q, kv_cache)
