"""Block copy for GPU (Pallas, Triton backend): the copy-on-write copies of a
step in one launch.

A block of one of K/V is a contiguous run of num_kv_heads * block_size *
head_dim elements in the pool, so the pool is viewed as
[2, num_blocks, block_elems] (a free reshape) and program (copy, k_or_v)
streams that run from src to dst in power-of-two chunks. Pairs with dst 0
(padding) or dst out of range are skipped.

NOTE: the copies of a step read their sources while others write; this is
safe because copy-on-write destinations are freshly allocated blocks, never
the source of another copy in the same step (the block manager's invariant).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels_pallas.gpu._util import check_pool, compiler_params, next_pow2


def _copy_kernel(src_ref,    # i32[num_copies]
                 dst_ref,    # i32[num_copies]
                 pool_in,    # [2, num_blocks, block_elems] (aliased)
                 pool_ref,   # same buffer
                 *, num_blocks, block_elems, chunk):
    del pool_in
    c, kv = pl.program_id(0), pl.program_id(1)
    src = jnp.clip(src_ref[c], 0, num_blocks - 1)
    dst = dst_ref[c]
    ok = (dst > 0) & (dst < num_blocks)
    dst = jnp.where(ok, dst, 0)

    def body(i, _):
        e = i * chunk + jnp.arange(chunk)
        m = e < block_elems
        x = plgpu.load(pool_ref.at[kv, src, e], mask=m, other=0)
        plgpu.store(pool_ref.at[kv, dst, e], x, mask=m & ok)
        return 0

    jax.lax.fori_loop(0, pl.cdiv(block_elems, chunk), body, 0)


@functools.partial(jax.jit, static_argnames=("interpret", "chunk", "num_warps"))
def copy_blocks(kv_cache, src_ids, dst_ids, *, interpret=False, chunk=None,
                num_warps=None):
    """Copies kv_cache[:, src] to kv_cache[:, dst] for every pair.

    Args:
      kv_cache:         [2, num_blocks, num_kv_heads, block_size, head_dim]
      src_ids, dst_ids: i32[num_copies]; pairs with dst 0 are padding.
      interpret:        Pallas interpret mode (CPU).
      chunk:            elements per inner step (power of two; None: 4096).
    Returns:
      the updated kv_cache.
    """
    check_pool(kv_cache)
    if src_ids.shape != dst_ids.shape or src_ids.ndim != 1:
        raise ValueError(f"src_ids and dst_ids must be equal-length 1-D arrays, "
                         f"got {src_ids.shape} and {dst_ids.shape}")
    num_copies = src_ids.shape[0]
    if num_copies == 0:
        return kv_cache
    shape = kv_cache.shape
    num_blocks = shape[1]
    block_elems = shape[2] * shape[3] * shape[4]
    chunk = chunk or min(4096, next_pow2(block_elems))
    kernel = functools.partial(_copy_kernel, num_blocks=num_blocks,
                               block_elems=block_elems, chunk=chunk)
    flat = kv_cache.reshape(2, num_blocks, block_elems)
    out = pl.pallas_call(
        kernel, grid=(num_copies, 2),
        out_shape=jax.ShapeDtypeStruct(flat.shape, flat.dtype),
        input_output_aliases={2: 0},
        compiler_params=compiler_params(num_warps or 4, 2),
        interpret=interpret, name="jpaged_copy_blocks",
    )(src_ids.astype(jnp.int32), dst_ids.astype(jnp.int32), flat)
    return out.reshape(shape)
