"""OPT decoder (facebook/opt-125m ... 66b) on the paged KV cache.

Learned positions with OPT's offset of 2, ReLU MLP, multi-head attention,
pre- or post-layer-norm (``do_layer_norm_before``), optional project_in /
project_out when ``word_embed_proj_dim != hidden_size`` (OPT-350m), lm_head
tied to the token embedding. See models/base.py for the call signature.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from models.base import Linear, gather_logits, lm_logits, num_shards, sharded_attention
from models.convert import Fused, Rule, split_columns

POSITION_OFFSET = 2  # OPT's learned position table starts at row 2


def _as_tuple(x) -> tuple[int, ...]:
    if x is None:
        return ()
    return tuple(int(i) for i in x) if isinstance(x, (list, tuple)) else (int(x),)


@dataclasses.dataclass(frozen=True)
class OPTConfig:
    """Shape and options of an OPT model (built by ``from_hf``)."""
    vocab_size: int
    hidden_size: int
    ffn_dim: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int
    word_embed_proj_dim: int
    do_layer_norm_before: bool = True
    remove_final_layer_norm: bool = False
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    layer_norm_eps: float = 1e-5
    bos_token_id: int | None = 2
    eos_token_ids: tuple[int, ...] = (2,)

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "ffn_dim", "num_layers", "num_heads",
                     "max_position_embeddings", "word_embed_proj_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of "
                             f"num_heads ({self.num_heads})")

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @property
    def tie_word_embeddings(self) -> bool:
        return True

    @property
    def has_final_layer_norm(self) -> bool:
        return self.do_layer_norm_before and not self.remove_final_layer_norm

    @property
    def qkv_widths(self) -> tuple[int, int, int]:
        """Columns of q, k and v in the fused qkv_proj."""
        return (self.num_heads * self.head_dim,) * 3

    def fused_params(self) -> tuple[Fused, ...]:
        """The params that are HF projections side by side (models.convert.Fused)."""
        q, k, v = self.qkv_widths
        return (Fused("layers_{i}/self_attn/qkv_proj",
                      (("q_proj", q), ("k_proj", k), ("v_proj", v))),)

    @classmethod
    def from_hf(cls, hf: dict) -> "OPTConfig":
        """From a Hugging Face OPT config dict."""
        act = hf.get("activation_function", "relu")
        if act != "relu":
            raise ValueError(f"activation_function {act!r} is not supported (only 'relu')")
        hidden = int(hf["hidden_size"])
        return cls(
            vocab_size=int(hf["vocab_size"]), hidden_size=hidden, ffn_dim=int(hf["ffn_dim"]),
            num_layers=int(hf["num_hidden_layers"]), num_heads=int(hf["num_attention_heads"]),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            word_embed_proj_dim=int(hf.get("word_embed_proj_dim") or hidden),
            do_layer_norm_before=bool(hf.get("do_layer_norm_before", True)),
            remove_final_layer_norm=bool(hf.get("_remove_final_layer_norm", False)),
            enable_bias=bool(hf.get("enable_bias", True)),
            layer_norm_elementwise_affine=bool(hf.get("layer_norm_elementwise_affine", True)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=_as_tuple(hf.get("eos_token_id")))


def _layer_norm(c: OPTConfig, dtype, name: str) -> nn.LayerNorm:
    affine = c.layer_norm_elementwise_affine
    return nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=dtype, param_dtype=dtype,
                        use_scale=affine, use_bias=affine, name=name)


class OPTAttention(nn.Module):
    config: OPTConfig
    dtype: Any
    attention_backend: str
    interpret: bool
    mesh: Any = None

    @nn.compact
    def __call__(self, x, kv_cache, metadata):
        c = self.config
        n = x.shape[0]
        shape = (n, c.num_heads, c.head_dim)
        qkv = Linear(sum(c.qkv_widths), c.enable_bias, self.dtype, name="qkv_proj")(x)
        q, k, v = (y.reshape(shape) for y in
                   split_columns(qkv, c.qkv_widths, num_shards(self.mesh)))
        out, kv_cache = sharded_attention(
            q, k, v, kv_cache, metadata, scale=c.head_dim ** -0.5,
            backend=self.attention_backend, interpret=self.interpret, mesh=self.mesh)
        out = out.reshape(n, c.hidden_size)
        return Linear(c.hidden_size, c.enable_bias, self.dtype, name="out_proj")(out), kv_cache


class OPTDecoderLayer(nn.Module):
    config: OPTConfig
    dtype: Any
    attention_backend: str
    interpret: bool
    mesh: Any = None

    @nn.compact
    def __call__(self, x, kv_cache, metadata):
        c = self.config
        pre = c.do_layer_norm_before
        attn_norm = _layer_norm(c, self.dtype, "self_attn_layer_norm")
        mlp_norm = _layer_norm(c, self.dtype, "final_layer_norm")
        h = attn_norm(x) if pre else x
        h, kv_cache = OPTAttention(c, self.dtype, self.attention_backend, self.interpret,
                                   self.mesh, name="self_attn")(h, kv_cache, metadata)
        x = x + h
        if not pre:
            x = attn_norm(x)
        h = mlp_norm(x) if pre else x
        h = Linear(c.ffn_dim, c.enable_bias, self.dtype, name="fc1")(h)
        h = Linear(c.hidden_size, c.enable_bias, self.dtype, name="fc2")(nn.relu(h))
        x = x + h
        if not pre:
            x = mlp_norm(x)
        return x, kv_cache


class OPTForCausalLM(nn.Module):
    """OPT causal LM on the paged KV cache (signature in models/base.py).

    Params: embed_tokens/embedding [vocab, word_embed_proj_dim];
    embed_positions/embedding [max_position_embeddings + 2, hidden];
    project_in/kernel, project_out/kernel when word_embed_proj_dim != hidden;
    layers_{i}/...; final_layer_norm when do_layer_norm_before. Each layer's
    self_attn/qkv_proj kernel is [hidden, 3 * hidden] (q, k, v columns side by
    side; config.fused_params()). ``mesh``: a device mesh with a "tp" axis
    for tensor parallelism, or None. ``attention_backend``: a kernels_pallas
    backend name or an attention callable (models.base.sharded_attention).
    """
    config: OPTConfig
    dtype: Any = jnp.float32
    attention_backend: str = "auto"
    interpret: bool = False
    mesh: Any = None

    @nn.compact
    def __call__(self, input_ids, positions, kv_caches, metadata, logits_indices=None):
        c = self.config
        if len(kv_caches) != c.num_layers:
            raise ValueError(f"expected {c.num_layers} KV cache arrays, got {len(kv_caches)}")
        embed = nn.Embed(c.vocab_size, c.word_embed_proj_dim, dtype=self.dtype,
                         param_dtype=self.dtype, name="embed_tokens")
        embed_positions = nn.Embed(c.max_position_embeddings + POSITION_OFFSET, c.hidden_size,
                                   dtype=self.dtype, param_dtype=self.dtype,
                                   name="embed_positions")
        has_proj = c.word_embed_proj_dim != c.hidden_size
        x = embed(input_ids)
        if has_proj:
            x = Linear(c.hidden_size, False, self.dtype, name="project_in")(x)
        x = x + embed_positions(positions + POSITION_OFFSET)
        new_caches = []
        for i in range(c.num_layers):
            x, cache = OPTDecoderLayer(c, self.dtype, self.attention_backend, self.interpret,
                                       self.mesh, name=f"layers_{i}")(x, kv_caches[i], metadata)
            new_caches.append(cache)
        if logits_indices is not None:
            x = x[logits_indices]
        if c.has_final_layer_norm:
            x = _layer_norm(c, self.dtype, "final_layer_norm")(x)
        if has_proj:
            x = Linear(c.word_embed_proj_dim, False, self.dtype, name="project_out")(x)
        return gather_logits(lm_logits(x, embed.embedding.T), self.mesh), tuple(new_caches)


# HF tensor names -> our params (models/convert.py applies the table). Names
# saved from OPTModel lack the leading "model." (normalize_hf_name adds it).
HF_RULES = (
    Rule("model.decoder.embed_tokens.weight", "embed_tokens/embedding"),
    Rule("model.decoder.embed_positions.weight", "embed_positions/embedding"),
    Rule("model.decoder.project_in.weight", "project_in/kernel", "T"),
    Rule("model.decoder.project_out.weight", "project_out/kernel", "T"),
    Rule("model.decoder.final_layer_norm.weight", "final_layer_norm/scale"),
    Rule("model.decoder.final_layer_norm.bias", "final_layer_norm/bias"),
    Rule("model.decoder.layers.{i}.self_attn.{proj}.weight", "layers_{i}/self_attn/{proj}/kernel", "T"),
    Rule("model.decoder.layers.{i}.self_attn.{proj}.bias", "layers_{i}/self_attn/{proj}/bias"),
    Rule("model.decoder.layers.{i}.{norm}_layer_norm.weight", "layers_{i}/{norm}_layer_norm/scale"),
    Rule("model.decoder.layers.{i}.{norm}_layer_norm.bias", "layers_{i}/{norm}_layer_norm/bias"),
    Rule("model.decoder.layers.{i}.{fc}.weight", "layers_{i}/{fc}/kernel", "T"),
    Rule("model.decoder.layers.{i}.{fc}.bias", "layers_{i}/{fc}/bias"),
)


def hf_ignore(config: OPTConfig) -> tuple[str, ...]:
    """The lm_head is tied to embed_tokens; a saved copy is skipped."""
    return (r"lm_head\.weight",)


def normalize_hf_name(name: str) -> str:
    """"decoder.x" (saved from OPTModel) -> "model.decoder.x"."""
    if name.startswith("decoder."):
        name = "model." + name
    return name
