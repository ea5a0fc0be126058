"""models.random_model(fast_init=True): the same tree, shapes and dtypes as
the modules' own init, sensible values, reproducible by seed."""
import jax
import numpy as np
import pytest

import models

OPT = {"architectures": ["OPTForCausalLM"], "hidden_size": 32, "ffn_dim": 64,
       "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 96,
       "max_position_embeddings": 64, "word_embed_proj_dim": 32,
       "do_layer_norm_before": True, "eos_token_id": 2}
LLAMA = {"architectures": ["LlamaForCausalLM"], "hidden_size": 32, "intermediate_size": 64,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "vocab_size": 96, "max_position_embeddings": 64, "eos_token_id": 2}


@pytest.mark.parametrize("cfg", [OPT, LLAMA], ids=["opt", "llama"])
def test_fast_init_matches_the_module_tree(cfg):
    flax_init = models.random_model(cfg, dtype="bfloat16", seed=0)
    fast = models.random_model(cfg, dtype="bfloat16", seed=0, fast_init=True)
    again = models.random_model(cfg, dtype="bfloat16", seed=0, fast_init=True)
    other = models.random_model(cfg, dtype="bfloat16", seed=1, fast_init=True)
    shapes = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), flax_init.params)
    assert jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), fast.params) == shapes
    for (path, x), y, z in zip(jax.tree_util.tree_leaves_with_path(fast.params),
                               jax.tree_util.tree_leaves(again.params),
                               jax.tree_util.tree_leaves(other.params)):
        name = str(getattr(path[-1], "key", path[-1]))
        x, y, z = (np.asarray(a, np.float32) for a in (x, y, z))
        np.testing.assert_array_equal(x, y)  # same seed, same weights
        if name == "bias":
            assert not x.any()
        elif name == "scale":
            assert (x == 1).all()
        else:
            assert not np.array_equal(x, z)  # another seed, other weights
            std = 0.02 if name == "embedding" else x.shape[0] ** -0.5
            assert 0.5 * std < x.std() < 1.5 * std
    logits = fast.logits(list(range(3, 20)))
    assert np.isfinite(logits).all() and np.abs(logits).max() > 0
