"""Copy-on-write block copies for TPU (Pallas Mosaic backend).

All copies of a step in one pallas_call: one HBM-to-HBM DMA per pair moves
``kv_cache[:, src]`` (K and V of every head, ``[2, num_kv_heads, block_size,
head_dim]``) onto ``kv_cache[:, dst]``. The pool is aliased to the output
(``input_output_aliases``), so with the pool donated only the destination
blocks are written.

Grid ``(num_copy_blocks,)``: each step gets ``copies_per_block`` pairs as SMEM
blocks, starts all their DMAs, then waits for them. Pairs with dst 0 (padding),
or with an id outside ``[0, num_blocks)``, are skipped.

NOTE: the DMAs of a step run concurrently, so no dst may be another pair's
src in the same call. Copy-on-write guarantees it (a src is a shared block, a
dst a freshly allocated one).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.tpu._page_pipeline import resolve_interpret


def _copy_blocks_kernel(src_ref,    # SMEM i32[copies_per_block]
                        dst_ref,    # SMEM i32[copies_per_block]
                        kv_in,      # [2, num_blocks, Hkv, block_size, D] (aliased)
                        kv_out,     # the same buffer
                        sem):       # DMA semaphore
    del kv_in
    num_blocks = kv_out.shape[1]

    def copy(src, dst):
        return pltpu.make_async_copy(kv_out.at[:, src], kv_out.at[:, dst], sem)

    def is_copied(src, dst):
        return (dst > 0) & (dst < num_blocks) & (src >= 0) & (src < num_blocks)

    def start(i, carry):
        src, dst = src_ref[i], dst_ref[i]

        @pl.when(is_copied(src, dst))
        def _():
            copy(src, dst).start()
        return carry

    def wait(i, carry):
        src, dst = src_ref[i], dst_ref[i]

        @pl.when(is_copied(src, dst))
        def _():
            copy(src, dst).wait()
        return carry

    jax.lax.fori_loop(0, src_ref.shape[0], start, 0)
    jax.lax.fori_loop(0, src_ref.shape[0], wait, 0)


def copy_blocks(kv_cache, src_ids, dst_ids, *, interpret=False, copies_per_block=64):
    """Copies whole blocks of one layer's pool, all pairs in one launch (TPU).

    Args:
      kv_cache: [2, num_blocks, num_kv_heads, block_size, head_dim]
      src_ids, dst_ids: i32[num_copies]; pairs with dst 0 are padding and
                skipped. No dst may be a src of the same call.
      interpret: True (CPU interpret mode), False, or a pltpu.InterpretParams.
      copies_per_block: pairs (and SMEM entries) per grid step.
    Returns:
      the updated kv_cache (in place when donated under jit).
    """
    if kv_cache.ndim != 5 or kv_cache.shape[0] != 2:
        raise ValueError("kv_cache must be [2, num_blocks, num_kv_heads, block_size, "
                         f"head_dim], got shape {kv_cache.shape}")
    if src_ids.ndim != 1 or src_ids.shape != dst_ids.shape:
        raise ValueError("src_ids and dst_ids must be i32[num_copies] of one length, "
                         f"got {src_ids.shape} and {dst_ids.shape}")
    if not isinstance(copies_per_block, int) or copies_per_block < 1:
        raise ValueError(f"copies_per_block must be a positive int, got {copies_per_block!r}")
    num_copies = src_ids.shape[0]
    if num_copies == 0:
        return kv_cache
    cb = min(copies_per_block, num_copies)
    num_steps = pl.cdiv(num_copies, cb)
    pad = num_steps * cb - num_copies
    src = jnp.pad(src_ids.astype(jnp.int32), (0, pad))
    dst = jnp.pad(dst_ids.astype(jnp.int32), (0, pad))  # dst 0: skipped
    ids_spec = pl.BlockSpec((cb,), lambda i: (i,), memory_space=pltpu.SMEM)
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    return pl.pallas_call(
        _copy_blocks_kernel,
        grid=(num_steps,),
        in_specs=[ids_spec, ids_spec, any_spec],
        out_specs=any_spec,
        out_shape=jax.ShapeDtypeStruct(kv_cache.shape, kv_cache.dtype),
        scratch_shapes=[pltpu.SemaphoreType.DMA(())],
        input_output_aliases={2: 0},
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
        interpret=resolve_interpret(interpret),
        name="jpaged_copy_blocks",
    )(src, dst, kv_cache)
