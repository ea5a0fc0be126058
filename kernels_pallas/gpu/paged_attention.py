"""Paged decode attention for GPU (Pallas, Triton backend), split-K.

One program owns (sequence, KV head, split): it loads the query rows of the
whole GQA group of that KV head once ([group_pad, head_dim_pad]), then walks
its share of the context in chunks of ``chunk_tokens`` tokens. Each token's
K/V row is fetched through the block table straight from the pool, so a
chunk is ``chunk_tokens`` rows of ``head_dim`` contiguous elements: 16-byte
vector loads whatever the block size. Loads past the context are masked off,
so stale (even NaN) blocks are never read. head_dim 80 is padded to 128
inside the kernel by masked loads; the pool is never padded.

Splits: with few sequences (B=1, 32K context) one program per (sequence,
head) would leave most SMs idle, so the context is cut into ``num_splits``
static ranges; each program writes its normalised partial output and its
log-sum-exp (base 2), and a small XLA epilogue merges them. With one split
the kernel writes the final output directly.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels_pallas.gpu._util import (LOG2E, check_attention, compiler_params,
                                      dot_precision, next_pow2)

NUM_SMS = 132  # H100 SXM; only steers the split heuristic.


def default_launch(head_dim: int) -> tuple[int, int, int]:
    """(chunk_tokens, num_warps, num_stages) for a head_dim. head_dim <= 64:
    two warps (measured on the H200 with bench_step.py --decode-tuning, 256
    sequences at context 512, K=16, commit 99189c0: the 1.1B shape, 32/4
    heads, 2.792 -> 2.619 ms per step; the SmolLM2 shape, 9/3 heads, 2.192
    -> 2.167; chunks of 128 were slower for both). Wider heads keep the
    settings measured at head_dim 128 (4.0-4.2 TB/s on the H200)."""
    return (64, 2, 2) if head_dim <= 64 else (64, 4, 3)


def _decode_kernel(block_tables_ref,  # i32[num_seqs, max_blocks_per_seq]
                   context_lens_ref,  # i32[num_seqs]
                   q_ref,             # [num_seqs, num_heads, head_dim]
                   kv_ref,            # [2, num_blocks, num_kv_heads, block_size, head_dim]
                   o_ref,             # [num_seqs, num_heads, head_dim] or f32[num_seqs, num_splits, num_heads, head_dim]
                   *lse_refs,         # () or f32[num_seqs, num_splits, num_heads]
                   scale, group, num_heads, head_dim, group_pad, dim_pad, block_size,
                   chunk_tokens, split_tokens, max_blocks, use_dot, precision):
    seq, kv_head, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    context_len = context_lens_ref[seq]
    start = split * split_tokens
    end = jnp.minimum(context_len, start + split_tokens)
    num_chunks = jnp.maximum(0, pl.cdiv(end - start, chunk_tokens))

    g = jnp.arange(group_pad)
    d = jnp.arange(dim_pad)
    g_ok, d_ok = g < group, d < head_dim
    # NOTE: padded rows keep distinct (masked) head indices: in interpret mode
    # a masked scatter with repeated indices would write stale values back.
    heads = kv_head * group + g
    q = plgpu.load(q_ref.at[seq, jnp.minimum(heads, num_heads - 1)[:, None], d[None, :]],
                   mask=g_ok[:, None] & d_ok[None, :], other=0)
    qk_scale = scale * LOG2E  # scores live in base 2: exp2 is one instruction

    def body(i, carry):
        acc, m, l = carry
        tok = start + i * chunk_tokens + jnp.arange(chunk_tokens)  # [C]
        valid = tok < end
        page = jnp.minimum(tok // block_size, max_blocks - 1)
        blk = plgpu.load(block_tables_ref.at[seq, page])  # [C] (repeats hit L1)
        off = tok % block_size
        mask = valid[:, None] & d_ok[None, :]
        idx = (blk[:, None], kv_head, off[:, None], d[None, :])
        k = plgpu.load(kv_ref.at[(0, *idx)], mask=mask, other=0)  # [C, Dp]
        v = plgpu.load(kv_ref.at[(1, *idx)], mask=mask, other=0)
        if use_dot:
            s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                                    precision=precision,
                                    preferred_element_type=jnp.float32)
        else:  # tiny groups (MHA): CUDA-core dot, no 16-row padding
            s = jnp.sum(q.astype(jnp.float32)[:, None, :]
                        * k.astype(jnp.float32)[None, :, :], axis=-1)
        s = jnp.where(valid[None, :], s * qk_scale, -jnp.inf)  # [Gp, C]
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        if use_dot:
            pv = jax.lax.dot_general(p.astype(v.dtype), v,
                                     (((1,), (0,)), ((), ())),
                                     precision=precision,
                                     preferred_element_type=jnp.float32)
        else:
            pv = jnp.sum(p[:, :, None] * v.astype(jnp.float32)[None, :, :], axis=1)
        return acc * alpha[:, None] + pv, m_new, l

    acc = jnp.zeros((group_pad, dim_pad), jnp.float32)
    m = jnp.full((group_pad,), -jnp.inf, jnp.float32)
    l = jnp.zeros((group_pad,), jnp.float32)
    acc, m, l = jax.lax.fori_loop(0, num_chunks, body, (acc, m, l))

    has = l > 0
    out = acc / jnp.where(has, l, 1.0)[:, None]
    out_mask = g_ok[:, None] & d_ok[None, :]
    if lse_refs:
        (lse_ref,) = lse_refs
        plgpu.store(o_ref.at[seq, split, heads[:, None], d[None, :]],
                    out, mask=out_mask)
        lse = jnp.where(has, m + jnp.log2(jnp.where(has, l, 1.0)), -jnp.inf)
        plgpu.store(lse_ref.at[seq, split, heads], lse, mask=g_ok)
    else:
        plgpu.store(o_ref.at[seq, heads[:, None], d[None, :]],
                    out.astype(o_ref.dtype), mask=out_mask)


def default_num_splits(num_seqs, num_kv_heads, max_tokens, chunk_tokens):
    """No split once (sequence, KV head) programs fill the GPU twice over
    (measured on H100: B=64 x 8 heads, 1 split 2.84 TB/s vs 2 splits 2.64);
    else about 4 programs per SM (B=1, 32K: 66 splits 2.42 TB/s)."""
    programs = num_seqs * num_kv_heads
    if programs >= 2 * NUM_SMS:
        return 1
    want = pl.cdiv(4 * NUM_SMS, programs)
    return int(max(1, min(want, pl.cdiv(max_tokens, chunk_tokens))))


@functools.partial(jax.jit, static_argnames=(
    "scale", "interpret", "num_splits", "chunk_tokens", "num_warps",
    "num_stages", "use_dot"))
def paged_attention(q, kv_cache, block_tables, context_lens, *, scale,
                    interpret=False, num_splits=None, chunk_tokens=None,
                    num_warps=None, num_stages=None, use_dot=None):
    """Decode attention through block tables (see the facade for the contract).

    Args:
      q:            [num_seqs, num_heads, head_dim]
      kv_cache:     [2, num_blocks, num_kv_heads, block_size, head_dim]
      block_tables: i32[num_seqs, max_blocks_per_seq]
      context_lens: i32[num_seqs]
      scale:        softmax scale.
      interpret:    run in Pallas interpret mode (CPU).
      num_splits:   static context splits per sequence (None: heuristic).
      chunk_tokens: tokens per inner step, a power of two >= 16 (None:
                    default_launch).
      num_warps, num_stages: Triton launch settings (None: default_launch).
      use_dot:      tensor-core dots with the group padded to 16 rows (None:
                    yes; the CUDA-core path measured 1.8 vs 3.0 TB/s for MHA).
    Returns:
      [num_seqs, num_heads, head_dim] in q's dtype.
    """
    check_attention(q, kv_cache)
    num_seqs, num_heads, head_dim = q.shape
    _, _, num_kv_heads, block_size, _ = kv_cache.shape
    if block_tables.shape[0] != num_seqs or context_lens.shape != (num_seqs,):
        raise ValueError("block_tables / context_lens do not match q's num_seqs: "
                         f"{block_tables.shape}, {context_lens.shape}, {q.shape}")
    max_blocks = block_tables.shape[1]
    max_tokens = max_blocks * block_size
    group = num_heads // num_kv_heads
    launch = default_launch(head_dim)
    chunk_tokens = chunk_tokens or launch[0]
    if chunk_tokens < 16 or chunk_tokens != next_pow2(chunk_tokens):
        raise ValueError(f"chunk_tokens must be a power of two >= 16, got {chunk_tokens}")
    if use_dot is None:
        use_dot = True
    group_pad = max(16, next_pow2(group)) if use_dot else next_pow2(group)
    dim_pad = max(16, next_pow2(head_dim))
    if num_splits is None:
        num_splits = default_num_splits(num_seqs, num_kv_heads, max_tokens, chunk_tokens)
    split_tokens = pl.cdiv(pl.cdiv(max_tokens, num_splits), chunk_tokens) * chunk_tokens
    num_splits = pl.cdiv(max_tokens, split_tokens)

    kernel = functools.partial(
        _decode_kernel, scale=float(scale), group=group, num_heads=num_heads, head_dim=head_dim,
        group_pad=group_pad, dim_pad=dim_pad, block_size=block_size,
        chunk_tokens=chunk_tokens, split_tokens=split_tokens,
        max_blocks=max_blocks, use_dot=use_dot,
        precision=dot_precision(kv_cache.dtype))
    if num_splits == 1:
        out_shape = jax.ShapeDtypeStruct(q.shape, q.dtype)
    else:
        out_shape = (
            jax.ShapeDtypeStruct((num_seqs, num_splits, num_heads, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((num_seqs, num_splits, num_heads), jnp.float32))
    result = pl.pallas_call(
        kernel, grid=(num_seqs, num_kv_heads, num_splits), out_shape=out_shape,
        compiler_params=compiler_params(num_warps or launch[1], num_stages or launch[2]),
        interpret=interpret, name="jpaged_paged_attention",
    )(block_tables.astype(jnp.int32), context_lens.astype(jnp.int32), q, kv_cache)
    if num_splits == 1:
        return result
    part, lse = result  # [S, splits, Hq, D], [S, splits, Hq]
    lse_max = jnp.max(lse, axis=1, keepdims=True)
    lse_max = jnp.where(jnp.isfinite(lse_max), lse_max, 0.0)
    w = jnp.exp2(lse - lse_max)  # 0 for empty splits
    denom = jnp.sum(w, axis=1)
    out = jnp.sum(part * w[..., None], axis=1) / jnp.where(denom > 0, denom, 1.0)[..., None]
    return out.astype(q.dtype)
