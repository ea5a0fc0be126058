"""Ragged (prefill / mixed) paged attention for Hopper (Pallas, Mosaic GPU).

Same contract as ``ragged_paged_attention.py`` (the Triton-backend kernel),
built on the Hopper units Triton's Pallas lowering cannot reach: wgmma
tensor-core matmuls with operands in swizzled shared memory, and TMA copies
tracked by mbarriers.

Algorithm (one CUDA block = one warpgroup = one (query tile, KV head)):

1. The flat token axis is cut into query tiles of ``block_q`` tokens that
   never straddle two sequences (the tile table of the Triton kernel,
   imported from it). The tile stacks the GQA group of its KV head on the
   row axis, head-major: row ``g * block_q + t`` is token ``t`` of query
   head ``kv_head * group + g``, so ``rows = block_q * group_pad = 64`` (one
   wgmma M) and every KV tile feeds the whole group. One TMA copy per head
   brings its [block_q, head_dim] slab of q into SMEM (plain: a tiled copy
   needs an 8-row-aligned GMEM offset), restored swizzled for wgmma.
2. The KV walk goes over tiles of ``block_kv`` tokens. A tile is
   ``block_kv / block_size`` pages; each page of one KV head is a contiguous
   [block_size, head_dim] run, so the block table (read as scalars from
   GMEM) drives one TMA copy per page, for K and for V, into
   ``num_stages`` ring buffers; a K and a V mbarrier per buffer count the
   page copies. Copies for tile ``i + num_stages`` are issued as soon as
   tile ``i`` is consumed, so the TMA engine works ahead of the tensor cores.
   Pages past the context are copied too (their block ids are clamped
   into the table, so in bounds) and masked like the rest.
3. Per KV tile: S = Q K^T (wgmma, f32 accumulator in registers), online
   softmax in base 2, O = O * alpha + P V (wgmma with P from registers, or
   from SMEM in interpret mode, whose wgmma reads SMEM operands only; P V
   goes to a fresh accumulator added to O, as interpret mode has no
   pl.run_state).
   Tiles entirely at or before the tile's first query position need no mask;
   only the diagonal tiles mask causally, and there V rows past the
   context are zeroed in SMEM first (block 0, stale blocks and page tails
   may hold NaN, and 0 * NaN is NaN even where P is 0).
4. The output goes through an unswizzled SMEM buffer to GMEM by TMA: one
   copy per head for a full tile, one copy per (token, head) row for the
   last, partial tile of a sequence (so a tile never writes the next
   sequence's tokens). Padding tokens (past query_start_loc[-1]) belong to
   tiles with no KV and get zeros.

Limits (ValueError otherwise; the caller can fall back to the Triton kernel):
q and the pool bf16 or f16, head_dim 64 or 128, block_size a multiple of 8
that divides block_kv, GQA group <= 8.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels_pallas.gpu._util import LOG2E, check_attention, next_pow2
from kernels_pallas.gpu.ragged_paged_attention import check_ragged_metadata, tile_table

ROWS = 64  # query rows of a tile: the M of one warpgroup's wgmma
SWIZZLE = 128  # bytes; a swizzled row segment of 64 bf16 values


def _ragged_mgpu_kernel(
        tile_seq_ref,         # i32[num_tiles] sequence of a tile (num_seqs: padding)
        tile_start_ref,       # i32[num_tiles] first flat token of a tile
        query_start_loc_ref,  # i32[num_seqs + 1]
        block_tables_ref,     # i32[num_seqs, max_blocks_per_seq]
        context_lens_ref,     # i32[num_seqs]
        q_ref,                # [num_tokens, num_heads, head_dim]
        kv_ref,               # [2, num_blocks, num_kv_heads, block_size, head_dim]
        o_ref,                # [num_tokens, num_heads, head_dim]
        q_smem,               # [ROWS, head_dim] tiled + swizzled
        k_smem,               # [num_stages, block_kv, head_dim] tiled + swizzled
        v_smem,               # [num_stages, block_kv, head_dim] tiled + swizzled
        o_smem,               # [ROWS, head_dim] plain (row-sliceable): q in, then out
        q_barrier,            # 1 barrier, group arrivals
        k_barriers,           # num_stages barriers, pages_per_tile arrivals
        v_barriers,           # num_stages barriers, pages_per_tile arrivals
        p_smem,               # [ROWS, block_kv] tiled + swizzled, or None: P stays in registers
        *, scale, group, num_seqs, num_tokens, head_dim, block_q, block_size,
        block_kv, max_blocks, num_stages):
    tile, kv_head = lax.axis_index("tile"), lax.axis_index("kv_head")
    dtype = q_smem.dtype
    pages_per_tile = block_kv // block_size
    seq = tile_seq_ref[tile]
    is_pad = seq >= num_seqs
    seq_c = jnp.minimum(seq, num_seqs - 1)
    tile_start = tile_start_ref[tile]
    seq_start = query_start_loc_ref[seq_c]
    q_end = jnp.where(is_pad, num_tokens, query_start_loc_ref[seq_c + 1])
    context_len = context_lens_ref[seq_c]
    pos0 = context_len - (q_end - seq_start)  # position of the first new token
    num_valid = jnp.clip(q_end - tile_start, 0, block_q)  # tokens this tile owns
    first_pos = pos0 + (tile_start - seq_start)
    last_pos = first_pos + num_valid - 1
    num_kv = jnp.where(is_pad | (num_valid == 0), 0, jnp.maximum(last_pos + 1, 0))
    num_kv_tiles = (num_kv + block_kv - 1) // block_kv
    num_full = jnp.clip((first_pos + 1) // block_kv, 0, num_kv_tiles)

    def issue_kv(i, slot):
        """Starts the page copies of KV tile i into buffer slot."""
        for p in range(pages_per_tile):
            page = i * pages_per_tile + p
            block_id = block_tables_ref[seq_c, jnp.minimum(page, max_blocks - 1)]
            rows = pl.ds(p * block_size, block_size)
            plgpu.copy_gmem_to_smem(kv_ref.at[0, block_id, kv_head],
                                    k_smem.at[slot, rows], k_barriers.at[slot])
            plgpu.copy_gmem_to_smem(kv_ref.at[1, block_id, kv_head],
                                    v_smem.at[slot, rows], v_barriers.at[slot])

    @pl.when(num_valid > 0)
    def _tile():
        # NOTE: a tiled TMA copy needs its GMEM row offset to be a multiple
        # of the tile's 8 rows, and a query tile starts anywhere; so q lands
        # in the plain o_smem first and is re-stored swizzled from registers.
        for g in range(group):
            plgpu.copy_gmem_to_smem(
                q_ref.at[pl.ds(tile_start, block_q), kv_head * group + g],
                o_smem.at[pl.ds(g * block_q, block_q)], q_barrier)
        for s in range(num_stages):
            pl.when(s < num_kv_tiles)(functools.partial(issue_kv, s, s))
        plgpu.barrier_wait(q_barrier)
        q_smem[...] = plgpu.load(o_smem, layout=plgpu.Layout.WGMMA, optimized=False)
        plgpu.commit_smem()

        qk_scale = scale * LOG2E
        wgmma = plgpu.Layout.WGMMA
        # row r is token r % block_q of its head; its causal limit:
        row_pos = first_pos + lax.rem(
            plgpu.broadcasted_iota(jnp.int32, (ROWS, block_kv), 0, layout=wgmma),
            block_q)
        col = plgpu.broadcasted_iota(jnp.int32, (ROWS, block_kv), 1, layout=wgmma)
        v_row = plgpu.broadcasted_iota(jnp.int32, (block_kv, head_dim), 0, layout=wgmma)

        def step(i, carry, masked):
            acc, m, l = carry
            slot = lax.rem(i, num_stages)
            plgpu.barrier_wait(k_barriers.at[slot])

            def qk(acc_ref):
                plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].T)
                return acc_ref[...]
            s = pl.run_scoped(qk, plgpu.ACC((ROWS, block_kv), jnp.float32)) * qk_scale
            if masked:
                s = jnp.where(i * block_kv + col <= row_pos, s, -jnp.inf)
            # NOTE: a row that owns a token sees KV tile 0 (position 0) first,
            # and tile 0 never masks all of it, so m is finite from then on.
            m_new = jnp.maximum(m, s.max(axis=1))
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
            l = l * alpha + p.sum(axis=1)
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            plgpu.barrier_wait(v_barriers.at[slot])
            if masked:
                v_tile = v_smem.at[slot]
                v = v_tile[...]
                v_tile[...] = jnp.where(i * block_kv + v_row < num_kv, v,
                                        jnp.zeros_like(v))
                plgpu.commit_smem()  # the generic-proxy stores, before wgmma reads

            if p_smem is None:
                p_lhs = p.astype(dtype)
            else:
                p_smem[...] = p.astype(dtype)
                plgpu.commit_smem()
                p_lhs = p_smem

            def pv(acc_ref):
                plgpu.wgmma(acc_ref, p_lhs, v_smem.at[slot])
                return acc_ref[...]
            # NOTE: a fresh accumulator plus an add, not pl.run_state on acc:
            # GPU interpret mode does not handle run_state (jax 0.11.2).
            acc = acc + pl.run_scoped(pv, plgpu.ACC((ROWS, head_dim), jnp.float32))

            @pl.when(i + num_stages < num_kv_tiles)
            def _():
                issue_kv(i + num_stages, slot)
            return acc, m_new, l

        carry = (plgpu.layout_cast(jnp.zeros((ROWS, head_dim), jnp.float32), wgmma),
                 plgpu.layout_cast(jnp.full((ROWS,), -jnp.inf, jnp.float32), wgmma.reduce(1)),
                 plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), wgmma.reduce(1)))
        carry = lax.fori_loop(0, num_full, functools.partial(step, masked=False), carry)
        carry = lax.fori_loop(num_full, num_kv_tiles, functools.partial(step, masked=True),
                              carry)
        acc, _, l = carry
        l = jnp.where(l > 0, l, jnp.ones_like(l))
        o_smem[...] = (acc / lax.broadcast_in_dim(l, acc.shape, [0])).astype(dtype)
        plgpu.commit_smem()

        @pl.when(num_valid == block_q)
        def _full():
            for g in range(group):
                plgpu.copy_smem_to_gmem(
                    o_smem.at[pl.ds(g * block_q, block_q)],
                    o_ref.at[pl.ds(tile_start, block_q), kv_head * group + g])

        @pl.when(num_valid < block_q)
        def _partial():
            @pl.loop(0, num_valid)
            def _(t):
                for g in range(group):
                    plgpu.copy_smem_to_gmem(
                        o_smem.at[pl.ds(g * block_q + t, 1)],
                        o_ref.at[pl.ds(tile_start + t, 1), kv_head * group + g])
        plgpu.wait_smem_to_gmem(0)


def _check_supported(q, kv_cache, block_kv):
    """Raises ValueError when this kernel cannot run these shapes."""
    check_attention(q, kv_cache)
    num_heads, head_dim = q.shape[-2:]
    _, _, num_kv_heads, block_size, _ = kv_cache.shape
    for name, x in (("q", q), ("kv_cache", kv_cache)):
        if jnp.dtype(x.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            raise ValueError(f"the Mosaic GPU ragged kernel takes bf16/f16 only; {name} is "
                             f"{x.dtype} (use the Triton kernel for float32)")
    if q.dtype != kv_cache.dtype:
        raise ValueError(f"q ({q.dtype}) and kv_cache ({kv_cache.dtype}) dtypes differ")
    if head_dim not in (64, 128):
        raise ValueError(f"the Mosaic GPU ragged kernel takes head_dim 64 or 128, got {head_dim}")
    if block_kv not in (64, 128):
        raise ValueError(f"block_kv must be 64 or 128, got {block_kv}")
    if block_size % 8 or block_kv % block_size:
        raise ValueError(f"block_size must be a multiple of 8 dividing block_kv={block_kv}, "
                         f"got {block_size}")
    if next_pow2(num_heads // num_kv_heads) > ROWS // 8:
        raise ValueError(f"GQA group {num_heads // num_kv_heads} > {ROWS // 8} is not supported")


def supports(q, kv_cache, block_kv: int = 64) -> bool:
    """Whether this kernel takes these shapes and dtypes (the facade falls
    back to the Triton kernel where it does not)."""
    try:
        _check_supported(q, kv_cache, block_kv)
    except ValueError:
        return False
    return True


@functools.partial(jax.jit, static_argnames=(
    "scale", "interpret", "block_kv", "num_stages", "p_via_smem"))
def ragged_paged_attention(q, kv_cache, block_tables, context_lens,
                           query_start_loc, *, scale, interpret=False,
                           block_kv=64, num_stages=2, p_via_smem=None):
    """Prefill / mixed attention through block tables (contract: the facade).

    Args:
      q:               [num_tokens, num_heads, head_dim] bf16 or f16
      kv_cache:        [2, num_blocks, num_kv_heads, block_size, head_dim], q's dtype
      block_tables:    i32[num_seqs, max_blocks_per_seq]
      context_lens:    i32[num_seqs]
      query_start_loc: i32[num_seqs + 1]
      scale:           softmax scale.
      interpret:       Mosaic GPU interpret mode (CPU): True, or an
                       ``plgpu.InterpretGPUParams``.
      block_kv:        KV tokens per inner step (64 or 128).
      num_stages:      KV tiles in flight (SMEM ring buffers, >= 1). With
                       head_dim 128 and block_kv 64, 2 stages take 96 KiB of
                       SMEM (two CTAs per SM), 3 take 128 KiB (one).
      p_via_smem:      feed P to the PV wgmma from SMEM instead of registers
                       (None: only in interpret mode, which needs it).
    Returns:
      [num_tokens, num_heads, head_dim] in q's dtype.
    Raises:
      ValueError: shapes or dtypes this kernel does not take (see the module
        docstring); the Triton kernel takes them all.
    """
    _check_supported(q, kv_cache, block_kv)
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    num_tokens, num_heads, head_dim = q.shape
    _, _, num_kv_heads, block_size, _ = kv_cache.shape
    num_seqs, max_blocks = block_tables.shape
    check_ragged_metadata(block_tables, context_lens, query_start_loc)
    group = num_heads // num_kv_heads
    block_q = ROWS // next_pow2(group)
    qsl, tile_seq, tile_start, num_tiles = tile_table(query_start_loc, num_tokens, block_q)

    elems = SWIZZLE // jnp.dtype(q.dtype).itemsize  # a swizzled row: 64 values
    transforms = (plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(SWIZZLE))
    pages_per_tile = block_kv // block_size
    scratch = [
        plgpu.SMEM((ROWS, head_dim), q.dtype, transforms=transforms),
        plgpu.SMEM((num_stages, block_kv, head_dim), q.dtype, transforms=transforms),
        plgpu.SMEM((num_stages, block_kv, head_dim), q.dtype, transforms=transforms),
        plgpu.SMEM((ROWS, head_dim), q.dtype),
        plgpu.Barrier(num_arrivals=group),
        plgpu.Barrier(num_arrivals=pages_per_tile, num_barriers=num_stages),
        plgpu.Barrier(num_arrivals=pages_per_tile, num_barriers=num_stages),
    ]
    if p_via_smem is None:
        p_via_smem = bool(interpret)  # the interpreter's wgmma reads SMEM operands only
    scratch.append(plgpu.SMEM((ROWS, block_kv), q.dtype, transforms=transforms)
                   if p_via_smem else None)
    if interpret is True:
        # NOTE: a sequence's last tile may read q rows past num_tokens; the
        # TMA unit fills them with zeros, the interpreter must be told to.
        interpret = plgpu.InterpretGPUParams(out_of_bounds_reads="uninitialized",
                                             uninitialized_memory="zero")
    kernel = functools.partial(
        _ragged_mgpu_kernel, scale=float(scale), group=group, num_seqs=num_seqs,
        num_tokens=num_tokens, head_dim=head_dim, block_q=block_q,
        block_size=block_size, block_kv=block_kv, max_blocks=max_blocks,
        num_stages=num_stages)
    return plgpu.kernel(
        kernel, out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch_types=scratch, grid=(num_tiles, num_kv_heads),
        grid_names=("tile", "kv_head"), interpret=interpret or None,
        kernel_name="jpaged_ragged_paged_attention_mgpu",
    )(tile_seq, tile_start, qsl, block_tables.astype(jnp.int32),
      context_lens.astype(jnp.int32), q, kv_cache)
