"""Llama-family decoder (Llama 1/2/3, TinyLlama, SmolLM2, Mistral, Qwen2) on
the paged KV cache.

RMSNorm, SwiGLU MLP, rotary embeddings (default / linear / llama3 scaling),
grouped-query attention with any group size, tied or untied embeddings,
optional q/k/v/o and MLP biases. See models/base.py for the call signature.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from models.base import (ROPE_TYPES, Linear, RMSNorm, apply_rope, gather_logits, lm_logits,
                         num_shards, rope_inv_freq, sharded_attention)
from models.convert import Fused, Rule, split_columns


def _as_tuple(x) -> tuple[int, ...]:
    if x is None:
        return ()
    return tuple(int(i) for i in x) if isinstance(x, (list, tuple)) else (int(x),)


def _rope_parameters(hf: dict) -> dict:
    """Merges the two transformers layouts: ``rope_theta`` / ``rope_scaling`` at
    the top level (transformers 4) and the ``rope_parameters`` dict (5)."""
    params = dict(hf.get("rope_scaling") or {})
    params.update(hf.get("rope_parameters") or {})
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params["type"]
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    return params


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shape and options of a Llama-family model (built by ``from_hf``)."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_type: str = "default"
    rope_theta: float = 10000.0
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type {self.rope_type!r} is not supported; "
                             f"supported: {ROPE_TYPES}")

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @classmethod
    def from_hf(cls, hf: dict) -> "LlamaConfig":
        """From a Hugging Face config dict (llama, mistral or qwen2 model_type)."""
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported (only 'silu')")
        model_type = hf.get("model_type", "llama")
        if model_type == "mistral" and hf.get("sliding_window") not in (None, 0):
            if hf["sliding_window"] < hf.get("max_position_embeddings", 0):
                raise ValueError("Mistral sliding-window attention is not supported "
                                 f"(sliding_window={hf['sliding_window']})")
        if model_type == "qwen2" and hf.get("use_sliding_window"):
            raise ValueError("Qwen2 sliding-window attention is not supported "
                             "(use_sliding_window=true)")
        num_heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        rope = _rope_parameters(hf)
        max_pos = int(hf.get("max_position_embeddings", 2048))
        attention_bias = bool(hf.get("attention_bias", False))
        return cls(
            vocab_size=int(hf["vocab_size"]), hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]), num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(hf.get("head_dim") or hidden // num_heads),
            max_position_embeddings=max_pos,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_type=rope["rope_type"], rope_theta=float(rope["rope_theta"]),
            rope_factor=float(rope.get("factor", 1.0)),
            rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            rope_original_max_position_embeddings=int(
                rope.get("original_max_position_embeddings", max_pos)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=attention_bias or model_type == "qwen2",
            o_bias=attention_bias, mlp_bias=bool(hf.get("mlp_bias", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=_as_tuple(hf.get("eos_token_id")))

    @property
    def qkv_widths(self) -> tuple[int, int, int]:
        """Columns of q, k and v in the fused qkv_proj."""
        kv = self.num_kv_heads * self.head_dim
        return self.num_heads * self.head_dim, kv, kv

    def fused_params(self) -> tuple[Fused, ...]:
        """The params that are HF projections side by side (models.convert.Fused)."""
        q, k, v = self.qkv_widths
        i = self.intermediate_size
        return (Fused("layers_{i}/self_attn/qkv_proj",
                      (("q_proj", q), ("k_proj", k), ("v_proj", v))),
                Fused("layers_{i}/mlp/gate_up_proj", (("gate_proj", i), ("up_proj", i))))

    def inv_freq(self):
        return rope_inv_freq(self.head_dim, self.rope_theta, self.rope_type, self.rope_factor,
                             self.rope_low_freq_factor, self.rope_high_freq_factor,
                             self.rope_original_max_position_embeddings)


class LlamaAttention(nn.Module):
    config: LlamaConfig
    dtype: Any
    attention_backend: str
    interpret: bool
    mesh: Any = None

    @nn.compact
    def __call__(self, x, positions, kv_cache, metadata):
        c = self.config
        n = x.shape[0]
        # NOTE: one matmul for q, k and v; under tensor parallelism its
        # columns are laid out per device (fuse_columns), so each device's
        # share splits into its own heads' q, k and v.
        qkv = Linear(sum(c.qkv_widths), c.qkv_bias, self.dtype, name="qkv_proj")(x)
        q, k, v = split_columns(qkv, c.qkv_widths, num_shards(self.mesh))
        inv_freq = c.inv_freq()
        q = apply_rope(q.reshape(n, c.num_heads, c.head_dim), positions, inv_freq)
        k = apply_rope(k.reshape(n, c.num_kv_heads, c.head_dim), positions, inv_freq)
        v = v.reshape(n, c.num_kv_heads, c.head_dim)
        out, kv_cache = sharded_attention(
            q, k, v, kv_cache, metadata, scale=c.head_dim ** -0.5,
            backend=self.attention_backend, interpret=self.interpret, mesh=self.mesh)
        out = out.reshape(n, c.num_heads * c.head_dim)
        return Linear(c.hidden_size, c.o_bias, self.dtype, name="o_proj")(out), kv_cache


class LlamaMLP(nn.Module):
    config: LlamaConfig
    dtype: Any
    mesh: Any = None

    @nn.compact
    def __call__(self, x):
        c = self.config
        gate_up = Linear(2 * c.intermediate_size, c.mlp_bias, self.dtype, name="gate_up_proj")(x)
        gate, up = split_columns(gate_up, (c.intermediate_size,) * 2, num_shards(self.mesh))
        return Linear(c.hidden_size, c.mlp_bias, self.dtype, name="down_proj")(nn.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    config: LlamaConfig
    dtype: Any
    attention_backend: str
    interpret: bool
    mesh: Any = None

    @nn.compact
    def __call__(self, x, positions, kv_cache, metadata):
        c = self.config
        h = RMSNorm(c.rms_norm_eps, self.dtype, name="input_layernorm")(x)
        h, kv_cache = LlamaAttention(c, self.dtype, self.attention_backend, self.interpret,
                                     self.mesh, name="self_attn")(h, positions, kv_cache, metadata)
        x = x + h
        h = RMSNorm(c.rms_norm_eps, self.dtype, name="post_attention_layernorm")(x)
        return x + LlamaMLP(c, self.dtype, self.mesh, name="mlp")(h), kv_cache


class LlamaForCausalLM(nn.Module):
    """Llama-family causal LM on the paged KV cache (signature in models/base.py).

    Params: embed_tokens/embedding [vocab, hidden]; layers_{i}/...; norm/scale;
    lm_head [hidden, vocab] unless embeddings are tied. Each layer's
    self_attn/qkv_proj kernel is [hidden, (num_heads + 2 * num_kv_heads) *
    head_dim] (q, k, v columns side by side) and mlp/gate_up_proj [hidden, 2 *
    intermediate] (gate, up); see config.fused_params(). ``mesh``: a device
    mesh with a "tp" axis for tensor parallelism (jpaged.parallel), or None.
    ``attention_backend``: a kernels_pallas backend name or an attention
    callable (models.base.sharded_attention).
    """
    config: LlamaConfig
    dtype: Any = jnp.float32
    attention_backend: str = "auto"
    interpret: bool = False
    mesh: Any = None

    @nn.compact
    def __call__(self, input_ids, positions, kv_caches, metadata, logits_indices=None):
        c = self.config
        if len(kv_caches) != c.num_layers:
            raise ValueError(f"expected {c.num_layers} KV cache arrays, got {len(kv_caches)}")
        embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype,
                         param_dtype=self.dtype, name="embed_tokens")
        x = embed(input_ids)
        new_caches = []
        for i in range(c.num_layers):
            x, cache = LlamaDecoderLayer(c, self.dtype, self.attention_backend, self.interpret,
                                         self.mesh, name=f"layers_{i}")(
                x, positions, kv_caches[i], metadata)
            new_caches.append(cache)
        if logits_indices is not None:
            x = x[logits_indices]
        x = RMSNorm(c.rms_norm_eps, self.dtype, name="norm")(x)
        if c.tie_word_embeddings:
            weight = embed.embedding.T
        else:
            weight = self.param("lm_head", nn.initializers.lecun_normal(),
                                (c.hidden_size, c.vocab_size), self.dtype)
        return gather_logits(lm_logits(x, weight), self.mesh), tuple(new_caches)


# HF tensor names -> our params (models/convert.py applies the table); q/k/v
# and gate/up land in their fused params (LlamaConfig.fused_params).
HF_RULES = (
    Rule("model.embed_tokens.weight", "embed_tokens/embedding"),
    Rule("model.layers.{i}.self_attn.{proj}.weight", "layers_{i}/self_attn/{proj}/kernel", "T"),
    Rule("model.layers.{i}.self_attn.{proj}.bias", "layers_{i}/self_attn/{proj}/bias"),
    Rule("model.layers.{i}.mlp.{proj}.weight", "layers_{i}/mlp/{proj}/kernel", "T"),
    Rule("model.layers.{i}.mlp.{proj}.bias", "layers_{i}/mlp/{proj}/bias"),
    Rule("model.layers.{i}.{norm}.weight", "layers_{i}/{norm}/scale"),
    Rule("model.norm.weight", "norm/scale"),
    Rule("lm_head.weight", "lm_head", "T"),
)


def hf_ignore(config: LlamaConfig) -> tuple[str, ...]:
    """HF tensors the converter skips: rotary buffers, a tied lm_head copy."""
    ignore = (r".*rotary_emb\.inv_freq",)
    return ignore + ((r"lm_head\.weight",) if config.tie_word_embeddings else ())


def normalize_hf_name(name: str) -> str:
    return name
