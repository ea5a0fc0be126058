"""Pieces shared by the model families: layers, RoPE tables, LoadedModel.

A model module maps one step's flat token axis to logits::

    module.apply({"params": params},
                 input_ids,       # i32[num_tokens]
                 positions,       # i32[num_tokens]
                 kv_caches,       # tuple over layers of
                                  #   [2, num_blocks, num_kv_heads, block_size, head_dim]
                 metadata,        # kernels_pallas.AttentionMetadata
                 logits_indices)  # i32[M] | None
      -> (logits f32[M or num_tokens, vocab], new kv_caches)

Prefill and decode go through the same code; only ``metadata.is_decode``
(static) picks the attention kernel.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import kernels_pallas

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
TP_AXIS = "tp"  # the device-mesh axis tensor parallelism splits heads over
# XLA debug options every jitted model step compiles with, per jax platform.
# GPU: cuBLAS for every matmul, never split-K. At decode shapes (M = 256)
# XLA's Triton GEMMs split K four ways into f32 partials and reduce them in a
# separate fusion (the residual add with it); cuBLAS adds the residual in its
# epilogue. Measured on an H200 (benchmarks/results/step-gemm-NVIDIA_H200*.json,
# NOTES.md "XLA's GEMMs at decode shapes"): 1.1B decode step 2.617 -> 2.372 ms,
# SmolLM2 2.190 -> 1.898, 13B equal, a 2048-token prefill 4% faster.
COMPILER_OPTIONS: dict[str, dict] = {
    "gpu": {"xla_gpu_enable_triton_gemm": False, "xla_gpu_experimental_force_split_k": 1},
}


def compiler_options(platform: str | None = None) -> dict:
    """The XLA debug options of a jitted model step on ``platform`` (default:
    jax's default backend); pass them as jax.jit(..., compiler_options=...)."""
    return dict(COMPILER_OPTIONS.get(platform or jax.default_backend(), {}))


def canonical_dtype(dtype) -> str:
    """Returns the dtype's name ("float32", "bfloat16", "float16") or raises."""
    name = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return name


# ----------------------------------------------------------------------------
# Layers


class RMSNorm(nn.Module):
    """RMSNorm as Llama computes it: normalise in float32, scale in x's dtype."""
    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):  # [..., hidden]
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.dtype)
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return scale * xf.astype(self.dtype)


class Linear(nn.Module):
    """y = x @ kernel (+ bias); kernel [in, out] (the transpose of torch's)."""
    features: int
    use_bias: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):  # [..., in]
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (x.shape[-1], self.features), self.dtype)
        y = jnp.dot(x.astype(self.dtype), kernel)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.normal(0.02),
                               (self.features,), self.dtype)
        return y


def num_shards(mesh) -> int:
    """Devices on the "tp" axis of ``mesh`` (1 without one): the shard count of
    the fused projections' column layout (models.convert.fuse_columns)."""
    return 1 if mesh is None else mesh.shape[TP_AXIS]


def sharded_attention(q, k, v, kv_cache, metadata, *, scale, backend, interpret, mesh=None):
    """kernels_pallas.attention, run once per shard of the "tp" mesh axis.

    With ``mesh`` None this is kernels_pallas.attention. With a mesh, q, k, v
    and the pool are split by head (each device sees its own query heads and
    the KV heads they read) and the kernels run per shard through shard_map;
    the metadata (block tables, slots) is the same on every shard.

    Args:
      q:        [num_tokens, num_heads, head_dim]
      k, v:     [num_tokens, num_kv_heads, head_dim]
      kv_cache: [2, num_blocks, num_kv_heads, block_size, head_dim]
      backend:  a kernels_pallas backend name, or a callable with
                kernels_pallas.attention's signature ``(q, k, v, kv_cache,
                metadata, *, scale) -> (out, kv_cache)``: the seam through
                which benchmarks (jpaged.bench.step_ceiling) swap attention out.
    Returns:
      (out [num_tokens, num_heads, head_dim], updated kv_cache)
    """
    def attend(q, k, v, kv_cache, metadata):
        if callable(backend):
            return backend(q, k, v, kv_cache, metadata, scale=scale)
        return kernels_pallas.attention(q, k, v, kv_cache, metadata, scale=scale,
                                        backend=backend, interpret=interpret)
    if mesh is None:
        return attend(q, k, v, kv_cache, metadata)
    heads = P(None, TP_AXIS, None)
    pool = P(None, None, TP_AXIS, None, None)
    # NOTE: check_vma is off: the Pallas kernels' out_shape structs carry no
    # varying-axis type, which shard_map then rejects (seen with jax 0.11.2).
    return jax.shard_map(attend, mesh=mesh, in_specs=(heads, heads, heads, pool, P()),
                         out_specs=(heads, pool), check_vma=False)(q, k, v, kv_cache, metadata)


def gather_logits(logits, mesh=None):
    """f32[M, vocab] logits whole on every device of ``mesh`` (no-op without
    one), so the sampler sees the full vocabulary.

    NOTE: pinning the vocab-split layout first keeps the lm_head matmul
    vocab-parallel; left alone, jit gathers the whole lm_head weight instead.
    """
    if mesh is None:
        return logits
    if logits.shape[-1] % mesh.shape[TP_AXIS] == 0:
        logits = jax.lax.with_sharding_constraint(logits, NamedSharding(mesh, P(None, TP_AXIS)))
    return jax.lax.with_sharding_constraint(logits, NamedSharding(mesh, P()))


def lm_logits(hidden, weight):
    """hidden [M, H] @ weight [H, vocab] with float32 accumulation -> f32[M, vocab]."""
    return jnp.dot(hidden, weight, preferred_element_type=jnp.float32).astype(jnp.float32)


# ----------------------------------------------------------------------------
# Rotary position embeddings

ROPE_TYPES = ("default", "linear", "llama3")


def rope_inv_freq(head_dim: int, theta: float, rope_type: str = "default",
                  factor: float = 1.0, low_freq_factor: float = 1.0,
                  high_freq_factor: float = 4.0,
                  original_max_position_embeddings: int = 8192) -> np.ndarray:
    """Inverse frequencies f32[head_dim // 2] for default / linear / llama3 RoPE."""
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_type {rope_type!r} is not supported; supported: {ROPE_TYPES}")
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / (np.float32(theta) ** exponent)).astype(np.float32)
    if rope_type == "linear":
        inv_freq = inv_freq / np.float32(factor)
    elif rope_type == "llama3":
        # Llama 3.1: long wavelengths divided by factor, short ones kept, and a
        # smooth interpolation between the two bands.
        old_len = float(original_max_position_embeddings)
        low_freq_wavelen = old_len / low_freq_factor
        high_freq_wavelen = old_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        inv_freq = np.where(is_medium, smoothed, scaled)
    return inv_freq.astype(np.float32)


def apply_rope(x, positions, inv_freq):
    """Rotates halves (HF's rotate_half layout). x [N, heads, D]; positions i32[N]."""
    freqs = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]
    cos = jnp.cos(jnp.concatenate([freqs, freqs], axis=-1))[:, None, :]  # [N, 1, D]
    sin = jnp.sin(jnp.concatenate([freqs, freqs], axis=-1))[:, None, :]
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)


# ----------------------------------------------------------------------------
# The loaded model


def single_sequence_metadata(num_context: int, num_new: int, block_table,
                             block_size: int) -> tuple[np.ndarray, kernels_pallas.AttentionMetadata]:
    """Positions and metadata for one sequence that already has ``num_context``
    tokens in the pool and appends ``num_new`` tokens.

    Args:
      block_table: i32[max_blocks_per_seq] physical block ids of the sequence.
    Returns:
      (positions i32[num_new], AttentionMetadata)
    """
    block_table = np.asarray(block_table, np.int32)
    positions = np.arange(num_context, num_context + num_new, dtype=np.int32)
    slot_mapping = block_table[positions // block_size] * block_size + positions % block_size
    metadata = kernels_pallas.AttentionMetadata(
        slot_mapping=jnp.asarray(slot_mapping, jnp.int32),
        block_tables=jnp.asarray(block_table[None]),
        context_lens=jnp.asarray([num_context + num_new], jnp.int32),
        query_start_loc=jnp.asarray([0, num_new], jnp.int32),
        is_decode=num_new == 1)
    return positions, metadata


def _pool_size(num_seq_blocks: int) -> int:
    """Blocks for a one-sequence pool: the null block plus room, rounded up to
    a power of two so that nearby lengths reuse one compiled step."""
    return 1 << num_seq_blocks.bit_length()


@dataclasses.dataclass
class LoadedModel:
    """A model ready to run: config, params, module and (maybe) tokenizer.

    Attributes:
      config:       the family's frozen config dataclass (LlamaConfig / OPTConfig).
      hf_config:    the Hugging Face config dict it was built from.
      params:       pytree of arrays in ``dtype``.
      module:       the flax module (LlamaForCausalLM / OPTForCausalLM).
      tokenizer:    transformers.PreTrainedTokenizerFast, or None.
      architecture: HF architecture name, e.g. "LlamaForCausalLM".
      dtype:        "float32" | "bfloat16" | "float16".
      kv_sharding:  where the KV pool lives: None (the first device) or a
                    jax.sharding.Sharding (tensor parallelism, or the one
                    device of a data-parallel replica: jpaged.parallel).
    """
    config: Any
    hf_config: dict
    params: Any
    module: nn.Module
    tokenizer: Any
    architecture: str
    dtype: str
    _jit_apply: Callable | None = dataclasses.field(default=None, repr=False)
    kv_sharding: Any = None

    def apply(self, params, input_ids, positions, kv_caches, metadata,
              logits_indices=None):
        """The pure step function (jit it, donating kv_caches).

        Args:
          input_ids:      i32[num_tokens]
          positions:      i32[num_tokens]
          kv_caches:      tuple over layers of [2, num_blocks, num_kv_heads, block_size, head_dim]
          metadata:       kernels_pallas.AttentionMetadata
          logits_indices: i32[M] rows whose logits are wanted, or None for all.
        Returns:
          (logits f32[M or num_tokens, vocab], new kv_caches)
        """
        return self.module.apply({"params": params}, input_ids, positions,
                                 kv_caches, metadata, logits_indices)

    def init_kv_caches(self, num_blocks: int, block_size: int, dtype=None) -> tuple:
        """Zeroed KV pool: one [2, num_blocks, num_kv_heads, block_size, head_dim]
        array per layer, in ``dtype`` (default: the params dtype)."""
        dtype = DTYPES[canonical_dtype(dtype or self.dtype)]
        shape = (2, num_blocks, self.config.num_kv_heads, block_size, self.config.head_dim)
        if self.kv_sharding is not None:  # built in place: no whole pool on one device
            zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=self.kv_sharding)
            return tuple(zeros() for _ in range(self.config.num_layers))
        # NOTE: committed to a device like the params, so a jitted step sees the
        # same placement on its first call as on later ones (no recompile).
        device = jax.local_devices()[0]
        return tuple(jax.device_put(jnp.zeros(shape, dtype), device)
                     for _ in range(self.config.num_layers))

    def kv_bytes_per_block(self, block_size: int, dtype=None) -> int:
        """Bytes one block takes across all layers, K and V."""
        itemsize = jnp.dtype(DTYPES[canonical_dtype(dtype or self.dtype)]).itemsize
        c = self.config
        return 2 * c.num_layers * c.num_kv_heads * block_size * c.head_dim * itemsize

    def _step(self):
        if self._jit_apply is None:
            self._jit_apply = jax.jit(self.apply, donate_argnums=(3,),
                                      compiler_options=compiler_options() or None)
        return self._jit_apply

    def _check_ids(self, token_ids) -> np.ndarray:
        ids = np.asarray(token_ids, np.int64).reshape(-1)
        if ids.size == 0:
            raise ValueError("token_ids must not be empty")
        bad = ids[(ids < 0) | (ids >= self.config.vocab_size)]
        if bad.size:
            raise ValueError(f"token ids {bad[:5].tolist()} are outside the vocabulary "
                             f"[0, {self.config.vocab_size})")
        return ids.astype(np.int32)

    def logits(self, token_ids, block_size: int = 16) -> np.ndarray:
        """f32[len, vocab]: logits of every position of one sequence, computed
        by a single prefill through the paged cache."""
        ids = self._check_ids(token_ids)
        self._check_length(len(ids))
        num_blocks = _pool_size(-(-len(ids) // block_size))
        kv_caches = self.init_kv_caches(num_blocks, block_size)
        positions, metadata = single_sequence_metadata(
            0, len(ids), np.arange(1, num_blocks), block_size)
        logits, _ = self._step()(self.params, jnp.asarray(ids), jnp.asarray(positions),
                                 kv_caches, metadata)
        return np.asarray(logits)

    def generate_greedy(self, token_ids, max_new_tokens: int, block_size: int = 16,
                        stop_at_eos: bool = True) -> list[int]:
        """Greedy continuation of one sequence: one prefill, then one decode
        step per new token, all through the paged cache.

        Returns the new token ids (the EOS token included when it ends them).
        """
        ids = self._check_ids(token_ids)
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        total = len(ids) + max_new_tokens
        self._check_length(total)
        num_blocks = _pool_size(-(-total // block_size))
        block_table = np.arange(1, num_blocks, dtype=np.int32)
        kv_caches = self.init_kv_caches(num_blocks, block_size)
        step = self._step()
        eos_ids = set(self.config.eos_token_ids) if stop_at_eos else set()
        out: list[int] = []
        positions, metadata = single_sequence_metadata(0, len(ids), block_table, block_size)
        new_ids = ids
        while len(out) < max_new_tokens:
            logits, kv_caches = step(self.params, jnp.asarray(new_ids), jnp.asarray(positions),
                                     kv_caches, metadata,
                                     jnp.asarray([len(new_ids) - 1], jnp.int32))
            token = int(np.argmax(np.asarray(logits[0])))
            out.append(token)
            if token in eos_ids:
                break
            positions, metadata = single_sequence_metadata(
                len(ids) + len(out) - 1, 1, block_table, block_size)
            new_ids = np.array([token], np.int32)
        return out

    def _check_length(self, length: int) -> None:
        limit = self.config.max_position_embeddings
        if length > limit:
            raise ValueError(f"sequence of {length} tokens exceeds the model's "
                             f"max_position_embeddings ({limit})")
