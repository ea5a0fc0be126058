"""The shipped default model, SmolLM2-135M-Instruct, against transformers' own Llama.

tests/golden/smollm2/logits.npz (scripts/make_golden_smollm2.py) holds
transformers' float32 logits for "The capital of France is" followed by its
8-token greedy continuation, teacher-forced in one forward pass.

Tolerance: float32 on both sides, different summation orders (XLA vs torch
CPU) through 30 layers; logits (magnitude up to ~34) must agree within
atol 5e-4 + rtol 1e-5 (measured on CPU: max |diff| 1.3e-4), and every
position must pick the same argmax.
"""

import pathlib
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models.base import single_sequence_metadata

GOLDEN = pathlib.Path(__file__).resolve().parents[1] / "golden" / "smollm2" / "logits.npz"
ATOL, RTOL = 5e-4, 1e-5


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def smollm2():
    """models.load_model("smollm2-135m"), converted into a fresh cache folder that is
    deleted afterwards (it holds ~340 MB of float32 params)."""
    with tempfile.TemporaryDirectory() as cache, pytest.MonkeyPatch.context() as mp:
        mp.setenv("JPAGED_CACHE", cache)
        yield models.load_model("smollm2-135m", dtype="float32")


def test_prompt_tokens_match_transformers(smollm2, golden):
    assert smollm2.tokenizer(str(golden["prompt"]))["input_ids"] == golden["prompt_ids"].tolist()


def test_prefill_logits_match_transformers(smollm2, golden):
    ids = np.concatenate([golden["prompt_ids"], golden["generated_ids"]])
    logits = smollm2.logits(ids)
    assert logits.shape == golden["logits"].shape == (len(ids), 49152)
    np.testing.assert_allclose(logits, golden["logits"], atol=ATOL, rtol=RTOL)
    np.testing.assert_array_equal(logits.argmax(-1), golden["logits"].argmax(-1))


def test_decode_steps_match_transformers(smollm2, golden):
    """Prefill the prompt, then feed transformers' continuation one decode step at a
    time through a randomly permuted block table over a NaN-filled pool."""
    prompt, generated = golden["prompt_ids"], golden["generated_ids"]
    total, block_size = len(prompt) + len(generated), 4
    num_blocks = -(-total // block_size)
    rng = np.random.default_rng(0)
    block_table = rng.permutation(np.arange(1, 3 * num_blocks + 1))[:num_blocks].astype(np.int32)
    kv_caches = tuple(jnp.full_like(c, jnp.nan) for c in smollm2.init_kv_caches(3 * num_blocks + 1, block_size))
    step = jax.jit(smollm2.apply, donate_argnums=(3,))

    positions, metadata = single_sequence_metadata(0, len(prompt), block_table, block_size)
    logits, kv_caches = step(smollm2.params, jnp.asarray(prompt, jnp.int32), jnp.asarray(positions),
                             kv_caches, metadata)
    rows = [np.asarray(logits)]
    for i, token in enumerate(generated):
        positions, metadata = single_sequence_metadata(len(prompt) + i, 1, block_table, block_size)
        logits, kv_caches = step(smollm2.params, jnp.asarray([token], jnp.int32), jnp.asarray(positions),
                                 kv_caches, metadata)
        rows.append(np.asarray(logits))
    ours = np.concatenate(rows)[:total]
    np.testing.assert_allclose(ours, golden["logits"], atol=ATOL, rtol=RTOL)


def test_greedy_continuation_matches_transformers(smollm2, golden):
    new_ids = smollm2.generate_greedy(golden["prompt_ids"], max_new_tokens=len(golden["generated_ids"]),
                                      stop_at_eos=False)
    assert new_ids == golden["generated_ids"].tolist()
    assert smollm2.tokenizer.decode(new_ids) == str(golden["continuation"]) == " Paris.\n\nThe answer is:"
