"""KV write for GPU (Pallas, Triton backend): scatter new K/V into the pool.

One program per new token writes that token's K and V rows of every KV head
([num_kv_heads, head_dim] each) into slot ``slot_mapping[t]``. The pool is
aliased to the output, so under jit with the pool donated only the new rows
move. Out-of-range slots (padding: the runner uses num_blocks * block_size;
negative values too) and slots in block 0, the null block, are masked off:
nothing is written, nothing wraps around.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels_pallas.gpu._util import check_pool, compiler_params, next_pow2


def _write_kv_kernel(slot_ref,   # i32[num_tokens]
                     k_ref,      # [num_tokens, num_kv_heads, head_dim]
                     v_ref,      # [num_tokens, num_kv_heads, head_dim]
                     kv_in_ref,  # [2, num_blocks, num_kv_heads, block_size, head_dim] (aliased)
                     kv_ref,     # same buffer as kv_in_ref
                     *, num_slots, block_size, num_kv_heads, head_dim,
                     heads_pad, dim_pad):
    del kv_in_ref
    t = pl.program_id(0)
    slot = slot_ref[t]
    ok = (slot >= block_size) & (slot < num_slots)  # block 0 (null) is never written
    slot = jnp.where(ok, slot, 0)
    blk, off = slot // block_size, slot % block_size
    h = jnp.arange(heads_pad)
    d = jnp.arange(dim_pad)
    src_mask = (h < num_kv_heads)[:, None] & (d < head_dim)[None, :]
    h_c = jnp.minimum(h, num_kv_heads - 1)[:, None]
    k = plgpu.load(k_ref.at[t, h_c, d[None, :]], mask=src_mask, other=0)
    v = plgpu.load(v_ref.at[t, h_c, d[None, :]], mask=src_mask, other=0)
    # NOTE: padded heads keep distinct (out-of-range, masked) indices.
    dst_mask = src_mask & ok
    plgpu.store(kv_ref.at[0, blk, h[:, None], off, d[None, :]],
                k.astype(kv_ref.dtype), mask=dst_mask)
    plgpu.store(kv_ref.at[1, blk, h[:, None], off, d[None, :]],
                v.astype(kv_ref.dtype), mask=dst_mask)


@functools.partial(jax.jit, static_argnames=("interpret", "num_warps"))
def write_kv(kv_cache, k, v, slot_mapping, *, interpret=False, num_warps=None):
    """Scatters new keys and values into their pool slots.

    Args:
      kv_cache:     [2, num_blocks, num_kv_heads, block_size, head_dim]
      k, v:         [num_tokens, num_kv_heads, head_dim]
      slot_mapping: i32[num_tokens]; slots outside
                    [block_size, num_blocks * block_size) are dropped (block 0
                    is the null block).
      interpret:    Pallas interpret mode (CPU).
    Returns:
      the updated kv_cache (in place when the pool is donated).
    """
    check_pool(kv_cache)
    _, num_blocks, num_kv_heads, block_size, head_dim = kv_cache.shape
    num_tokens = k.shape[0]
    if k.shape != (num_tokens, num_kv_heads, head_dim) or v.shape != k.shape:
        raise ValueError(f"k and v must be [num_tokens, {num_kv_heads}, {head_dim}]; "
                         f"got {k.shape} and {v.shape}")
    if slot_mapping.shape != (num_tokens,):
        raise ValueError(f"slot_mapping must be [{num_tokens}], got {slot_mapping.shape}")
    if num_tokens == 0:
        return kv_cache
    kernel = functools.partial(
        _write_kv_kernel, num_slots=num_blocks * block_size, block_size=block_size,
        num_kv_heads=num_kv_heads, head_dim=head_dim,
        heads_pad=next_pow2(num_kv_heads), dim_pad=max(16, next_pow2(head_dim)))
    return pl.pallas_call(
        kernel, grid=(num_tokens,),
        out_shape=jax.ShapeDtypeStruct(kv_cache.shape, kv_cache.dtype),
        input_output_aliases={3: 0},
        compiler_params=compiler_params(num_warps or 4, 1),
        interpret=interpret, name="jpaged_write_kv",
    )(slot_mapping.astype(jnp.int32), k, v, kv_cache)
