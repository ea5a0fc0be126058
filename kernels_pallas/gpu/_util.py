"""Small helpers shared by the GPU kernels (no kernel lives here)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as plgpu

LOG2E = 1.4426950408889634


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (Triton tensors need power-of-two shapes)."""
    return 1 << max(0, (int(n) - 1).bit_length())


def compiler_params(num_warps: int, num_stages: int):
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def dot_precision(dtype):
    # NOTE: Triton's default float32 dot is tf32 (~3e-4 relative error);
    # float32 pools ask for full precision, bf16/f16 use the tensor cores as is.
    return (jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32
            else jax.lax.Precision.DEFAULT)


def check_pool(kv_cache):
    if kv_cache.ndim != 5 or kv_cache.shape[0] != 2:
        raise ValueError(
            "kv_cache must be [2, num_blocks, num_kv_heads, block_size, head_dim], "
            f"got shape {kv_cache.shape}")


def check_attention(q, kv_cache):
    """Checks q [..., num_heads, head_dim] against the pool; GQA groups must divide."""
    check_pool(kv_cache)
    num_heads, head_dim = q.shape[-2:]
    _, _, num_kv_heads, _, kv_dim = kv_cache.shape
    if kv_dim != head_dim:
        raise ValueError(f"q head_dim {head_dim} != kv_cache head_dim {kv_dim}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of "
                         f"num_kv_heads {num_kv_heads}")
