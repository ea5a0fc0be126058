"""KV write for TPU (Pallas Mosaic backend): new K/V into their pool slots.

One DMA per token and per K/V, HBM to HBM: ``k[t]`` ([num_kv_heads,
head_dim]) goes to ``kv_cache[0, slot // block_size, :, slot % block_size]``
(a strided destination, one row per head). The pool is aliased to the output
(``input_output_aliases``), so under jit with the pool donated the write is
in place and nothing else of the pool moves.

Grid ``(num_token_blocks,)``, "parallel": each step gets its
``tokens_per_block`` slots as an SMEM block (so a long slot mapping never
has to fit in SMEM at once), issues all its DMAs, then waits for them.
Dropped, never written: slots outside ``[0, num_blocks * block_size)``
(padding) and slots in block 0, the null block.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.tpu._page_pipeline import resolve_interpret


def _write_kv_kernel(slots_ref,   # SMEM i32[tokens_per_block]
                     k_hbm,       # [num_tokens, Hkv, D]
                     v_hbm,       # [num_tokens, Hkv, D]
                     kv_in,       # [2, num_blocks, Hkv, block_size, D] (aliased)
                     kv_out,      # the same buffer
                     sems,        # DMA [2]
                     *, num_tokens):
    del kv_in
    tokens_per_block = slots_ref.shape[0]
    _, num_blocks, _, block_size, _ = kv_out.shape
    first = pl.program_id(0) * tokens_per_block

    def copies(t, slot):
        block_id, offset = slot // block_size, slot % block_size
        return [pltpu.make_async_copy(src.at[first + t], kv_out.at[kv, block_id, :, offset],
                                      sems.at[kv])
                for kv, src in ((0, k_hbm), (1, v_hbm))]

    def is_written(t, slot):
        return (first + t < num_tokens) & (slot >= block_size) & (slot < num_blocks * block_size)

    def start(t, carry):
        slot = slots_ref[t]

        @pl.when(is_written(t, slot))
        def _():
            for copy in copies(t, slot):
                copy.start()
        return carry

    def wait(t, carry):
        slot = slots_ref[t]

        @pl.when(is_written(t, slot))
        def _():
            for copy in copies(t, slot):
                copy.wait()
        return carry

    jax.lax.fori_loop(0, tokens_per_block, start, 0)
    jax.lax.fori_loop(0, tokens_per_block, wait, 0)


def write_kv(kv_cache, k, v, slot_mapping, *, interpret=False, tokens_per_block=128):
    """Scatters new keys and values into their pool slots (TPU kernel).

    Args:
      kv_cache:     [2, num_blocks, num_kv_heads, block_size, head_dim]
      k, v:         [num_tokens, num_kv_heads, head_dim] (cast to the pool dtype)
      slot_mapping: i32[num_tokens]; slots out of range or in block 0 are dropped.
      interpret:    True (CPU interpret mode), False, or a pltpu.InterpretParams.
      tokens_per_block: tokens (and SMEM slots) per grid step.
    Returns:
      the updated kv_cache (in place when donated under jit). If two tokens
      name one slot, which one lands is unspecified.
    """
    if kv_cache.ndim != 5 or kv_cache.shape[0] != 2:
        raise ValueError("kv_cache must be [2, num_blocks, num_kv_heads, block_size, "
                         f"head_dim], got shape {kv_cache.shape}")
    _, num_blocks, num_kv_heads, block_size, head_dim = kv_cache.shape
    expected = (slot_mapping.shape[0] if slot_mapping.ndim == 1 else -1,
                num_kv_heads, head_dim)
    for name, x in (("k", k), ("v", v)):
        if x.shape != expected:
            raise ValueError(f"{name} must be [num_tokens, num_kv_heads={num_kv_heads}, "
                             f"head_dim={head_dim}] matching slot_mapping "
                             f"{slot_mapping.shape}, got {x.shape}")
    if not isinstance(tokens_per_block, int) or tokens_per_block < 1:
        raise ValueError(f"tokens_per_block must be a positive int, got {tokens_per_block!r}")
    num_tokens = k.shape[0]
    if num_tokens == 0:
        return kv_cache
    tb = min(tokens_per_block, num_tokens)
    num_steps = pl.cdiv(num_tokens, tb)
    slots = slot_mapping.astype(jnp.int32)
    slots = jnp.pad(slots, (0, num_steps * tb - num_tokens),
                    constant_values=num_blocks * block_size)
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    return pl.pallas_call(
        functools.partial(_write_kv_kernel, num_tokens=num_tokens),
        grid=(num_steps,),
        in_specs=[pl.BlockSpec((tb,), lambda i: (i,), memory_space=pltpu.SMEM),
                  any_spec, any_spec, any_spec],
        out_specs=any_spec,
        out_shape=jax.ShapeDtypeStruct(kv_cache.shape, kv_cache.dtype),
        scratch_shapes=[pltpu.SemaphoreType.DMA((2,))],
        input_output_aliases={3: 0},
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=resolve_interpret(interpret),
        name="jpaged_write_kv",
    )(slots, k.astype(kv_cache.dtype), v.astype(kv_cache.dtype), kv_cache)
