"""Paged decode attention for TPU (Pallas Mosaic backend).

One query token per sequence attends to its context through its block table.

Grid ``(num_seqs, num_splits)``, both "parallel" (megacore may split either):
program (s, split) owns a contiguous, page-group-aligned share of sequence s's
pages and all its heads. ``context_lens`` is scalar-prefetched into SMEM; the
pool and the block tables stay in HBM (``pl.ANY``): block-table slices are
DMA'd into SMEM per chunk and the pages into VMEM per group, double-buffered
(see ``_page_pipeline``). Each group is one batched matmul over the KV heads
(``[Hkv, G, D] x [Hkv, T, D]``, G = num_queries_per_kv, any G incl. 1 = MHA),
then an online-softmax update in f32.

With ``num_splits > 1`` (long context, small batch) every split writes its
normalised partial output and log-sum-exp; a short jnp epilogue merges them.

Known cost: programs are independent ("parallel"), so each one's first
block-table slice and page group are fetched before it can compute (JAX's
kernel instead prefetches the next program's first block, which forces
"arbitrary" grid semantics). With 128-token groups and a 2048-token context
that is 1 exposed fetch in 16.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.tpu import _page_pipeline as pp


def _decode_kernel(context_lens_ref,   # SMEM i32[num_seqs] (scalar prefetch)
                   q_ref,              # [Hkv, G, D] pool dtype
                   kv_hbm,             # [2, num_blocks, Hkv, block_size, D]
                   tables_hbm,         # i32[num_seqs, max_blocks_per_seq]
                   o_ref,              # f32[Hkv, G, D]
                   lse_ref,            # f32[Hkv, G, 1]
                   k_buf, v_buf, tbl_buf, kv_sems, tbl_sems,
                   m_ref, l_ref, acc_ref,
                   *, scale, num_splits, pages_per_chunk):
    seq, split = pl.program_id(0), pl.program_id(1)
    block_size = k_buf.shape[3]
    group = k_buf.shape[2]
    max_blocks = tables_hbm.shape[1]
    context_len = context_lens_ref[seq]
    num_pages = jnp.minimum(pl.cdiv(context_len, block_size), max_blocks)
    # NOTE: a split's share is a multiple of the group, so no group straddles
    # two splits.
    per_split = pl.cdiv(pl.cdiv(num_pages, num_splits), group) * group
    page_begin = jnp.minimum(split * per_split, num_pages)
    page_end = jnp.minimum(page_begin + per_split, num_pages)
    kv_limit = jnp.minimum(context_len, page_end * block_size)

    pp.init_state(m_ref, l_ref, acc_ref)
    q = q_ref[...]

    def body(k, v, first_page):
        rows = k.shape[1]
        pos = first_page * block_size + jax.lax.broadcasted_iota(jnp.int32, (1, 1, rows), 2)
        pos_col = first_page * block_size + jax.lax.broadcasted_iota(jnp.int32, (1, rows, 1), 1)
        scores = jnp.einsum("hgd,htd->hgt", q, k,
                            preferred_element_type=jnp.float32) * scale
        scores = jnp.where(pos < kv_limit, scores, -jnp.inf)
        # NOTE: 0 * NaN is NaN: rows past the context (stale or never-written
        # pages) must be zeroed, not only masked in the scores.
        v = jnp.where(pos_col < kv_limit, v, jnp.zeros_like(v))
        pp.online_softmax_update(m_ref, l_ref, acc_ref, scores, v)

    pp.PagePipeline(kv_hbm, tables_hbm, k_buf, v_buf, tbl_buf, kv_sems, tbl_sems,
                    seq=seq, page_begin=page_begin, page_end=page_end,
                    pages_per_chunk=pages_per_chunk).run(body)
    out, lse = pp.finalize(m_ref, l_ref, acc_ref)
    o_ref[...] = out
    lse_ref[...] = lse


def paged_attention(q, kv_cache, block_tables, context_lens, *, scale,
                    interpret=False, pages_per_compute_block=None,
                    pages_per_chunk=128, num_splits=1):
    """Decode attention through block tables (TPU kernel).

    Args:
      q:            [num_seqs, num_heads, head_dim]
      kv_cache:     [2, num_blocks, num_kv_heads, block_size, head_dim]
      block_tables: i32[num_seqs, max_blocks_per_seq]
      context_lens: i32[num_seqs]; attends to positions [0, context_len);
                    0 gives zeros.
      scale:        softmax scale.
      interpret:    True (CPU interpret mode), False, or a
                    pltpu.InterpretParams.
      pages_per_compute_block: pages per DMA group / matmul (default: 128
                    tokens' worth, at most the table width).
      pages_per_chunk: block-table entries per SMEM slice (x2 buffered).
      num_splits:   programs per sequence along the sequence axis.
    Returns:
      [num_seqs, num_heads, head_dim] in q's dtype.
    """
    num_blocks, num_kv_heads, block_size, head_dim = pp.check_pool(
        kv_cache, block_tables, context_lens)
    num_seqs, max_blocks = block_tables.shape
    if q.ndim != 3 or q.shape[0] != num_seqs or q.shape[2] != head_dim:
        raise ValueError(f"q must be [num_seqs={num_seqs}, num_heads, head_dim={head_dim}], "
                         f"got shape {q.shape}")
    num_heads = q.shape[1]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of "
                         f"num_kv_heads={num_kv_heads}")
    if not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits must be a positive int, got {num_splits!r}")
    if pages_per_compute_block is None:
        pages_per_compute_block = max(1, 128 // block_size)
    group, chunk = pp.page_tiling(max_blocks, pages_per_compute_block, pages_per_chunk)
    g = num_heads // num_kv_heads
    qg = q.astype(kv_cache.dtype).reshape(num_seqs, num_kv_heads, g, head_dim)

    kernel = functools.partial(_decode_kernel, scale=float(scale),
                               num_splits=num_splits, pages_per_chunk=chunk)
    state = [pltpu.VMEM((num_kv_heads, g, 1), jnp.float32),
             pltpu.VMEM((num_kv_heads, g, 1), jnp.float32),
             pltpu.VMEM((num_kv_heads, g, head_dim), jnp.float32)]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(num_seqs, num_splits),
        in_specs=[
            pl.BlockSpec((None, num_kv_heads, g, head_dim), lambda s, sp, lens: (s, 0, 0, 0)),
            pl.BlockSpec(memory_space=pl.ANY),
            pl.BlockSpec(memory_space=pl.ANY),
        ],
        out_specs=[
            pl.BlockSpec((None, None, num_kv_heads, g, head_dim),
                         lambda s, sp, lens: (sp, s, 0, 0, 0)),
            pl.BlockSpec((None, None, num_kv_heads, g, 1),
                         lambda s, sp, lens: (sp, s, 0, 0, 0)),
        ],
        scratch_shapes=pp.scratch_shapes(kv_cache.dtype, num_kv_heads, block_size,
                                         head_dim, group, chunk) + state,
    )
    out, lse = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=[
            jax.ShapeDtypeStruct((num_splits, num_seqs, num_kv_heads, g, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((num_splits, num_seqs, num_kv_heads, g, 1), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=pp.resolve_interpret(interpret),
        name="jpaged_paged_attention",
    )(context_lens.astype(jnp.int32), qg, kv_cache, block_tables.astype(jnp.int32))
    if num_splits == 1:
        merged = out[0]
    else:
        lse_max = jnp.max(lse, axis=0)
        lse_max = jnp.where(jnp.isfinite(lse_max), lse_max, 0.0)
        weight = jnp.exp(lse - lse_max)  # empty splits: exp(-inf) = 0
        denom = jnp.sum(weight, axis=0)
        merged = jnp.sum(weight * out, axis=0) / jnp.where(denom > 0, denom, 1.0)
    return merged.reshape(num_seqs, num_heads, head_dim).astype(q.dtype)
