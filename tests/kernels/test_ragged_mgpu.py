"""The Mosaic GPU ragged kernel (kernels_pallas/gpu/ragged_paged_attention_mgpu.py)
in Mosaic GPU interpret mode on CPU, against the pure-jnp reference.

The kernel takes bf16/f16 and head_dim 64 or 128 only, so the shared ragged
cases of tests/kernel_cases.py run as bf16 and those of another head_dim are
left to the Triton kernel. (Interpret mode feeds P to the PV wgmma from SMEM:
the interpreter's wgmma reads SMEM operands only; the register path is
checked on the GPU by scripts/check_mgpu.py.)
"""
import numpy as np
import pytest
import jax.numpy as jnp

from kernels_pallas import reference
from kernels_pallas.gpu import ragged_paged_attention_mgpu as mgpu

import kernel_cases as kc

CASES = [(name, {**kw, "dtype": "bfloat16"}) for name, kw in kc.RAGGED_CASES
         if kw["head_dim"] in (64, 128)]


def _args(c):
    return (c["q"], c["kv_cache"], c["block_tables"], c["context_lens"], c["query_start_loc"])


def _assert_close(out, ref):
    out32 = np.asarray(jnp.asarray(out, jnp.float32))
    assert not np.isnan(out32).any(), "NaN in the output: a stale block was read"
    np.testing.assert_allclose(out32, np.asarray(jnp.asarray(ref, jnp.float32)),
                               atol=kc.ATOL["bfloat16"], rtol=kc.RTOL["bfloat16"])


def test_hand_computed():
    # One sequence, one head, head_dim 64, block_size 8, context 2, scale 1,
    # its block at physical id 2; every other slot is NaN.
    #   q = [ln 3, 0, ...]; k0 = e0, k1 = e1  -> scores [ln 3, 0]
    #   softmax = [3/4, 1/4]; v0 = [1, 2, 0...], v1 = [3, 4, 0...]
    #   out = 3/4 * v0 + 1/4 * v1 = [1.5, 2.5, 0, ...]
    pool = np.full((2, 4, 1, 8, 64), np.nan, np.float32)
    pool[:, 2, 0, :2] = 0.0
    pool[0, 2, 0, 0, 0] = pool[0, 2, 0, 1, 1] = 1.0
    pool[1, 2, 0, 0, :2] = [1, 2]
    pool[1, 2, 0, 1, :2] = [3, 4]
    q = np.zeros((1, 1, 64), np.float32)
    q[0, 0, 0] = np.log(3.0)
    out = mgpu.ragged_paged_attention(
        jnp.asarray(q, jnp.bfloat16), jnp.asarray(pool, jnp.bfloat16),
        jnp.asarray([[2, 0]], jnp.int32), jnp.asarray([2], jnp.int32),
        jnp.asarray([0, 1], jnp.int32), scale=1.0, interpret=True)
    want = np.zeros(64, np.float32)
    want[:2] = [1.5, 2.5]
    np.testing.assert_allclose(np.asarray(out, np.float32)[0, 0], want, atol=2e-2)


@pytest.mark.parametrize("name,kw", CASES, ids=[c[0] for c in CASES])
def test_ragged_cases(name, kw):
    c = kc.ragged_case(0, **kw)
    out = mgpu.ragged_paged_attention(*_args(c), scale=c["scale"], interpret=True)
    assert out.shape == c["q"].shape and out.dtype == c["q"].dtype
    _assert_close(out, reference.ragged_paged_attention(*_args(c), scale=c["scale"]))
    n_real = int(c["query_start_loc"][-1])
    assert not np.asarray(out[n_real:], np.float32).any(), "padding tokens must get zeros"


@pytest.mark.parametrize("tune", [dict(block_kv=128, num_stages=1),
                                  dict(block_kv=64, num_stages=2)], ids=str)
def test_tunings(tune):
    # a chunk over a long cached prefix (its KV walk wraps the ring buffers),
    # a decode row, and a short prompt whose walk is shorter than the ring
    c = kc.ragged_case(2, q_lens=[40, 1, 9], ctx_lens=[300, 200, 9], num_tokens=56,
                       num_heads=8, num_kv_heads=2, head_dim=64, block_size=16,
                       dtype="bfloat16")
    out = mgpu.ragged_paged_attention(*_args(c), scale=c["scale"], interpret=True, **tune)
    _assert_close(out, reference.ragged_paged_attention(*_args(c), scale=c["scale"]))


def test_unsupported_inputs_name_the_problem():
    c = kc.ragged_case(0, **kc.RAGGED_CASES[0][1])  # float32
    with pytest.raises(ValueError, match="bf16/f16"):
        mgpu.ragged_paged_attention(*_args(c), scale=c["scale"], interpret=True)
    name, kw = next((n, k) for n, k in kc.RAGGED_CASES if k["head_dim"] == 80)
    c = kc.ragged_case(0, **{**kw, "dtype": "bfloat16"})
    with pytest.raises(ValueError, match="head_dim"):
        mgpu.ragged_paged_attention(*_args(c), scale=c["scale"], interpret=True)


@pytest.mark.parametrize("head_dim,block_size,tune", [
    (128, 16, {}), (64, 8, dict(block_kv=128, num_stages=2)), (64, 32, dict(p_via_smem=True))])
def test_lowers_for_cuda(head_dim, block_size, tune):
    # The compiled path (P from registers, the default on a GPU) is not what
    # interpret mode runs: lower it to a Mosaic GPU module for CUDA here, on
    # the CPU, so lowering and layout-inference errors show before a GPU run.
    pytest.importorskip("jax._src.pallas.mosaic_gpu.pallas_call_registration")
    import jax
    c = kc.ragged_case(0, q_lens=[20, 1], ctx_lens=[90, 33], num_tokens=24, num_heads=8,
                       num_kv_heads=2, head_dim=head_dim, block_size=block_size,
                       dtype="bfloat16")
    fn = jax.jit(lambda *a: mgpu.ragged_paged_attention(*a, scale=c["scale"], **tune))
    exported = jax.export.export(fn, platforms=["cuda"])(*_args(c))
    assert "mosaic_gpu" in exported.mlir_module()


def test_the_facade_picks_the_mosaic_kernel_on_hopper_only(monkeypatch):
    """kernels_pallas.gpu.ragged_paged_attention: the Mosaic GPU kernel on
    an sm_90 device for the shapes it takes, the Triton kernel otherwise
    (another GPU, interpret mode, Triton launch settings, f32, head_dim 80)."""
    import kernels_pallas.gpu as kgpu
    q = jnp.zeros((8, 4, 64), jnp.bfloat16)
    pool = jnp.zeros((2, 5, 2, 16, 64), jnp.bfloat16)
    assert kgpu.ragged_impl(q, pool) == "triton"  # this CPU
    monkeypatch.setattr(kgpu, "_on_hopper", lambda: True)
    assert kgpu.ragged_impl(q, pool) == "mosaic"
    assert kgpu.ragged_impl(q, pool, interpret=True) == "triton"
    assert kgpu.ragged_impl(q, pool, tuning={"num_warps": 4}) == "triton"
    assert kgpu.ragged_impl(q.astype(jnp.float32), pool.astype(jnp.float32)) == "triton"
    assert kgpu.ragged_impl(jnp.zeros((8, 4, 80), jnp.bfloat16),
                            jnp.zeros((2, 5, 2, 16, 80), jnp.bfloat16)) == "triton"
    assert kgpu.ragged_impl(q, pool, impl="triton") == "triton"
    with pytest.raises(ValueError, match="impl must be one of"):
        kgpu.ragged_impl(q, pool, impl="cuda")
    # Forced in interpret mode, the facade runs the Mosaic kernel (its own
    # interpreter) and agrees with the Triton twin.
    c = kc.ragged_case(0, **CASES[0][1])
    got = kgpu.ragged_paged_attention(*_args(c), scale=c["scale"], interpret=True,
                                      impl="mosaic")
    twin = kgpu.ragged_paged_attention(*_args(c), scale=c["scale"], interpret=True)
    _assert_close(got, twin)
