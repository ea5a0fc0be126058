"""GPU Pallas kernels (kernels_pallas/gpu) in interpret mode on CPU, against
the pure-jnp reference. Cases live in tests/kernel_cases.py and run on the
H100 too (scripts/bench_kernels.py checks them before it benchmarks)."""
import numpy as np
import pytest
import jax
import jax.numpy as jnp

import kernels_pallas
from kernels_pallas import AttentionMetadata, reference
from kernels_pallas import gpu as kgpu

import kernel_cases as kc


def assert_close(out, ref, dtype):
    out32 = np.asarray(jnp.asarray(out, jnp.float32))
    ref32 = np.asarray(jnp.asarray(ref, jnp.float32))
    assert not np.isnan(out32).any(), "NaN in the output: a stale block was read"
    np.testing.assert_allclose(out32, ref32, atol=kc.ATOL[dtype], rtol=kc.RTOL[dtype])


def test_decode_hand_computed():
    # One sequence, one head, head_dim 2, block_size 8, context 2, scale 1,
    # its block at physical id 2; every other slot is NaN.
    #   q = [ln 3, 0]; k0 = [1, 0], k1 = [0, 1]  -> scores [ln 3, 0]
    #   softmax = [3/4, 1/4]; v0 = [1, 2], v1 = [3, 4]
    #   out = 3/4 * [1, 2] + 1/4 * [3, 4] = [1.5, 2.5]
    pool = np.full((2, 4, 1, 8, 2), np.nan, np.float32)
    pool[0, 2, 0, :2] = [[1, 0], [0, 1]]
    pool[1, 2, 0, :2] = [[1, 2], [3, 4]]
    q = jnp.asarray([[[np.log(3.0), 0.0]]], jnp.float32)
    out = kgpu.paged_attention(q, jnp.asarray(pool), jnp.asarray([[2, 0]], jnp.int32),
                               jnp.asarray([2], jnp.int32), scale=1.0, interpret=True)
    np.testing.assert_allclose(np.asarray(out)[0, 0], [1.5, 2.5], rtol=1e-6)
    # the ragged kernel agrees: the same token as a 1-token "prefill"
    out = kgpu.ragged_paged_attention(
        q, jnp.asarray(pool), jnp.asarray([[2, 0]], jnp.int32), jnp.asarray([2], jnp.int32),
        jnp.asarray([0, 1], jnp.int32), scale=1.0, block_q=16, interpret=True)
    np.testing.assert_allclose(np.asarray(out)[0, 0], [1.5, 2.5], rtol=1e-6)


@pytest.mark.parametrize("name,kw", kc.DECODE_CASES, ids=[c[0] for c in kc.DECODE_CASES])
def test_paged_attention(name, kw):
    c = kc.decode_case(0, **kw)
    args = (c["q"], c["kv_cache"], c["block_tables"], c["context_lens"])
    out = kgpu.paged_attention(*args, scale=c["scale"], interpret=True)
    assert out.shape == c["q"].shape and out.dtype == c["q"].dtype
    assert_close(out, reference.paged_attention(*args, scale=c["scale"]), kw["dtype"])


@pytest.mark.parametrize("tune", kc.DECODE_TUNINGS, ids=str)
def test_paged_attention_tunings(tune):
    # GQA 9/3 with splits: several splits are empty for the short sequences
    name, kw = kc.DECODE_CASES[2]
    c = kc.decode_case(5, **{**kw, "max_blocks": 8})
    args = (c["q"], c["kv_cache"], c["block_tables"], c["context_lens"])
    out = kgpu.paged_attention(*args, scale=c["scale"], interpret=True, **tune)
    assert_close(out, reference.paged_attention(*args, scale=c["scale"]), kw["dtype"])


@pytest.mark.parametrize("name,kw", kc.RAGGED_CASES, ids=[c[0] for c in kc.RAGGED_CASES])
def test_ragged_paged_attention(name, kw):
    c = kc.ragged_case(0, **kw)
    args = (c["q"], c["kv_cache"], c["block_tables"], c["context_lens"], c["query_start_loc"])
    out = kgpu.ragged_paged_attention(*args, scale=c["scale"], interpret=True)
    ref = reference.ragged_paged_attention(*args, scale=c["scale"])
    assert_close(out, ref, kw["dtype"])
    n_real = int(c["query_start_loc"][-1])
    assert not np.asarray(out[n_real:]).any(), "padding tokens must get zeros"


@pytest.mark.parametrize("tune", kc.RAGGED_TUNINGS, ids=str)
def test_ragged_paged_attention_tunings(tune):
    name, kw = kc.RAGGED_CASES[0]
    c = kc.ragged_case(4, **kw)
    args = (c["q"], c["kv_cache"], c["block_tables"], c["context_lens"], c["query_start_loc"])
    out = kgpu.ragged_paged_attention(*args, scale=c["scale"], interpret=True, **tune)
    assert_close(out, reference.ragged_paged_attention(*args, scale=c["scale"]), kw["dtype"])


@pytest.mark.parametrize("dtype,head_dim,num_kv_heads", [("float32", 80, 3), ("bfloat16", 64, 2)])
def test_write_kv(dtype, head_dim, num_kv_heads):
    c = kc.write_kv_case(0, num_tokens=11, num_blocks=6, num_kv_heads=num_kv_heads,
                         block_size=8, head_dim=head_dim, dtype=dtype)
    out = kgpu.write_kv(c["kv_cache"], c["k"], c["v"], c["slot_mapping"], interpret=True)
    ref = reference.write_kv(c["kv_cache"], c["k"], c["v"], c["slot_mapping"])
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref, np.float32))
    # padded / negative / past-the-end slots wrote nothing: block 0 and the
    # last slot (where -1 would wrap) are untouched
    before, after = np.asarray(c["kv_cache"], np.float32), np.asarray(out, np.float32)
    np.testing.assert_array_equal(after[:, 0], before[:, 0])
    slots = set(np.asarray(c["slot_mapping"]).tolist())
    if 6 * 8 - 1 not in slots:
        np.testing.assert_array_equal(after[:, -1, :, -1], before[:, -1, :, -1])
    written = np.any(after != before, axis=(0, 2, 4)).reshape(-1)
    valid = [s for s in slots if 0 <= s < 48]
    assert sorted(np.flatnonzero(written).tolist()) == sorted(valid)


@pytest.mark.parametrize("dtype,shape", [("float32", (2, 7, 3, 8, 80)), ("bfloat16", (2, 9, 2, 16, 64))])
def test_copy_blocks(dtype, shape):
    rng = np.random.default_rng(0)
    pool = jnp.asarray(rng.standard_normal(shape), dtype)
    src = jnp.asarray([1, 2, 3, 4], jnp.int32)
    dst = jnp.asarray([5, 0, 6, 0], jnp.int32)  # dst 0: padding, skipped
    out = kgpu.copy_blocks(pool, src, dst, interpret=True)
    np.testing.assert_array_equal(np.asarray(out, np.float32),
                                  np.asarray(reference.copy_blocks(pool, src, dst), np.float32))
    np.testing.assert_array_equal(np.asarray(out[:, 0], np.float32), np.asarray(pool[:, 0], np.float32))


def test_facade_attention_gpu_backend_matches_reference():
    """kernels_pallas.attention with backend="gpu" (interpret) = reference,
    for a decode step and a prefill step with a cached prefix."""
    rng = np.random.default_rng(1)
    num_blocks, hkv, bs, d, hq = 10, 2, 8, 64, 4
    pool = jnp.asarray(rng.standard_normal((2, num_blocks, hkv, bs, d)), jnp.float32)
    tables = jnp.asarray([[3, 7, 0], [5, 0, 0]], jnp.int32)
    steps = [  # (is_decode, query_start_loc, context_lens, slot_mapping)
        (True, [0, 1, 2], [12, 3], [7 * 8 + 3, 5 * 8 + 2]),
        # seq 0: 4 new tokens at positions 8..11 of 12 (8 cached); seq 1: a
        # 2-token prompt; one padded token
        (False, [0, 4, 6], [12, 2], [56, 57, 58, 59, 40, 41, num_blocks * bs]),
    ]
    for is_decode, qsl, ctx, slots in steps:
        n = len(slots)
        md = AttentionMetadata(slot_mapping=jnp.asarray(slots, jnp.int32), block_tables=tables,
                               context_lens=jnp.asarray(ctx, jnp.int32),
                               query_start_loc=jnp.asarray(qsl, jnp.int32), is_decode=is_decode)
        q = jnp.asarray(rng.standard_normal((n, hq, d)), jnp.float32)
        k = jnp.asarray(rng.standard_normal((n, hkv, d)), jnp.float32)
        v = jnp.asarray(rng.standard_normal((n, hkv, d)), jnp.float32)
        out, new_pool = kernels_pallas.attention(q, k, v, pool, md, scale=d ** -0.5,
                                                 backend="gpu", interpret=True)
        ref_out, ref_pool = kernels_pallas.attention(q, k, v, pool, md, scale=d ** -0.5,
                                                     backend="reference")
        np.testing.assert_allclose(np.asarray(new_pool), np.asarray(ref_pool))
        assert_close(out, ref_out, "float32")


def test_errors_name_the_problem():
    q = jnp.zeros((2, 4, 64), jnp.float32)
    pool = jnp.zeros((2, 5, 3, 8, 64), jnp.float32)
    with pytest.raises(ValueError, match="num_kv_heads"):
        kgpu.paged_attention(q, pool, jnp.zeros((2, 2), jnp.int32), jnp.zeros((2,), jnp.int32),
                             scale=1.0, interpret=True)
    with pytest.raises(ValueError, match="kv_cache must be"):
        kgpu.write_kv(pool[0], q[:, :3], q[:, :3], jnp.zeros((2,), jnp.int32), interpret=True)
    with pytest.raises(ValueError, match="chunk_tokens"):
        kgpu.paged_attention(q, jnp.zeros((2, 5, 2, 8, 64)), jnp.zeros((2, 2), jnp.int32),
                             jnp.zeros((2,), jnp.int32), scale=1.0, chunk_tokens=24, interpret=True)
