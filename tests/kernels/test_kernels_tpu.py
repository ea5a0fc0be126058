"""TPU Pallas kernels (kernels_pallas/tpu) in interpret mode on CPU vs the reference.

Every pool is NaN-filled outside the slots that hold context tokens (block 0,
unused blocks, and the unfilled tail of each last block), and block tables are
random permutations, so a read of a stale block shows up as NaN. Tiny shapes:
interpret mode compiles each configuration for a few seconds.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic.interpret import interpret_pallas_call as interpret_state
from jax.experimental.pallas import tpu as pltpu

import kernels_pallas
from kernels_pallas import reference, tpu

TOL = {jnp.float32: dict(atol=2e-5, rtol=2e-5), jnp.bfloat16: dict(atol=3e-2, rtol=3e-2)}

# (dtype, block_size, num_heads, num_kv_heads, head_dim): every value of each
# axis appears; 9/3 is SmolLM2's GQA, 4/4 and 8/8 are MHA, 6/1 is MQA.
CONFIGS = [
    (jnp.float32, 8, 9, 3, 64),
    (jnp.bfloat16, 16, 9, 3, 64),
    (jnp.float32, 16, 4, 4, 80),
    (jnp.bfloat16, 32, 8, 2, 128),
    (jnp.bfloat16, 8, 8, 8, 80),
    (jnp.float32, 32, 6, 1, 128),
]
CONFIG_IDS = [f"{jnp.dtype(c[0]).name}-bs{c[1]}-h{c[2]}/{c[3]}-d{c[4]}" for c in CONFIGS]
MAX_BLOCKS = 5  # table width; the full length is 5 * block_size


@pytest.fixture(autouse=True)
def _fresh_interpreter():
    """The TPU interpreter keeps global state that a failing kernel leaves
    behind; reset it so one failure does not cascade into the next tests."""
    yield
    pltpu.reset_tpu_interpret_mode_state()


def make_pool(rng, dtype, num_kv_heads, block_size, head_dim, context_lens,
              max_blocks=MAX_BLOCKS, spare_blocks=3):
    """Returns (kv_cache, block_tables): each sequence's blocks are a random
    permutation of pool blocks; everything outside its context is NaN."""
    pages = [-(-int(n) // block_size) for n in context_lens]
    num_blocks = 1 + sum(pages) + spare_blocks
    kv = np.full((2, num_blocks, num_kv_heads, block_size, head_dim), np.nan, np.float32)
    tables = np.zeros((len(context_lens), max_blocks), np.int32)
    ids = iter(rng.permutation(np.arange(1, num_blocks)))
    for s, (n, p) in enumerate(zip(context_lens, pages)):
        for i in range(p):
            block = next(ids)
            tables[s, i] = block
            filled = min(block_size, n - i * block_size)
            kv[:, block, :, :filled] = rng.standard_normal((2, num_kv_heads, filled, head_dim))
    return jnp.asarray(kv, dtype), jnp.asarray(tables)


def assert_close(out, ref, dtype):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert not np.isnan(out).any(), "NaN in the kernel output: a stale slot was read"
    np.testing.assert_allclose(out, ref, **TOL[dtype])


# --------------------------------------------------------------------------
# Hand-computed tiny case, for both attention kernels.
# --------------------------------------------------------------------------

def test_hand_computed_tiny_case():
    # One head, head_dim 2, scale 1, block_size 8; the sequence's two tokens
    # live in block 3 (every other slot is NaN):
    #   k0 = [0, 0], k1 = [ln 3, 0];  v0 = [4, 0], v1 = [0, 8];  q = [1, 0].
    # Decode (context 2): scores q.k = [0, ln 3] -> softmax [1/4, 3/4]
    #   -> out = 1/4 * [4, 0] + 3/4 * [0, 8] = [1, 6].
    # Ragged, both tokens new (context 2, q_len 2): token 0 sits at position 0
    #   and sees only k0 -> out = v0 = [4, 0]; token 1 is the decode case
    #   -> [1, 6]. Tokens past query_start_loc[-1] (padding) get [0, 0].
    kv = np.full((2, 5, 1, 8, 2), np.nan, np.float32)
    kv[0, 3, 0, :2] = [[0.0, 0.0], [np.log(3.0), 0.0]]
    kv[1, 3, 0, :2] = [[4.0, 0.0], [0.0, 8.0]]
    kv = jnp.asarray(kv)
    tables = jnp.array([[3, 0]], jnp.int32)
    q = jnp.array([[[1.0, 0.0]]])
    out = tpu.paged_attention(q, kv, tables, jnp.array([2]), scale=1.0, interpret=True)
    np.testing.assert_allclose(np.asarray(out)[0, 0], [1.0, 6.0], rtol=1e-6)

    q2 = jnp.array([[[1.0, 0.0]], [[1.0, 0.0]], [[5.0, 5.0]]])
    out = tpu.ragged_paged_attention(q2, kv, tables, jnp.array([2]), jnp.array([0, 2]),
                                     scale=1.0, interpret=True)
    np.testing.assert_allclose(np.asarray(out)[:, 0],
                               [[4.0, 0.0], [1.0, 6.0], [0.0, 0.0]], rtol=1e-6)


# --------------------------------------------------------------------------
# Decode.
# --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,block_size,num_heads,num_kv_heads,head_dim",
                         CONFIGS, ids=CONFIG_IDS)
def test_paged_attention_matches_reference(dtype, block_size, num_heads,
                                           num_kv_heads, head_dim):
    rng = np.random.default_rng(block_size * 1000 + head_dim + num_heads)
    full = MAX_BLOCKS * block_size
    # 0, 1, a non-multiple inside the first block, one crossing several
    # blocks, and the full table. Groups of 2 pages and chunks of 2 table
    # entries: the long ones cross 3 chunks, the last one clamped to the
    # table's end (5 % 2 != 0).
    context_lens = np.array([0, 1, block_size - 3, 2 * block_size + 5, full], np.int32)
    kv, tables = make_pool(rng, dtype, num_kv_heads, block_size, head_dim, context_lens)
    q = jnp.asarray(rng.standard_normal((len(context_lens), num_heads, head_dim)), dtype)
    scale = head_dim ** -0.5
    out = tpu.paged_attention(q, kv, tables, jnp.asarray(context_lens), scale=scale,
                              interpret=True, pages_per_compute_block=2, pages_per_chunk=2)
    ref = reference.paged_attention(q, kv, tables, jnp.asarray(context_lens), scale=scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, ref, dtype)
    assert np.all(np.asarray(out, np.float32)[0] == 0.0), "context 0 must give zeros"


@pytest.mark.parametrize("tuning", [
    dict(),                                                       # defaults, one chunk
    dict(pages_per_compute_block=1, pages_per_chunk=3, num_splits=3),  # split sequence axis
], ids=["defaults", "splits"])
def test_paged_attention_tuning_under_jit(tuning):
    dtype, block_size, num_heads, num_kv_heads, head_dim = jnp.float32, 8, 9, 3, 64
    rng = np.random.default_rng(7)
    # 71 tokens = 9 pages of a 10-wide table: 3 splits of 3 pages, and with
    # 3-entry chunks the last table slice is clamped to the row's end.
    max_blocks = 10
    context_lens = np.array([71, 0, 1, 17], np.int32)
    kv, tables = make_pool(rng, dtype, num_kv_heads, block_size, head_dim, context_lens,
                           max_blocks=max_blocks)
    q = jnp.asarray(rng.standard_normal((4, num_heads, head_dim)), dtype)
    fn = jax.jit(functools.partial(tpu.paged_attention, scale=0.125, interpret=True, **tuning))
    out = fn(q, kv, tables, jnp.asarray(context_lens))
    ref = reference.paged_attention(q, kv, tables, jnp.asarray(context_lens), scale=0.125)
    assert_close(out, ref, dtype)


# --------------------------------------------------------------------------
# Ragged / prefill / mixed.
# --------------------------------------------------------------------------

def ragged_batch(block_size):
    """(context_lens, q_lens): every kind of sequence a step may hold."""
    full = MAX_BLOCKS * block_size
    return (np.array([block_size + 3,          # whole prompt, non-multiple
                      2 * block_size + 1,      # cached prefix + 4 new tokens
                      full,                    # chunk ending at the full table
                      1,                       # first token of a prompt
                      block_size + 1,          # a decode token
                      0], np.int32),           # padding sequence (at the end)
            np.array([block_size + 3, 4, 11, 1, 1, 0], np.int32))


@pytest.mark.parametrize("dtype,block_size,num_heads,num_kv_heads,head_dim",
                         CONFIGS[:5], ids=CONFIG_IDS[:5])
def test_ragged_paged_attention_matches_reference(dtype, block_size, num_heads,
                                                  num_kv_heads, head_dim):
    rng = np.random.default_rng(block_size * 7 + head_dim + num_heads)
    context_lens, q_lens = ragged_batch(block_size)
    query_start_loc = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    num_tokens = int(query_start_loc[-1]) + 5  # 5 padding tokens
    kv, tables = make_pool(rng, dtype, num_kv_heads, block_size, head_dim, context_lens)
    q = jnp.asarray(rng.standard_normal((num_tokens, num_heads, head_dim)), dtype)
    scale = head_dim ** -0.5
    # 8-token blocks: blocks hold several sequences and sequences span blocks.
    fn = jax.jit(functools.partial(tpu.ragged_paged_attention, scale=scale, interpret=True,
                                   q_block_size=8, pages_per_compute_block=2,
                                   pages_per_chunk=2))
    args = (q, kv, tables, jnp.asarray(context_lens), jnp.asarray(query_start_loc))
    out = fn(*args)
    ref = reference.ragged_paged_attention(*args, scale=scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, ref, dtype)
    assert np.all(np.asarray(out, np.float32)[query_start_loc[-1]:] == 0.0)


def test_attention_facade_routes_to_tpu_kernels():
    """kernels_pallas.attention(backend="tpu"): write_kv then ragged attention,
    same output and pool as the reference backend."""
    dtype, block_size, num_heads, num_kv_heads, head_dim = jnp.float32, 16, 9, 3, 64
    rng = np.random.default_rng(3)
    context_lens = np.array([20, 5, 0], np.int32)
    q_lens = np.array([7, 5, 0], np.int32)
    kv, tables = make_pool(rng, dtype, num_kv_heads, block_size, head_dim, context_lens)
    tables_np = np.asarray(tables)
    slots = []
    for s, (n, ql) in enumerate(zip(context_lens, q_lens)):
        slots += [tables_np[s, p // block_size] * block_size + p % block_size
                  for p in range(n - ql, n)]
    num_tokens = 16
    num_slots = kv.shape[1] * block_size
    slot_mapping = jnp.asarray(slots + [num_slots] * (num_tokens - len(slots)), jnp.int32)
    meta = kernels_pallas.AttentionMetadata(
        slot_mapping=slot_mapping, block_tables=tables,
        context_lens=jnp.asarray(context_lens),
        query_start_loc=jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32))
    q = jnp.asarray(rng.standard_normal((num_tokens, num_heads, head_dim)), dtype)
    k, v = (jnp.asarray(rng.standard_normal((num_tokens, num_kv_heads, head_dim)), dtype)
            for _ in range(2))
    out, new_kv = kernels_pallas.attention(q, k, v, kv, meta, scale=0.125,
                                           backend="tpu", interpret=True)
    ref_out, ref_kv = kernels_pallas.attention(q, k, v, kv, meta, scale=0.125,
                                               backend="reference")
    np.testing.assert_array_equal(np.asarray(new_kv), np.asarray(ref_kv))
    assert_close(out, ref_out, dtype)


# --------------------------------------------------------------------------
# write_kv and copy_blocks.
# --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,block_size,num_kv_heads,head_dim",
                         [(jnp.float32, 8, 3, 64), (jnp.bfloat16, 32, 2, 128)])
def test_write_kv_matches_reference_in_place(dtype, block_size, num_kv_heads, head_dim):
    rng = np.random.default_rng(block_size)
    num_blocks, num_tokens = 6, 11
    num_slots = num_blocks * block_size
    kv = np.full((2, num_blocks, num_kv_heads, block_size, head_dim), np.nan, np.float32)
    kv[:, 2] = rng.standard_normal(kv[:, 2].shape)  # some live data to keep
    kv = jnp.asarray(kv, dtype)
    slots = rng.choice(np.arange(block_size, num_slots), num_tokens, replace=False)
    dropped = {1: num_slots, 4: num_slots + 3, 6: -1, 9: 2}  # out of range, negative, block 0
    for i, slot in dropped.items():
        slots[i] = slot
    k, v = (jnp.asarray(rng.standard_normal((num_tokens, num_kv_heads, head_dim)), dtype)
            for _ in range(2))
    # 4 tokens per grid step: 3 steps, the last one padded.
    fn = jax.jit(functools.partial(tpu.write_kv, interpret=True, tokens_per_block=4),
                 donate_argnums=0)
    expect = reference.write_kv(kv, k, v, jnp.asarray(np.where(
        np.isin(np.arange(num_tokens), list(dropped)), num_slots, slots), jnp.int32))
    kv_in = jnp.array(kv, copy=True)
    out = fn(kv_in, k, v, jnp.asarray(slots, jnp.int32))
    assert kv_in.is_deleted(), "the pool should be donated and updated in place"
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(expect, np.float32))
    assert np.isnan(np.asarray(out, np.float32)[:, 0]).all(), "block 0 must never be written"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_copy_blocks_matches_reference(dtype):
    rng = np.random.default_rng(5)
    kv = jnp.asarray(rng.standard_normal((2, 10, 3, 16, 80)), dtype)
    src = jnp.array([1, 2, 2, 3, 4], jnp.int32)
    dst = jnp.array([5, 6, 0, 7, 9], jnp.int32)  # the third pair is padding
    out = tpu.copy_blocks(kv, src, dst, interpret=True, copies_per_block=2)
    np.testing.assert_array_equal(np.asarray(out, np.float32),
                                  np.asarray(reference.copy_blocks(kv, src, dst), np.float32))
    np.testing.assert_array_equal(np.asarray(out[:, 0]), np.asarray(kv[:, 0]))


# --------------------------------------------------------------------------
# Double buffering under the other DMA timing.
# --------------------------------------------------------------------------

def test_paged_attention_with_eager_dmas():
    """The default interpreter runs a DMA when it is waited for, which exposes
    a read before its wait; "eager" runs it when started, which exposes a
    prefetch into the buffer being computed (a single-buffered pipeline gives
    NaN here). Also runs the interpreter's race detector."""
    rng = np.random.default_rng(11)
    context_lens = np.array([37, 9], np.int32)
    kv, tables = make_pool(rng, jnp.float32, 2, 8, 64, context_lens)
    q = jnp.asarray(rng.standard_normal((2, 4, 64)), jnp.float32)
    params = pltpu.InterpretParams(dma_execution_mode="eager", detect_races=True)
    out = tpu.paged_attention(q, kv, tables, jnp.asarray(context_lens), scale=0.125,
                              interpret=params, pages_per_compute_block=1, pages_per_chunk=2)
    assert interpret_state.races is not None and not interpret_state.races.races_found
    assert_close(out, reference.paged_attention(q, kv, tables, jnp.asarray(context_lens),
                                                scale=0.125), jnp.float32)


# --------------------------------------------------------------------------
# The kernels lower to Mosaic for a real TPU (no TPU needed to lower).
# --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,block_size,num_heads,num_kv_heads,head_dim", [
    (jnp.bfloat16, 16, 32, 8, 128), (jnp.float32, 8, 9, 3, 64), (jnp.bfloat16, 32, 12, 12, 80),
], ids=["bf16-bs16-h32/8-d128", "f32-bs8-h9/3-d64", "bf16-bs32-h12/12-d80"])
def test_kernels_lower_to_mosaic_for_tpu(dtype, block_size, num_heads, num_kv_heads,
                                         head_dim):
    """Pallas's TPU lowering (shapes, dots, DMAs, SMEM/VMEM scratch) accepts
    every kernel at default tuning; Mosaic's own compiler passes run only on
    a TPU and are not covered."""
    num_seqs, num_tokens = 4, 64
    spec = jax.ShapeDtypeStruct
    kv = spec((2, 64, num_kv_heads, block_size, head_dim), dtype)
    tables, lens = spec((num_seqs, 16), jnp.int32), spec((num_seqs,), jnp.int32)
    new_kv = spec((num_tokens, num_kv_heads, head_dim), dtype)
    calls = [
        (functools.partial(tpu.paged_attention, scale=0.1),
         (spec((num_seqs, num_heads, head_dim), dtype), kv, tables, lens)),
        (functools.partial(tpu.ragged_paged_attention, scale=0.1),
         (spec((num_tokens, num_heads, head_dim), dtype), kv, tables, lens,
          spec((num_seqs + 1,), jnp.int32))),
        (tpu.write_kv, (kv, new_kv, new_kv, spec((num_tokens,), jnp.int32))),
        (tpu.copy_blocks, (kv, lens, lens)),
    ]
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=jax.sharding.AbstractDevice(
        device_kind="TPU v5 lite", num_cores=1, platform="tpu"))
    with jax.sharding.use_abstract_mesh(mesh):
        for fn, args in calls:
            text = jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
            assert "tpu_custom_call" in text


# --------------------------------------------------------------------------
# Errors a caller can make.
# --------------------------------------------------------------------------

def test_bad_arguments_raise_value_error():
    kv = jnp.zeros((2, 4, 2, 8, 64))
    tables = jnp.zeros((3, 2), jnp.int32)
    lens = jnp.zeros((3,), jnp.int32)
    with pytest.raises(ValueError, match="num_kv_heads"):
        tpu.paged_attention(jnp.zeros((3, 3, 64)), kv, tables, lens, scale=1.0)
    with pytest.raises(ValueError, match="q must be"):
        tpu.paged_attention(jnp.zeros((3, 4, 80)), kv, tables, lens, scale=1.0)
    with pytest.raises(ValueError, match="kv_cache"):
        tpu.paged_attention(jnp.zeros((3, 4, 64)), kv[0], tables, lens, scale=1.0)
    with pytest.raises(ValueError, match="context_lens"):
        tpu.paged_attention(jnp.zeros((3, 4, 64)), kv, tables, lens[:2], scale=1.0)
    with pytest.raises(ValueError, match="pages_per_chunk"):
        tpu.paged_attention(jnp.zeros((3, 4, 64)), kv, tables, lens, scale=1.0,
                            pages_per_chunk=0)
    with pytest.raises(ValueError, match="num_splits"):
        tpu.paged_attention(jnp.zeros((3, 4, 64)), kv, tables, lens, scale=1.0, num_splits=0)
    with pytest.raises(ValueError, match="interpret"):
        tpu.paged_attention(jnp.zeros((3, 4, 64)), kv, tables, lens, scale=1.0,
                            interpret="yes")
    with pytest.raises(ValueError, match="query_start_loc"):
        tpu.ragged_paged_attention(jnp.zeros((5, 4, 64)), kv, tables, lens,
                                   jnp.zeros((3,), jnp.int32), scale=1.0)
    with pytest.raises(ValueError, match="q_block_size"):
        tpu.ragged_paged_attention(jnp.zeros((5, 4, 64)), kv, tables, lens,
                                   jnp.zeros((4,), jnp.int32), scale=1.0, q_block_size=12)
    with pytest.raises(ValueError, match="slot_mapping"):
        tpu.write_kv(kv, jnp.zeros((5, 2, 64)), jnp.zeros((5, 2, 64)),
                     jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match="src_ids and dst_ids"):
        tpu.copy_blocks(kv, jnp.zeros((2,), jnp.int32), jnp.zeros((3,), jnp.int32))
