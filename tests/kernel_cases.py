"""Shared kernel test cases: random paged pools with NaN-filled stale blocks.

Used by tests/kernels/test_kernels_gpu.py (CPU, interpret mode) and by
scripts/bench_kernels.py (the same cases on the GPU before it benchmarks);
the TPU tests may import it read-only. Pure numpy + jnp, no pytest.
"""
from __future__ import annotations

import numpy as np
import jax.numpy as jnp

# Max |out - ref| allowed, per storage dtype (the reference computes in f32;
# bf16 outputs are rounded to 8 mantissa bits, and the kernels feed bf16
# probabilities to the P @ V product).
ATOL = {"float32": 2e-5, "bfloat16": 2e-2}
RTOL = {"float32": 2e-5, "bfloat16": 2e-2}
# On the GPU float32 dots may differ in summation order from XLA's.
GPU_ATOL = {"float32": 2e-4, "bfloat16": 3e-2}


def _fill_pool(rng, num_blocks, num_kv_heads, block_size, head_dim, tables, lens):
    """Random pool; every slot no sequence may read is NaN (block 0, unused
    blocks, and the tail of each sequence's last block)."""
    pool = rng.standard_normal((2, num_blocks, num_kv_heads, block_size, head_dim))
    readable = np.zeros((num_blocks, block_size), bool)
    for table, n in zip(tables, lens):
        for t in range(n):
            readable[table[t // block_size], t % block_size] = True
    pool.transpose(0, 1, 3, 2, 4)[:, ~readable] = np.nan  # a view: writes the pool
    return pool


def make_tables(rng, lens, block_size, max_blocks, num_blocks):
    """Randomly permuted block tables: distinct physical blocks >= 1; unused
    entries 0 (the null block)."""
    need = sum(-(-n // block_size) for n in lens)
    if need > num_blocks - 1:
        raise ValueError(f"pool of {num_blocks} blocks too small for {need}")
    ids = rng.permutation(np.arange(1, num_blocks))[:need]
    tables = np.zeros((len(lens), max_blocks), np.int32)
    used = 0
    for s, n in enumerate(lens):
        nb = -(-n // block_size)
        tables[s, :nb] = ids[used:used + nb]
        used += nb
    return tables


def decode_case(seed, *, lens, num_heads, num_kv_heads, head_dim, block_size,
                dtype, extra_blocks=3, max_blocks=None):
    """Inputs of paged_attention: dict(q, kv_cache, block_tables, context_lens, scale)."""
    rng = np.random.default_rng(seed)
    max_blocks = max_blocks or max(1, max(-(-n // block_size) for n in lens))
    num_blocks = 1 + sum(-(-n // block_size) for n in lens) + extra_blocks
    tables = make_tables(rng, lens, block_size, max_blocks, num_blocks)
    pool = _fill_pool(rng, num_blocks, num_kv_heads, block_size, head_dim, tables, lens)
    q = rng.standard_normal((len(lens), num_heads, head_dim))
    return dict(q=jnp.asarray(q, dtype), kv_cache=jnp.asarray(pool, dtype),
                block_tables=jnp.asarray(tables),
                context_lens=jnp.asarray(lens, jnp.int32), scale=head_dim ** -0.5)


def ragged_case(seed, *, q_lens, ctx_lens, num_tokens, num_heads, num_kv_heads,
                head_dim, block_size, dtype, extra_blocks=3):
    """Inputs of ragged_paged_attention. Sequences with 0 new tokens must come
    last (padding: context 0); tokens past sum(q_lens) are padding."""
    assert num_tokens >= sum(q_lens)
    # (context 0 under new tokens: rows that attend to nothing, output 0)
    assert all(c >= q or c == 0 for q, c in zip(q_lens, ctx_lens))
    rng = np.random.default_rng(seed)
    max_blocks = max(1, max(-(-n // block_size) for n in ctx_lens))
    num_blocks = 1 + sum(-(-n // block_size) for n in ctx_lens) + extra_blocks
    tables = make_tables(rng, ctx_lens, block_size, max_blocks, num_blocks)
    pool = _fill_pool(rng, num_blocks, num_kv_heads, block_size, head_dim, tables, ctx_lens)
    q = rng.standard_normal((num_tokens, num_heads, head_dim))
    qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    return dict(q=jnp.asarray(q, dtype), kv_cache=jnp.asarray(pool, dtype),
                block_tables=jnp.asarray(tables),
                context_lens=jnp.asarray(ctx_lens, jnp.int32),
                query_start_loc=jnp.asarray(qsl), scale=head_dim ** -0.5)


# (name, kwargs) pairs; small so interpret mode stays fast. Lengths cover 0,
# 1, non-multiples of the block size and full tables.
DECODE_CASES = [
    ("gqa4_hd128_bs16_f32", dict(lens=[0, 1, 37, 64], num_heads=8, num_kv_heads=2,
                                 head_dim=128, block_size=16, dtype="float32")),
    ("gqa4_hd128_bs16_bf16", dict(lens=[1, 16, 50, 64], num_heads=8, num_kv_heads=2,
                                  head_dim=128, block_size=16, dtype="bfloat16")),
    ("smollm_9_3_hd64_bs8_f32", dict(lens=[0, 7, 9, 40], num_heads=9, num_kv_heads=3,
                                     head_dim=64, block_size=8, dtype="float32")),
    ("smollm_9_3_hd64_bs32_bf16", dict(lens=[33, 1, 96], num_heads=9, num_kv_heads=3,
                                       head_dim=64, block_size=32, dtype="bfloat16")),
    ("mha_hd80_bs8_f32", dict(lens=[3, 0, 24, 29], num_heads=4, num_kv_heads=4,
                              head_dim=80, block_size=8, dtype="float32")),
    ("mha_hd80_bs16_bf16", dict(lens=[17, 1, 48], num_heads=4, num_kv_heads=4,
                                head_dim=80, block_size=16, dtype="bfloat16")),
    ("mha_hd64_bs32_f32", dict(lens=[64, 31, 0], num_heads=2, num_kv_heads=2,
                               head_dim=64, block_size=32, dtype="float32")),
    ("gqa8_hd80_bs32_bf16", dict(lens=[5, 70], num_heads=8, num_kv_heads=1,
                                 head_dim=80, block_size=32, dtype="bfloat16")),
]

RAGGED_CASES = [
    # prefill from scratch, prefix-cached prefill, decode-like rows, padding
    ("gqa4_hd128_bs16_f32", dict(q_lens=[5, 1, 20, 0], ctx_lens=[5, 30, 40, 0],
                                 num_tokens=32, num_heads=8, num_kv_heads=2,
                                 head_dim=128, block_size=16, dtype="float32")),
    ("gqa4_hd128_bs8_bf16", dict(q_lens=[16, 3, 1], ctx_lens=[16, 19, 41],
                                 num_tokens=24, num_heads=8, num_kv_heads=2,
                                 head_dim=128, block_size=8, dtype="bfloat16")),
    ("smollm_9_3_hd64_bs16_f32", dict(q_lens=[9, 1, 13], ctx_lens=[9, 33, 45],
                                      num_tokens=24, num_heads=9, num_kv_heads=3,
                                      head_dim=64, block_size=16, dtype="float32")),
    ("smollm_9_3_hd64_bs32_bf16", dict(q_lens=[1, 30], ctx_lens=[1, 70],
                                       num_tokens=32, num_heads=9, num_kv_heads=3,
                                       head_dim=64, block_size=32, dtype="bfloat16")),
    ("mha_hd80_bs8_f32", dict(q_lens=[12, 7, 0], ctx_lens=[12, 29, 0],
                              num_tokens=20, num_heads=2, num_kv_heads=2,
                              head_dim=80, block_size=8, dtype="float32")),
    ("mha_hd64_bs16_bf16", dict(q_lens=[17, 2], ctx_lens=[50, 2],
                                num_tokens=24, num_heads=4, num_kv_heads=4,
                                head_dim=64, block_size=16, dtype="bfloat16")),
    # a chunked-prefill step: decode rows beside prompt chunks (a first chunk,
    # a middle one over cached tokens), and a decode row of a slot that ended
    # on the device (context 0: attends to nothing)
    ("mixed_chunks_decodes_gqa3_hd64_bs8_f32", dict(
        q_lens=[1, 12, 1, 1, 9, 1], ctx_lens=[23, 12, 1, 0, 41, 64],
        num_tokens=32, num_heads=6, num_kv_heads=2, head_dim=64, block_size=8,
        dtype="float32")),
]

# Kernel tuning knobs that change the code path (splits, chunk sizes, the
# CUDA-core dot); each runs on one small case.
DECODE_TUNINGS = [
    dict(num_splits=3, chunk_tokens=16),
    dict(num_splits=2, chunk_tokens=32, use_dot=False),
    dict(num_splits=1, chunk_tokens=16, use_dot=True),
]
RAGGED_TUNINGS = [
    dict(block_q=4, chunk_tokens=16),
    dict(block_q=16, chunk_tokens=32),
]


def write_kv_case(seed, *, num_tokens, num_blocks, num_kv_heads, block_size,
                  head_dim, dtype):
    """Pool, new k/v and a slot mapping with padded (num_slots), negative and
    past-the-end slots mixed in; block 0 is never a target."""
    rng = np.random.default_rng(seed)
    num_slots = num_blocks * block_size
    valid = rng.permutation(np.arange(block_size, num_slots))[:num_tokens]
    slots = valid.astype(np.int32)
    slots[::3] = num_slots  # the runner's padding value
    if num_tokens > 1:
        slots[1] = -1       # would wrap to the last slot without the guard
    if num_tokens > 4:
        slots[4] = num_slots + block_size + 1
    pool = rng.standard_normal((2, num_blocks, num_kv_heads, block_size, head_dim))
    k = rng.standard_normal((num_tokens, num_kv_heads, head_dim))
    v = rng.standard_normal((num_tokens, num_kv_heads, head_dim))
    return dict(kv_cache=jnp.asarray(pool, dtype), k=jnp.asarray(k, dtype),
                v=jnp.asarray(v, dtype), slot_mapping=jnp.asarray(slots))


def max_abs_err(out, ref):
    out = np.asarray(jnp.asarray(out, jnp.float32))
    ref = np.asarray(jnp.asarray(ref, jnp.float32))
    if np.isnan(out).any():
        return float("nan")
    return float(np.max(np.abs(out - ref))) if out.size else 0.0
