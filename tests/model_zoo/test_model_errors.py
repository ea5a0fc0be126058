"""Bad inputs to the model zoo give errors that say what is wrong."""
from __future__ import annotations

import json
import pathlib
import re
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import models
from models import checkpoint

GOLDEN = pathlib.Path(__file__).resolve().parents[1] / "golden"


def _copy_fixture(tmp_path, name="tiny_llama_gqa") -> pathlib.Path:
    dst = tmp_path / name
    shutil.copytree(GOLDEN / name, dst)
    return dst


def _edit_config(path: pathlib.Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_missing_path():
    with pytest.raises(FileNotFoundError, match="no model at .*does_not_exist"):
        models.load_model("/nonexistent/does_not_exist")


def test_unknown_registered_name_is_a_missing_path():
    with pytest.raises(FileNotFoundError, match="smollm2-135m"):
        models.load_model("smollm9-1t")


def test_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        models.load_model(tmp_path)


def test_config_that_is_not_json(tmp_path):
    path = _copy_fixture(tmp_path)
    (path / "config.json").write_text('{\n  "hidden_size": 48,,\n}')
    config = re.escape(str(path / "config.json"))
    with pytest.raises(ValueError, match=rf"{config} is not valid JSON: Expecting property "
                                         r"name .* at line 2 column 21"):
        models.load_model(path)
    (path / "config.json").write_text('["LlamaForCausalLM"]')
    with pytest.raises(ValueError, match=r"config.json holds a JSON list, expected an object"):
        models.load_model(path)


def test_config_missing_a_required_key(tmp_path, monkeypatch):
    path = _copy_fixture(tmp_path)
    config = json.loads((path / "config.json").read_text())
    del config["hidden_size"]
    (path / "config.json").write_text(json.dumps(config))
    # The config is checked before any weight is read.
    monkeypatch.setattr(models.convert, "read_hf_state_dict", lambda p: pytest.fail("read"))
    config = re.escape(str(path / "config.json"))
    with pytest.raises(ValueError, match=rf"{config} lacks the required key 'hidden_size'"):
        models.load_model(path)


def test_sharded_index_that_is_not_json(tmp_path):
    path = _copy_fixture(tmp_path, "tiny_llama_sharded")
    (path / "model.safetensors.index.json").write_text("{")
    with pytest.raises(ValueError, match=r"model.safetensors.index.json is not valid JSON"):
        models.load_model(path)


def test_directory_without_weights(tmp_path):
    path = _copy_fixture(tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has no weights"):
        models.load_model(path)


def test_sharded_index_with_missing_shard(tmp_path):
    path = _copy_fixture(tmp_path, "tiny_llama_sharded")
    (path / "model-00002-of-00004.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00004.safetensors"):
        models.load_model(path)


def test_unknown_architecture(tmp_path):
    path = _copy_fixture(tmp_path)
    _edit_config(path, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(ValueError, match=r"unknown architecture \['GPT2LMHeadModel'\]; "
                                         r"supported: .*LlamaForCausalLM.*OPTForCausalLM"):
        models.load_model(path)
    with pytest.raises(ValueError, match="unknown architecture"):
        models.random_model({"architectures": ["BertModel"]})


def test_missing_misshapen_and_unknown_tensors_reported_together(tmp_path):
    path = _copy_fixture(tmp_path)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    del tensors["model.norm.weight"]
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((5, 48), np.float32)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros(8, np.float32)  # ignored
    tensors["model.vision_tower.weight"] = np.zeros(3, np.float32)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError) as info:
        models.load_model(path)
    msg = str(info.value)
    assert "2 missing tensors" in msg
    assert "model.layers.1.mlp.up_proj.weight" in msg and "model.norm.weight" in msg
    assert "1 misshapen tensors" in msg
    assert "model.layers.0.self_attn.k_proj.weight: shape (5, 48), expected (32, 48)" in msg
    assert "1 unknown tensors" in msg and "model.vision_tower.weight" in msg
    assert "inv_freq" not in msg


def test_tensor_the_config_does_not_use(tmp_path):
    path = _copy_fixture(tmp_path, "tiny_llama3_bias")
    _edit_config(path, mlp_bias=False)
    with pytest.raises(ValueError, match=r"unexpected tensors.*\n.*mlp\.down_proj\.bias"):
        models.load_model(path)


def test_untied_model_without_lm_head(tmp_path):
    path = _copy_fixture(tmp_path)
    tensors = load_file(path / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"1 missing tensors:\n  lm_head.weight"):
        models.load_model(path)


def test_unsupported_rope_and_activation(tmp_path):
    path = _copy_fixture(tmp_path)
    _edit_config(path, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4})
    with pytest.raises(ValueError, match="rope_type 'yarn' is not supported"):
        models.load_model(path)
    _edit_config(path, rope_parameters=None, hidden_act="gelu")
    with pytest.raises(ValueError, match="hidden_act 'gelu'"):
        models.load_model(path)


def test_bad_dtype_backend_and_preset():
    with pytest.raises(ValueError, match="dtype must be one of"):
        models.load_model(GOLDEN / "tiny_opt_pre", dtype="float64")
    with pytest.raises(ValueError, match="backend must be one of"):
        models.load_model(GOLDEN / "tiny_opt_pre", attention_backend="cuda")
    with pytest.raises(ValueError, match="unknown preset 'opt-175b'"):
        models.random_model("opt-175b")


def test_file_that_is_not_gguf(tmp_path):
    path = tmp_path / "weights.npz"
    path.write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf"):
        models.load_model(path)


def test_bad_token_ids_and_lengths():
    model = models.load_model(GOLDEN / "tiny_opt_pre")
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 256\)"):
        model.logits([1, 256])
    with pytest.raises(ValueError, match="must not be empty"):
        model.logits([])
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings"):
        model.generate_greedy([1] * 60, 10)


def test_converted_dir_with_wrong_format(tmp_path):
    model = models.load_model(GOLDEN / "tiny_opt_pre")
    out = checkpoint.save_converted(tmp_path / "c", model.params, model.hf_config)
    meta = json.loads((out / checkpoint.MARKER).read_text())
    (out / checkpoint.MARKER).write_text(json.dumps(dict(meta, version=99)))
    with pytest.raises(ValueError, match="unsupported format"):
        models.load_model(out)
