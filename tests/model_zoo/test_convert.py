"""Conversion: HF dir -> params -> orbax -> params round trips, the CLI, the
table's unit behaviour, config parsing of both transformers rope layouts."""
from __future__ import annotations

import json
import pathlib
import runpy
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models import checkpoint, convert
from models.convert import Rule
from models.llama import LlamaConfig

GOLDEN = pathlib.Path(__file__).resolve().parents[1] / "golden"
REPO = pathlib.Path(__file__).resolve().parents[2]


def _assert_same_params(a, b):
    fa, fb = convert.flatten_params(a), convert.flatten_params(b)
    assert fa.keys() == fb.keys()
    for path in fa:
        assert fa[path].dtype == fb[path].dtype, path
        np.testing.assert_array_equal(np.asarray(fa[path]), np.asarray(fb[path]), err_msg=str(path))


def test_params_match_safetensors_with_transposes():
    """Spot-check the table against the raw HF tensors."""
    path = GOLDEN / "tiny_llama3_bias"
    model = models.load_model(path)
    raw = convert.read_hf_state_dict(path)
    p = model.params
    np.testing.assert_array_equal(p["embed_tokens"]["embedding"], raw["model.embed_tokens.weight"])
    # q, k, v side by side in one kernel [hidden, (H + 2K) * D], biases likewise
    attn = p["layers_1"]["self_attn"]["qkv_proj"]
    np.testing.assert_array_equal(attn["kernel"], np.concatenate(
        [raw[f"model.layers.1.self_attn.{x}_proj.weight"].T for x in "qkv"], axis=1))
    np.testing.assert_array_equal(attn["bias"], np.concatenate(
        [raw[f"model.layers.1.self_attn.{x}_proj.bias"] for x in "qkv"]))
    np.testing.assert_array_equal(p["layers_0"]["mlp"]["gate_up_proj"]["kernel"], np.concatenate(
        [raw[f"model.layers.0.mlp.{x}_proj.weight"].T for x in ("gate", "up")], axis=1))
    np.testing.assert_array_equal(p["layers_0"]["self_attn"]["o_proj"]["bias"],
                                  raw["model.layers.0.self_attn.o_proj.bias"])
    np.testing.assert_array_equal(p["layers_0"]["post_attention_layernorm"]["scale"],
                                  raw["model.layers.0.post_attention_layernorm.weight"])
    np.testing.assert_array_equal(p["lm_head"], raw["lm_head.weight"].T)
    num_params = sum(x.size for x in jax.tree.leaves(p))
    assert num_params == sum(x.size for x in raw.values())


@pytest.mark.parametrize("name,dtype", [("opt_post_proj", "float32"),
                                        ("llama_tied_linear", "bfloat16")])
def test_orbax_round_trip(tmp_path, name, dtype):
    model = models.load_model(GOLDEN / f"tiny_{name}", dtype=dtype)
    out = checkpoint.save_converted(tmp_path / "ckpt", model.params, model.hf_config)
    saved = checkpoint.load_converted(out)
    assert saved.hf_config == model.hf_config
    assert saved.architecture == model.architecture and saved.dtype == dtype
    assert saved.tokenizer is None
    _assert_same_params(model.params, saved.params)
    again = models.load_model(out, dtype=dtype)
    _assert_same_params(model.params, again.params)
    assert again.config == model.config


def test_convert_script(tmp_path, capsys, monkeypatch):
    out = tmp_path / "converted"
    monkeypatch.setattr(sys, "argv", ["convert.py", "--model", str(GOLDEN / "tiny_qwen2"),
                                      "--out", str(out), "--dtype", "bfloat16"])
    runpy.run_path(str(REPO / "scripts" / "convert.py"), run_name="__main__")
    assert "Qwen2ForCausalLM" in capsys.readouterr().out
    assert checkpoint.is_converted_dir(out)
    loaded = models.load_model(out)  # stored bf16, cast to the requested float32
    direct = models.load_model(GOLDEN / "tiny_qwen2", dtype="bfloat16")
    _assert_same_params(jax.tree.map(lambda x: x.astype(jnp.float32), direct.params),
                        loaded.params)
    # Writing over a converted checkpoint replaces it; over other data is refused.
    checkpoint.save_converted(out, direct.params, direct.hf_config)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not a converted checkpoint"):
        checkpoint.save_converted(tmp_path / "other", direct.params, direct.hf_config)


def test_default_model_is_cached(tmp_path, monkeypatch):
    """A registered name is converted once into $JPAGED_CACHE, then restored."""
    from models import gguf
    calls = []

    def fake_find(name):
        calls.append(name)
        return str(tmp_path / "fake.gguf")

    def fake_convert(path, dtype):
        assert path == tmp_path / "fake.gguf"
        return real_convert(GOLDEN / "tiny_llama_gqa", dtype)

    real_convert = models._convert_source

    monkeypatch.setenv("JPAGED_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(gguf, "find_default_model", fake_find)
    monkeypatch.setattr(models, "_convert_source", fake_convert)
    first = models.load_model("smollm2-135m")
    assert checkpoint.is_converted_dir(tmp_path / "cache" / "smollm2-135m")
    second = models.load_model("smollm2-135m", dtype="bfloat16")
    assert calls == ["smollm2-135m"]
    assert second.dtype == "bfloat16"
    _assert_same_params(jax.tree.map(lambda x: x.astype(jnp.bfloat16), first.params),
                        second.params)


def test_fuse_columns_layout():
    """Hand-computed: parts [a0 a1 a2 a3] and [b0 b1] (column names) fused
    for 1 shard and for 2 (each shard's contiguous half is its own a, b)."""
    a = np.array([[0, 1, 2, 3]])
    b = np.array([[10, 11]])
    np.testing.assert_array_equal(convert.fuse_columns([a, b]), [[0, 1, 2, 3, 10, 11]])
    np.testing.assert_array_equal(convert.fuse_columns([a, b], 2), [[0, 1, 10, 2, 3, 11]])
    rng = np.random.default_rng(0)
    parts = [rng.normal(size=(3, w)).astype(np.float32) for w in (12, 6, 6)]
    for shards in (1, 2, 3, 6):
        fused = convert.fuse_columns(parts, shards)
        assert isinstance(fused, np.ndarray) and fused.shape == (3, 24)
        for x, y in zip(convert.split_columns(fused, (12, 6, 6), shards), parts):
            np.testing.assert_array_equal(x, y)
        traced = jax.jit(lambda f: convert.split_columns(f, (12, 6, 6), shards))(fused)
        for x, y in zip(traced, parts):
            np.testing.assert_array_equal(np.asarray(x), y)
        biases = [p[0] for p in parts]  # 1-D: the bias of each part
        np.testing.assert_array_equal(convert.fuse_columns(biases, shards), fused[0])


@pytest.mark.parametrize("name", ["llama_gqa", "opt_pre"])
def test_fuse_params_round_trip(name):
    model = models.load_model(GOLDEN / f"tiny_{name}")
    fused = model.config.fused_params()
    apart = convert.unfuse_params(model.params, fused)
    names = set(apart["layers_0"]["self_attn"])
    assert {"q_proj", "k_proj", "v_proj"} <= names and "qkv_proj" not in names
    if name == "llama_gqa":
        assert set(apart["layers_0"]["mlp"]) == {"gate_proj", "up_proj", "down_proj"}
    _assert_same_params(convert.fuse_params(apart, fused), model.params)
    _assert_same_params(convert.fuse_params(model.params, fused), model.params)  # no-op
    for shards in (2, 4):
        again = convert.fuse_params(convert.unfuse_params(
            convert.fuse_params(apart, fused, shards), fused, shards), fused)
        _assert_same_params(again, model.params)


def test_version_1_checkpoint_loads_fused(tmp_path):
    """A converted checkpoint of older jpaged (version 1: q/k/v and gate/up
    stored apart) loads into today's fused layout, same logits."""
    model = models.load_model(GOLDEN / "tiny_llama3_bias")
    apart = convert.unfuse_params(model.params, model.config.fused_params())
    out = checkpoint.save_converted(tmp_path / "v1", apart, model.hf_config)
    marker = out / checkpoint.MARKER
    meta = json.loads(marker.read_text())
    meta["version"] = 1
    marker.write_text(json.dumps(meta))
    assert checkpoint.load_converted(out).version == 1
    old = models.load_model(out)
    _assert_same_params(old.params, model.params)
    ids = [1, 5, 9, 3, 7]
    np.testing.assert_array_equal(old.logits(ids), model.logits(ids))
    meta["version"] = 3
    marker.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"unsupported format 'jpaged-converted' version 3"):
        models.load_model(out)


def test_rule_templates_map_both_ways():
    rule = Rule("model.layers.{i}.self_attn.{proj}.weight",
                "layers_{i}/self_attn/{proj}/kernel", "T")
    assert rule.match_hf("model.layers.12.self_attn.q_proj.weight") == (
        "layers_12", "self_attn", "q_proj", "kernel")
    assert rule.match_hf("model.layers.x.self_attn.q_proj.weight") is None
    assert rule.match_hf("model.layers.1.self_attn.q.proj.weight") is None
    assert rule.hf_name(("layers_3", "self_attn", "o_proj", "kernel")) == \
        "model.layers.3.self_attn.o_proj.weight"


def test_llama_config_rope_layouts():
    base = dict(vocab_size=10, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                num_attention_heads=4, max_position_embeddings=64)
    old = LlamaConfig.from_hf(dict(base, rope_theta=5e5,
                                   rope_scaling={"type": "linear", "factor": 4.0}))
    new = LlamaConfig.from_hf(dict(base, rope_parameters={"rope_type": "linear", "factor": 4.0,
                                                          "rope_theta": 5e5}))
    assert old == new
    assert (old.rope_type, old.rope_theta, old.rope_factor) == ("linear", 5e5, 4.0)
    assert old.num_kv_heads == 4 and old.head_dim == 16
    plain = LlamaConfig.from_hf(base)
    assert (plain.rope_type, plain.rope_theta) == ("default", 10000.0)
    np.testing.assert_allclose(old.inv_freq(), plain.inv_freq() * 10000.0 ** (
        np.arange(0, 16, 2) / 16) / 5e5 ** (np.arange(0, 16, 2) / 16) / 4.0, rtol=1e-5)
    qwen = LlamaConfig.from_hf(dict(base, model_type="qwen2", eos_token_id=[5, 6]))
    assert qwen.qkv_bias and not qwen.o_bias and qwen.eos_token_ids == (5, 6)


def test_random_model_presets_and_kv_pool():
    model = models.random_model(dict(models.PRESETS["smollm2-135m-shape"], num_hidden_layers=1,
                                     vocab_size=300), dtype="bfloat16", seed=3)
    c = model.config
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.tie_word_embeddings) == (9, 3, 64, True)
    assert model.tokenizer is None
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(model.params))
    caches = model.init_kv_caches(5, 8)
    assert len(caches) == 1 and caches[0].shape == (2, 5, 3, 8, 64)
    assert caches[0].dtype == jnp.bfloat16
    assert model.kv_bytes_per_block(8) == 2 * 1 * 3 * 8 * 64 * 2
    new = model.generate_greedy([1, 2, 3], 3, block_size=8, stop_at_eos=False)
    assert len(new) == 3 and all(0 <= t < 300 for t in new)
    for name in models.PRESETS:
        cfg = models.ARCHITECTURES[models.architecture_of(models.PRESETS[name])] \
            .config_cls.from_hf(models.PRESETS[name])
        assert cfg.num_layers > 0, name
    assert models.PRESETS["opt-13b"]["num_hidden_layers"] == 40
