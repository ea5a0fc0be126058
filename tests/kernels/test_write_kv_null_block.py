"""write_kv never writes the null block (block 0) or wraps a slot around,
on every backend (the Pallas ones in interpret mode)."""
import jax.numpy as jnp
import numpy as np
import pytest

import kernels_pallas


@pytest.mark.parametrize("backend", ["reference", "gpu", "tpu"])
def test_write_kv_drops_null_block_and_out_of_range_slots(backend):
    num_blocks, heads, block_size, dim = 4, 2, 8, 64
    cache = jnp.full((2, num_blocks, heads, block_size, dim), 7.0, jnp.float32)
    k = jnp.arange(5 * heads * dim, dtype=jnp.float32).reshape(5, heads, dim)
    v = -k
    # block 0 (slots 0 and 3), a negative slot, past the end, and one real slot
    slots = jnp.array([0, 3, -1, num_blocks * block_size, 2 * block_size + 5], jnp.int32)
    out = np.asarray(kernels_pallas.write_kv(cache, k, v, slots, backend=backend,
                                             interpret=True))
    expected = np.full(cache.shape, 7.0, np.float32)
    expected[0, 2, :, 5] = np.asarray(k[4])
    expected[1, 2, :, 5] = np.asarray(v[4])
    np.testing.assert_array_equal(out, expected)
