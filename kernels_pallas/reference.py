"""Pure-jnp versions of every kernel: the ground truth, and the CPU path.

Same signatures as the facade in ``kernels_pallas/__init__.py`` (which holds
the layout and the glossary). Arithmetic is done in float32 whatever the
storage dtype. Positions past a sequence's context are masked in the scores
and zeroed in V, so stale or NaN-filled blocks never leak into a result.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def write_kv(kv_cache, k, v, slot_mapping):
    """kv_cache [2, num_blocks, Hkv, block_size, D]; k, v [num_tokens, Hkv, D];
    slot_mapping i32[num_tokens] (out-of-range slots dropped)."""
    _, num_blocks, num_kv_heads, block_size, head_dim = kv_cache.shape
    num_slots = num_blocks * block_size
    slots = slot_mapping.astype(jnp.int32)
    # NOTE: negative indices would wrap around in JAX; send them out of range,
    # and block 0 (the null block) is never written.
    slots = jnp.where((slots >= block_size) & (slots < num_slots), slots, num_slots)
    block_ids = slots // block_size
    offsets = slots % block_size
    block_ids = jnp.where(slots == num_slots, num_blocks, block_ids)
    kv = jnp.stack([k, v]).astype(kv_cache.dtype)  # [2, num_tokens, Hkv, D]
    return kv_cache.at[:, block_ids, :, offsets, :].set(
        jnp.moveaxis(kv, 0, 1), mode="drop")


def copy_blocks(kv_cache, src_ids, dst_ids):
    """Copies kv_cache[:, src] to kv_cache[:, dst] for each pair; dst 0 skipped."""
    num_blocks = kv_cache.shape[1]
    dst = jnp.where(dst_ids > 0, dst_ids, num_blocks)
    return kv_cache.at[:, dst].set(kv_cache[:, src_ids], mode="drop")


def _gather_seq_kv(kv_cache, block_tables):
    """Returns k, v [num_seqs, max_blocks_per_seq * block_size, Hkv, D]."""
    _, _, num_kv_heads, block_size, head_dim = kv_cache.shape
    num_seqs, max_blocks = block_tables.shape
    kv = kv_cache[:, block_tables]  # [2, S, max_blocks, Hkv, bs, D]
    kv = jnp.swapaxes(kv, 3, 4).reshape(2, num_seqs, max_blocks * block_size,
                                        num_kv_heads, head_dim)
    return kv[0], kv[1]


def _softmax_av(scores, mask, v):
    """scores [..., T] f32, mask [..., T] bool, v [T, D]-broadcastable -> out."""
    scores = jnp.where(mask, scores, -jnp.inf)
    m = jnp.max(scores, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(mask, jnp.exp(scores - m), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    return p / jnp.where(denom > 0, denom, 1.0)


def paged_attention(q, kv_cache, block_tables, context_lens, *, scale):
    """q [S, Hq, D] -> [S, Hq, D]; attends to positions [0, context_lens)."""
    num_seqs, num_heads, head_dim = q.shape
    k, v = _gather_seq_kv(kv_cache, block_tables)  # [S, T, Hkv, D]
    num_kv_heads = k.shape[2]
    group = num_heads // num_kv_heads
    max_len = k.shape[1]
    valid = jnp.arange(max_len)[None, :] < context_lens[:, None]  # [S, T]
    k = jnp.where(valid[:, :, None, None], k.astype(jnp.float32), 0.0)
    v = jnp.where(valid[:, :, None, None], v.astype(jnp.float32), 0.0)
    qg = q.astype(jnp.float32).reshape(num_seqs, num_kv_heads, group, head_dim)
    scores = jnp.einsum("shgd,sthd->shgt", qg, k) * scale
    p = _softmax_av(scores, valid[:, None, None, :], None)
    out = jnp.einsum("shgt,sthd->shgd", p, v)
    return out.reshape(num_seqs, num_heads, head_dim).astype(q.dtype)


def ragged_paged_attention(q, kv_cache, block_tables, context_lens,
                           query_start_loc, *, scale):
    """q [N, Hq, D] (sequences' new tokens concatenated) -> [N, Hq, D]."""
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = block_tables.shape[0]
    num_kv_heads = kv_cache.shape[2]
    group = num_heads // num_kv_heads
    token_idx = jnp.arange(num_tokens)
    qf = q.astype(jnp.float32).reshape(num_tokens, num_kv_heads, group, head_dim)

    def one_seq(s, out):
        start, end = query_start_loc[s], query_start_loc[s + 1]
        q_len = end - start
        is_mine = (token_idx >= start) & (token_idx < end)  # [N]
        pos = context_lens[s] - q_len + (token_idx - start)  # [N]
        k, v = _gather_seq_kv(kv_cache, block_tables[s][None])
        k, v = k[0].astype(jnp.float32), v[0].astype(jnp.float32)  # [T, Hkv, D]
        kv_pos = jnp.arange(k.shape[0])
        in_ctx = kv_pos < context_lens[s]
        k = jnp.where(in_ctx[:, None, None], k, 0.0)
        v = jnp.where(in_ctx[:, None, None], v, 0.0)
        mask = (kv_pos[None, :] <= pos[:, None]) & in_ctx[None, :] & is_mine[:, None]
        scores = jnp.einsum("nhgd,thd->nhgt", qf, k) * scale
        p = _softmax_av(scores, mask[:, None, None, :], None)
        o = jnp.einsum("nhgt,thd->nhgd", p, v)
        return out + jnp.where(is_mine[:, None, None, None], o, 0.0)

    # NOTE: padded sequences (zero new tokens) sit at the end, so looping over
    # the non-empty ones only keeps a padded bucket cheap on CPU.
    num_active = jnp.sum(query_start_loc[1:] > query_start_loc[:-1])
    out = jax.lax.fori_loop(0, num_active, one_seq, jnp.zeros_like(qf))
    return out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype)
