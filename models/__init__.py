"""models: the Flax model zoo with a paged KV cache (OPT, Llama family).

    model = models.load_model("smollm2-135m")              # or an HF dir, a .gguf,
    model.generate_greedy(ids, max_new_tokens=20)          # or a converted dir
    model = models.random_model("opt-1.3b", "bfloat16")   # benchmarks

``load_model`` accepts: a registered name (DEFAULT_MODELS), a Hugging Face
directory (config.json + safetensors / sharded safetensors / pytorch_model.bin),
a directory written by ``models.checkpoint.save_converted`` (scripts/convert.py),
or a .gguf file. Default models are converted on first use and cached under
$JPAGED_CACHE (default ~/.cache/jpaged)/<name>; a cache found incomplete or
corrupt is rebuilt from the GGUF, with a warning.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import pathlib
import shutil
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp

import kernels_pallas
from models import checkpoint, convert, llama, opt
from models.base import (DTYPES, LoadedModel, canonical_dtype, compiler_options,
                         single_sequence_metadata)
from models.llama import LlamaConfig, LlamaForCausalLM
from models.opt import OPTConfig, OPTForCausalLM


class _DropTorchAdvisory(logging.Filter):
    """Drops transformers' import-time "PyTorch was not found" advisory (jpaged
    needs no torch); every other transformers message passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("PyTorch was not found.")


# NOTE: nothing above imports transformers (models import it lazily), so the
# filter is on its logger "transformers", which logs the advisory, in time.
if not any(isinstance(f, _DropTorchAdvisory) for f in logging.getLogger("transformers").filters):
    logging.getLogger("transformers").addFilter(_DropTorchAdvisory())


@dataclasses.dataclass(frozen=True)
class Family:
    config_cls: type
    module_cls: type
    rules: tuple
    ignore: Callable
    normalize_hf_name: Callable


_LLAMA = Family(LlamaConfig, LlamaForCausalLM, llama.HF_RULES, llama.hf_ignore,
                llama.normalize_hf_name)
_OPT = Family(OPTConfig, OPTForCausalLM, opt.HF_RULES, opt.hf_ignore, opt.normalize_hf_name)

ARCHITECTURES: dict[str, Family] = {
    "LlamaForCausalLM": _LLAMA,
    "MistralForCausalLM": _LLAMA,
    "Qwen2ForCausalLM": _LLAMA,
    "OPTForCausalLM": _OPT,
}
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM", "opt": "OPTForCausalLM"}

DEFAULT_MODELS = ("smollm2-135m",)

# Random-weight presets for benchmarks: the HF config of real models' shapes.
_TINYLLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=32000,
                  hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                  num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                  rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2)
_LLAMA1 = dict(_TINYLLAMA, rms_norm_eps=1e-6)
_OPT_BASE = dict(architectures=["OPTForCausalLM"], model_type="opt", vocab_size=50272,
                 max_position_embeddings=2048, do_layer_norm_before=True,
                 activation_function="relu", bos_token_id=2, eos_token_id=2, pad_token_id=1)
PRESETS: dict[str, dict] = {
    "llama-1.1b": _TINYLLAMA,
    "smollm2-135m-shape": dict(_TINYLLAMA, vocab_size=49152, hidden_size=576,
                               intermediate_size=1536, num_hidden_layers=30,
                               num_attention_heads=9, num_key_value_heads=3,
                               max_position_embeddings=8192, rope_theta=100000.0,
                               tie_word_embeddings=True, eos_token_id=2, bos_token_id=1),
    "llama-7b": dict(_LLAMA1, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32),
    "llama-13b": dict(_LLAMA1, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                      num_attention_heads=40, num_key_value_heads=40),
    "opt-125m": dict(_OPT_BASE, hidden_size=768, ffn_dim=3072, num_hidden_layers=12,
                     num_attention_heads=12),
    "opt-350m": dict(_OPT_BASE, hidden_size=1024, ffn_dim=4096, num_hidden_layers=24,
                     num_attention_heads=16, word_embed_proj_dim=512,
                     do_layer_norm_before=False),
    "opt-1.3b": dict(_OPT_BASE, hidden_size=2048, ffn_dim=8192, num_hidden_layers=24,
                     num_attention_heads=32),
    "opt-2.7b": dict(_OPT_BASE, hidden_size=2560, ffn_dim=10240, num_hidden_layers=32,
                     num_attention_heads=32),
    "opt-6.7b": dict(_OPT_BASE, hidden_size=4096, ffn_dim=16384, num_hidden_layers=32,
                     num_attention_heads=32),
    "opt-13b": dict(_OPT_BASE, hidden_size=5120, ffn_dim=20480, num_hidden_layers=40,
                    num_attention_heads=40),
}


def load_hf_config(spec: str) -> dict:
    """A PRESETS entry's HF config, or one read from a JSON file."""
    if spec in PRESETS:
        return dict(PRESETS[spec])
    if os.path.isfile(spec):
        with open(spec) as f:
            return json.load(f)
    raise ValueError(f"model {spec!r} is neither a preset {sorted(PRESETS)} "
                     "nor a JSON file with an HF config")


def architecture_of(hf_config: dict) -> str:
    """The supported architecture name an HF config dict declares, or ValueError."""
    names = list(hf_config.get("architectures") or [])
    if not names and hf_config.get("model_type") in _MODEL_TYPES:
        names = [_MODEL_TYPES[hf_config["model_type"]]]
    for name in names:
        if name in ARCHITECTURES:
            return name
    declared = names or [hf_config.get("model_type")]
    raise ValueError(f"unknown architecture {declared}; supported: {sorted(ARCHITECTURES)}")


def _build(hf_config: dict, dtype: str, attention_backend: str, interpret: bool,
           source: str | None = None):
    """(architecture, family, config, module); errors name ``source``, the config's file."""
    try:
        architecture = architecture_of(hf_config)
        family = ARCHITECTURES[architecture]
        config = family.config_cls.from_hf(hf_config)
    except KeyError as e:
        if source is None:
            raise ValueError(f"the HF config lacks the required key {e.args[0]!r}") from None
        raise ValueError(f"{source} lacks the required key {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        if source is None:
            raise
        raise ValueError(f"{source}: {e}") from e
    module = family.module_cls(config, dtype=DTYPES[dtype],
                               attention_backend=attention_backend, interpret=interpret)
    return architecture, family, config, module


def _dummy_inputs(config):
    kv_shape = (2, 2, config.num_kv_heads, 1, config.head_dim)
    kv_caches = tuple(jnp.zeros(kv_shape, jnp.float32) for _ in range(config.num_layers))
    positions, metadata = single_sequence_metadata(0, 1, [1], 1)
    return jnp.zeros((1,), jnp.int32), jnp.asarray(positions), kv_caches, metadata


def abstract_params(module) -> Any:
    """Pytree of jax.ShapeDtypeStruct: the params the module expects."""
    inputs = _dummy_inputs(module.config)
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs))
    return shapes["params"]


def _loaded(hf_config, params, tokenizer, dtype, attention_backend, interpret,
            source: str | None = None) -> LoadedModel:
    architecture, _, config, module = _build(hf_config, dtype, attention_backend, interpret,
                                             source)
    params = jax.device_put(params, jax.local_devices()[0])
    return LoadedModel(config=config, hf_config=hf_config, params=params, module=module,
                       tokenizer=tokenizer, architecture=architecture, dtype=dtype)


def convert_hf_state_dict(hf_config: dict, state_dict: dict, dtype="float32",
                          source: str = "checkpoint"):
    """HF config + HF-named tensors -> our params in ``dtype`` (table-driven).

    Raises ValueError listing every missing / misshapen / unknown tensor.
    """
    dtype = canonical_dtype(dtype)
    _, family, config, module = _build(hf_config, dtype, "reference", False, source)
    state_dict = {family.normalize_hf_name(k): v for k, v in state_dict.items()}
    return convert.convert_state_dict(state_dict, family.rules, abstract_params(module),
                                      DTYPES[dtype], ignore=family.ignore(config),
                                      fused=config.fused_params(), source=source)


def _hf_tokenizer(model_dir: pathlib.Path):
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(model_dir))


def _convert_source(path: pathlib.Path, dtype: str):
    """(hf_config, params, tokenizer) from an HF directory or a .gguf file."""
    if path.is_file() and path.suffix == ".gguf":
        from models import gguf, tokenizer as gguf_tokenizer
        hf_config, state_dict = gguf.load_gguf(str(path))
        params = convert_hf_state_dict(hf_config, state_dict, dtype, source=str(path))
        return hf_config, params, gguf_tokenizer.tokenizer_from_gguf(str(path))
    if path.is_file():
        raise ValueError(f"{path} is a file but not a .gguf; pass a model directory, "
                         "a .gguf file or one of " + str(list(DEFAULT_MODELS)))
    hf_config = convert.read_hf_config(path)
    # Fail on an unknown architecture or a bad config before reading weights.
    _build(hf_config, dtype, "reference", False, source=str(path / "config.json"))
    state_dict = convert.read_hf_state_dict(path)
    params = convert_hf_state_dict(hf_config, state_dict, dtype, source=str(path))
    return hf_config, params, _hf_tokenizer(path)


def cache_dir() -> pathlib.Path:
    """Where default models are cached after conversion: $JPAGED_CACHE or ~/.cache/jpaged."""
    return pathlib.Path(os.environ.get("JPAGED_CACHE") or "~/.cache/jpaged").expanduser()


def _cast(params, dtype: str):
    return jax.tree.map(lambda x: x.astype(DTYPES[dtype]) if x.dtype != DTYPES[dtype] else x,
                        params)


def load_model(name_or_path, dtype="float32", attention_backend: str = "auto",
               interpret: bool = False) -> LoadedModel:
    """Loads a model by registered name or path (see the module docstring).

    Args:
      name_or_path:      "smollm2-135m", an HF directory, a converted directory
                         or a .gguf file.
      dtype:             "float32" | "bfloat16" | "float16": params and compute.
      attention_backend: kernels_pallas backend ("auto", "reference", "gpu", "tpu").
      interpret:         run Pallas kernels in interpret mode.
    """
    dtype = canonical_dtype(dtype)
    kernels_pallas.resolve_backend(attention_backend)
    name = str(name_or_path)
    if name in DEFAULT_MODELS:
        cached = cache_dir() / name
        saved = _load_default(name, cached)
        return _loaded(saved.hf_config, _cast(saved.params, dtype), saved.tokenizer, dtype,
                       attention_backend, interpret, source=str(cached / checkpoint.MARKER))
    path = pathlib.Path(name).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no model at {path}: pass an existing Hugging Face "
                                "directory, converted directory or .gguf file, or one of "
                                f"{list(DEFAULT_MODELS)}")
    if checkpoint.is_converted_dir(path):
        saved = _load_converted(path)
        return _loaded(saved.hf_config, _cast(saved.params, dtype), saved.tokenizer, dtype,
                       attention_backend, interpret, source=str(path / checkpoint.MARKER))
    hf_config, params, tokenizer = _convert_source(path, dtype)
    return _loaded(hf_config, params, tokenizer, dtype, attention_backend, interpret)


# What save_converted writes into a checkpoint, and orbax's own temporary
# "params.orbax-checkpoint-tmp-*": a cache directory holding only these is a
# partial conversion of ours and safe to delete.
_CHECKPOINT_ENTRIES = (checkpoint.MARKER, "params", "tokenizer")


def _is_ours(directory: pathlib.Path) -> bool:
    return directory.is_dir() and all(
        p.name.startswith(_CHECKPOINT_ENTRIES) for p in directory.iterdir())


def _load_default(name: str, cached: pathlib.Path) -> checkpoint.ConvertedCheckpoint:
    """The default model's converted cache, (re)built from its GGUF when it is
    absent, partial, corrupt or unreadable."""
    from models import gguf
    if cached.exists() or cached.is_symlink():
        try:
            return _load_converted(cached)
        except (OSError, ValueError) as e:
            problem = e
        if not checkpoint.is_converted_dir(cached):
            if not _is_ours(cached):
                raise ValueError(
                    f"{cached} is where jpaged caches {name!r}, but it holds files jpaged "
                    "did not write; move them away, or set JPAGED_CACHE to another "
                    "directory") from problem
            # NOTE: a partial directory from a save that was not atomic (older
            # jpaged); save_converted replaces only real checkpoints.
            shutil.rmtree(cached, ignore_errors=True)
        warnings.warn(f"the converted cache {cached} of {name!r} is unusable, rebuilding it "
                      f"from the GGUF: {problem}", stacklevel=3)
    hf_config, params, tokenizer = _convert_source(
        pathlib.Path(gguf.find_default_model(name)), "float32")
    checkpoint.save_converted(cached, params, hf_config, tokenizer)
    return _load_converted(cached)


def _load_converted(path: pathlib.Path) -> checkpoint.ConvertedCheckpoint:
    """checkpoint.load_converted, with a version-1 checkpoint's separate
    q/k/v and gate/up projections fused into the layout the modules use.

    NOTE: the fused copies are made next to the restored arrays, so loading
    an old checkpoint briefly needs the memory of those projections twice;
    scripts/convert.py writes the current version, which needs no step.
    """
    saved = checkpoint.load_converted(path)
    if saved.version >= 2:
        return saved
    source = str(path / checkpoint.MARKER)
    _, _, config, _ = _build(saved.hf_config, saved.dtype, "reference", False, source)
    return saved._replace(params=convert.fuse_params(saved.params, config.fused_params()),
                          version=checkpoint.VERSION)


def random_model(hf_config, dtype="float32", seed: int = 0,
                 attention_backend: str = "auto", interpret: bool = False,
                 fast_init: bool = False) -> LoadedModel:
    """A model with random weights and no tokenizer (for benchmarks and tests).

    Args:
      hf_config: an HF config dict, or a preset name from PRESETS.
      dtype:     params and compute dtype.
      seed:      PRNG seed of the initialisation.
      fast_init: draw each weight on its own (normal / sqrt(fan-in) kernels,
        0.02-scaled embeddings, unit norm scales, zero biases) instead of
        the modules' own init: the latter compiles the whole model's init as
        one program (about a minute for a 1.1B Llama on an H100 host), this
        compiles one small program per distinct weight shape. Other values.
    """
    dtype = canonical_dtype(dtype)
    if isinstance(hf_config, str):
        if hf_config not in PRESETS:
            raise ValueError(f"unknown preset {hf_config!r}; presets: {sorted(PRESETS)}")
        hf_config = PRESETS[hf_config]
    hf_config = dict(hf_config)
    _, _, config, module = _build(hf_config, dtype, attention_backend, interpret)
    if fast_init:
        params = _fast_random_params(abstract_params(module), seed)
    else:
        inputs = _dummy_inputs(config)
        init = jax.jit(lambda key: module.init(key, *inputs)["params"])
        params = init(jax.random.key(seed))
    return _loaded(hf_config, params, None, dtype, attention_backend, interpret)


def _fast_random_params(abstract, seed: int):
    """Random params of `abstract`'s shapes, one cached program per shape."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = []
    for (path, leaf), key in zip(leaves, keys):
        name = str(getattr(path[-1], "key", path[-1]))
        kind = ("zeros" if name == "bias" else "ones" if name == "scale"
                else "embedding" if name == "embedding" else "kernel")
        out.append(_draw_leaf(key, leaf.shape, jnp.dtype(leaf.dtype), kind))
    return jax.tree_util.tree_unflatten(treedef, out)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _draw_leaf(key, shape, dtype, kind):
    if kind == "zeros":
        return jnp.zeros(shape, dtype)
    if kind == "ones":
        return jnp.ones(shape, dtype)
    std = 0.02 if kind == "embedding" else shape[0] ** -0.5
    return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


__all__ = ["ARCHITECTURES", "DEFAULT_MODELS", "PRESETS", "LlamaConfig", "LlamaForCausalLM",
           "LoadedModel", "OPTConfig", "OPTForCausalLM", "abstract_params",
           "architecture_of", "cache_dir", "compiler_options", "convert_hf_state_dict", "load_model",
           "random_model", "single_sequence_metadata"]
