"""Ragged (prefill / mixed) paged attention for TPU (Pallas Mosaic backend).

Sequences' new tokens are concatenated on one token axis; sequence s owns
tokens [query_start_loc[s], query_start_loc[s+1]) and its new token i sits at
position context_lens[s] - q_len + i: causal among the new tokens, full
attention to the cached prefix, all read through the block table. A batch may
mix prompts, prefix-cached prompts, chunks and single decode tokens.

Grid ``(num_token_blocks,)``: program i owns the ``q_block_size`` tokens
[i * bq, (i+1) * bq) and all heads, and writes exactly that output block. A
token block may span several sequences; the program loops over them (their
range per block is computed in jnp and scalar-prefetched with
``context_lens`` and ``query_start_loc``) and, for each, streams the pages
that its rows in this block can see, [0, ceil(last position + 1 / block_size)),
through the double-buffered page pipeline (block-table slices DMA'd into SMEM
per chunk, see ``_page_pipeline``). One online-softmax state per row covers
all sequences: a row masked for a sequence is left untouched by it.

q is laid out ``[Hkv, tokens * G, D]`` (row r of a block is token r // G,
query head r % G of the KV head), so each group is one batched matmul
``[Hkv, bq * G, D] x [Hkv, T, D]`` for any group size G (MHA: G = 1).

Known costs: a block shared by many short sequences (decode tokens) computes
bq * G rows per sequence (pure decode batches go to paged_attention instead);
the first page group of each (token block, sequence) pair is not prefetched
behind the previous pair's compute.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.tpu import _page_pipeline as pp


def _ragged_kernel(context_lens_ref,     # SMEM i32[num_seqs]
                   query_start_ref,      # SMEM i32[num_seqs + 1]
                   seq_begin_ref,        # SMEM i32[num_token_blocks]
                   seq_end_ref,          # SMEM i32[num_token_blocks]
                   q_ref,                # [Hkv, bq * G, D] pool dtype
                   kv_hbm,               # [2, num_blocks, Hkv, block_size, D]
                   tables_hbm,           # i32[num_seqs, max_blocks_per_seq]
                   o_ref,                # [Hkv, bq * G, D] out dtype
                   k_buf, v_buf, tbl_buf, kv_sems, tbl_sems,
                   m_ref, l_ref, acc_ref,
                   *, scale, q_block_size, num_queries_per_kv, pages_per_chunk):
    block = pl.program_id(0)
    block_size = k_buf.shape[3]
    max_blocks = tables_hbm.shape[1]
    rows = q_ref.shape[1]
    block_start = block * q_block_size
    token = block_start + jax.lax.broadcasted_iota(jnp.int32, (1, rows, 1), 1) // num_queries_per_kv

    pp.init_state(m_ref, l_ref, acc_ref)
    q = q_ref[...]

    def one_seq(seq, carry):
        start, end = query_start_ref[seq], query_start_ref[seq + 1]
        context_len = context_lens_ref[seq]
        q_len = end - start
        first_pos = context_len - q_len - start       # position = token + first_pos
        last_token = jnp.minimum(end, block_start + q_block_size) - 1
        kv_limit = jnp.minimum(last_token + first_pos + 1, context_len)
        num_pages = jnp.minimum(pl.cdiv(jnp.maximum(kv_limit, 0), block_size), max_blocks)
        kv_limit = jnp.minimum(kv_limit, num_pages * block_size)  # never past the table
        q_pos = token + first_pos                                  # [1, R, 1]
        is_mine = (token >= start) & (token < end)                 # [1, R, 1]

        def body(k, v, first_page):
            t = k.shape[1]
            kv_pos = first_page * block_size + jax.lax.broadcasted_iota(jnp.int32, (1, 1, t), 2)
            kv_pos_col = first_page * block_size + jax.lax.broadcasted_iota(jnp.int32, (1, t, 1), 1)
            scores = jnp.einsum("hrd,htd->hrt", q, k,
                                preferred_element_type=jnp.float32) * scale
            visible = is_mine & (kv_pos <= q_pos) & (kv_pos < kv_limit)
            scores = jnp.where(visible, scores, -jnp.inf)
            # NOTE: 0 * NaN is NaN: rows past what this block may see (stale
            # or never-written pages) must be zeroed, not only masked.
            v = jnp.where(kv_pos_col < kv_limit, v, jnp.zeros_like(v))
            pp.online_softmax_update(m_ref, l_ref, acc_ref, scores, v)

        @pl.when(q_len > 0)
        def _():
            pp.PagePipeline(kv_hbm, tables_hbm, k_buf, v_buf, tbl_buf, kv_sems,
                            tbl_sems, seq=seq, page_begin=0, page_end=num_pages,
                            pages_per_chunk=pages_per_chunk).run(body)
        return carry

    jax.lax.fori_loop(seq_begin_ref[block], seq_end_ref[block], one_seq, 0)
    out, _ = pp.finalize(m_ref, l_ref, acc_ref)
    o_ref[...] = out.astype(o_ref.dtype)


def ragged_paged_attention(q, kv_cache, block_tables, context_lens,
                           query_start_loc, *, scale, interpret=False,
                           q_block_size=32, pages_per_compute_block=None,
                           pages_per_chunk=128):
    """Prefill / mixed paged attention (TPU kernel).

    Args:
      q:               [num_tokens, num_heads, head_dim]
      kv_cache:        [2, num_blocks, num_kv_heads, block_size, head_dim];
                       the new tokens' K/V already written (write_kv first).
      block_tables:    i32[num_seqs, max_blocks_per_seq]
      context_lens:    i32[num_seqs], new tokens included.
      query_start_loc: i32[num_seqs + 1], non-decreasing, starts at 0.
      scale:           softmax scale.
      interpret:       True (CPU interpret mode), False, or a
                       pltpu.InterpretParams.
      q_block_size:    tokens per program (a multiple of 8).
      pages_per_compute_block: pages per DMA group / matmul (default: 128
                       tokens' worth, at most the table width).
      pages_per_chunk: block-table entries per SMEM slice (x2 buffered).
    Returns:
      [num_tokens, num_heads, head_dim] in q's dtype; tokens past
      query_start_loc[-1] get zeros.
    """
    num_blocks, num_kv_heads, block_size, head_dim = pp.check_pool(
        kv_cache, block_tables, context_lens)
    num_seqs, max_blocks = block_tables.shape
    if q.ndim != 3 or q.shape[2] != head_dim:
        raise ValueError(f"q must be [num_tokens, num_heads, head_dim={head_dim}], "
                         f"got shape {q.shape}")
    num_tokens, num_heads, _ = q.shape
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of "
                         f"num_kv_heads={num_kv_heads}")
    if query_start_loc.shape != (num_seqs + 1,):
        raise ValueError(f"query_start_loc must be [num_seqs + 1 = {num_seqs + 1}], "
                         f"got shape {query_start_loc.shape}")
    if not isinstance(q_block_size, int) or q_block_size < 8 or q_block_size % 8:
        raise ValueError(f"q_block_size must be a positive multiple of 8, got {q_block_size!r}")
    if pages_per_compute_block is None:
        pages_per_compute_block = max(1, 128 // block_size)
    group, chunk = pp.page_tiling(max_blocks, pages_per_compute_block, pages_per_chunk)
    g = num_heads // num_kv_heads
    bq = min(q_block_size, pl.cdiv(max(num_tokens, 1), 8) * 8)
    num_q_blocks = pl.cdiv(max(num_tokens, 1), bq)
    padded = num_q_blocks * bq

    qg = q.astype(kv_cache.dtype).reshape(num_tokens, num_kv_heads, g, head_dim)
    qg = jnp.pad(qg, ((0, padded - num_tokens), (0, 0), (0, 0), (0, 0)))
    qg = jnp.transpose(qg, (1, 0, 2, 3)).reshape(num_kv_heads, padded * g, head_dim)

    query_start_loc = query_start_loc.astype(jnp.int32)
    block_starts = jnp.arange(num_q_blocks, dtype=jnp.int32) * bq
    # Sequences overlapping token block i: those ending after its start and
    # starting before its end (zero-length ones in between are skipped).
    seq_begin = jnp.searchsorted(query_start_loc[1:], block_starts, side="right")
    seq_end = jnp.searchsorted(query_start_loc[:-1], block_starts + bq, side="left")

    kernel = functools.partial(_ragged_kernel, scale=float(scale), q_block_size=bq,
                               num_queries_per_kv=g, pages_per_chunk=chunk)
    rows = bq * g
    state = [pltpu.VMEM((num_kv_heads, rows, 1), jnp.float32),
             pltpu.VMEM((num_kv_heads, rows, 1), jnp.float32),
             pltpu.VMEM((num_kv_heads, rows, head_dim), jnp.float32)]
    q_spec = pl.BlockSpec((num_kv_heads, rows, head_dim), lambda i, *_: (0, i, 0))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4,
        grid=(num_q_blocks,),
        in_specs=[q_spec, pl.BlockSpec(memory_space=pl.ANY),
                  pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=q_spec,
        scratch_shapes=pp.scratch_shapes(kv_cache.dtype, num_kv_heads, block_size,
                                         head_dim, group, chunk) + state,
    )
    out = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((num_kv_heads, padded * g, head_dim), q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=pp.resolve_interpret(interpret),
        name="jpaged_ragged_paged_attention",
    )(context_lens.astype(jnp.int32), query_start_loc, seq_begin.astype(jnp.int32),
      seq_end.astype(jnp.int32), qg, kv_cache, block_tables.astype(jnp.int32))
    out = out.reshape(num_kv_heads, padded, g, head_dim)[:, :num_tokens]
    return jnp.transpose(out, (1, 0, 2, 3)).reshape(num_tokens, num_heads, head_dim)
