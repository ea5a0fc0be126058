"""Parity of our Flax models with Hugging Face transformers' own implementation.

The golden logits in tests/golden/tiny_*/golden.npz come from transformers'
PyTorch models (scripts/make_golden.py); these tests need no torch. Each test
runs the prompt as one prefill and then one decode step per golden token
through the paged KV cache, with block size 4 (several blocks per sequence),
a randomly permuted block table and every unused pool slot NaN-filled.

Tolerance (float32 on both sides): max |ours - HF| <= 1e-5 * max(1, max |HF|).
Measured differences are below 5e-7.
"""
from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models.base import single_sequence_metadata

GOLDEN = pathlib.Path(__file__).resolve().parents[1] / "golden"
BLOCK_SIZE = 4
RTOL_SCALE = 1e-5

SAFETENSORS_FIXTURES = ["llama_gqa", "llama_tied_linear", "llama3_bias", "llama_sharded",
                        "qwen2", "opt_pre", "opt_post_proj", "opt_pre_proj"]


def _torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _nan_pool(model, num_blocks: int) -> tuple:
    return tuple(jnp.full_like(c, jnp.nan) for c in model.init_kv_caches(num_blocks, BLOCK_SIZE))


def run_paged(model, prompt_ids, decode_ids, seed: int, step=None):
    """Prefill of prompt_ids, then one decode step per id of decode_ids.

    Returns (prefill_logits f32[P, V], decode_logits f32[len(decode_ids), V]).
    """
    total = len(prompt_ids) + len(decode_ids)
    num_seq_blocks = -(-total // BLOCK_SIZE)
    num_blocks = 2 * num_seq_blocks + 1  # spare blocks stay NaN and must never be read
    rng = np.random.default_rng(seed)
    block_table = rng.permutation(np.arange(1, num_blocks))[:num_seq_blocks].astype(np.int32)
    kv_caches = _nan_pool(model, num_blocks)
    step = step or jax.jit(model.apply, donate_argnums=(3,))

    positions, metadata = single_sequence_metadata(0, len(prompt_ids), block_table, BLOCK_SIZE)
    prefill, kv_caches = step(model.params, jnp.asarray(prompt_ids, jnp.int32),
                              jnp.asarray(positions), kv_caches, metadata)
    decode = []
    for i, token in enumerate(decode_ids):
        positions, metadata = single_sequence_metadata(len(prompt_ids) + i, 1, block_table,
                                                       BLOCK_SIZE)
        logits, kv_caches = step(model.params, jnp.asarray([token], jnp.int32),
                                 jnp.asarray(positions), kv_caches, metadata,
                                 jnp.asarray([0], jnp.int32))
        decode.append(np.asarray(logits[0]))
    return np.asarray(prefill), np.stack(decode)


def assert_parity(model, golden, seed: int = 0):
    prefill, decode = run_paged(model, golden["prompt_ids"], golden["decode_ids"], seed)
    for ours, ref in ((prefill, golden["prefill_logits"]), (decode, golden["decode_logits"])):
        assert ours.shape == ref.shape
        tol = RTOL_SCALE * max(1.0, float(np.abs(ref).max()))
        np.testing.assert_allclose(ours, ref, rtol=0, atol=tol)
    # The golden decode ids are HF's greedy choices: ours agree.
    greedy = np.concatenate([prefill[-1:].argmax(-1), decode[:-1].argmax(-1)])
    np.testing.assert_array_equal(greedy, golden["decode_ids"])


@pytest.mark.parametrize("name", SAFETENSORS_FIXTURES)
def test_parity_with_transformers(name):
    path = GOLDEN / f"tiny_{name}"
    model = models.load_model(path, dtype="float32", attention_backend="reference")
    golden = np.load(path / "golden.npz")
    assert_parity(model, golden, seed=len(name))


def test_permuted_block_tables_agree():
    """Two different random block tables give bit-identical logits."""
    path = GOLDEN / "tiny_llama_tied_linear"
    model = models.load_model(path, attention_backend="reference")
    golden = np.load(path / "golden.npz")
    step = jax.jit(model.apply, donate_argnums=(3,))
    a = run_paged(model, golden["prompt_ids"], golden["decode_ids"][:3], seed=1, step=step)
    b = run_paged(model, golden["prompt_ids"], golden["decode_ids"][:3], seed=2, step=step)
    assert not np.array_equal(*(np.random.default_rng(s).permutation(np.arange(1, 11))
                                for s in (1, 2)))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_pytorch_bin_fixture():
    """pytorch_model.bin loads when torch is installed; otherwise the error says
    torch is needed (CI has no torch)."""
    path = GOLDEN / "tiny_llama_bin"
    if _torch_available():
        model = models.load_model(path, attention_backend="reference")
        assert_parity(model, np.load(path / "golden.npz"))
    else:
        with pytest.raises(ImportError, match="needs torch"):
            models.load_model(path)


def test_logits_and_generate_greedy_follow_golden():
    path = GOLDEN / "tiny_opt_pre"
    model = models.load_model(path, attention_backend="reference")
    golden = np.load(path / "golden.npz")
    logits = model.logits(golden["prompt_ids"], block_size=BLOCK_SIZE)
    np.testing.assert_allclose(logits, golden["prefill_logits"], rtol=0,
                               atol=RTOL_SCALE * max(1.0, float(np.abs(golden["prefill_logits"]).max())))
    new = model.generate_greedy(golden["prompt_ids"], len(golden["decode_ids"]),
                                block_size=BLOCK_SIZE, stop_at_eos=False)
    assert new == golden["decode_ids"].tolist()


def test_bfloat16_close_to_float32():
    """bf16 params and compute stay close to the float32 golden logits."""
    path = GOLDEN / "tiny_llama_gqa"
    model = models.load_model(path, dtype="bfloat16", attention_backend="reference")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(model.params))
    golden = np.load(path / "golden.npz")
    logits = model.logits(golden["prompt_ids"], block_size=BLOCK_SIZE)
    assert logits.dtype == np.float32
    scale = float(np.abs(golden["prefill_logits"]).max())
    assert np.abs(logits - golden["prefill_logits"]).max() < 0.05 * scale
