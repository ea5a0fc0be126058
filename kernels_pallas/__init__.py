"""kernels_pallas: the attention kernels of jpaged behind one facade.

The KV pool layout (written down here once; every other layout is converted
at this boundary)
-------------------------------------------------------------------------

One array per transformer layer::

    kv_cache  # [2, num_blocks, num_kv_heads, block_size, head_dim]  (K at 0, V at 1)

Why this layout:
- Head-major inside a block: the K (or V) of one KV head in one block is a
  contiguous ``block_size * head_dim`` run (4 KiB for 16 x 128 bf16). A GPU
  program that owns one KV head reads whole, coalesced, 16-byte-aligned rows;
  a TPU kernel DMAs one contiguous page per (block, head) into VMEM.
- K and V in one array per layer: one scatter writes both, one gather moves a
  block of a layer for swapping, and the pool is a flat tuple of arrays that
  jit can donate. Separate arrays per layer (rather than one
  ``[num_layers, ...]`` array) keep every kernel input a whole buffer: slicing
  a layer out of a stacked pool inside jit would copy it.
- Tensor parallelism shards axis 2 (num_kv_heads); the block ids are the same
  on every shard.

Block 0 is the null block: the host never hands it out, padded block-table
entries point at it, and context lengths mask it. Slots are
``block_id * block_size + offset``; a slot outside ``[0, num_blocks *
block_size)`` (the model runner pads with ``num_blocks * block_size``) is
dropped by ``write_kv``, never wrapped around.

Glossary of dimension names
---------------------------
num_tokens          tokens in a step (padded to the step's bucket)
num_seqs            sequences in a step (padded to the step's bucket)
num_heads           query heads (Hq)
num_kv_heads        key/value heads (Hkv); num_heads % num_kv_heads == 0
num_queries_per_kv  num_heads // num_kv_heads (the GQA group size; 1 for MHA)
head_dim            D: 64, 80, 128 ...
num_blocks          blocks in the device pool, block 0 included
block_size          tokens per block (8, 16, 32 ...)
max_blocks_per_seq  width of a block table: ceil(max_model_len / block_size)
num_copies          copy-on-write copies in a step

Backends
--------
Every public function takes ``backend`` ("auto", "reference", "gpu", "tpu")
and ``interpret`` (run the Pallas kernel in interpret mode, e.g. on CPU).
"auto" picks the Pallas kernels of the platform jax runs on, and the pure-jnp
reference (reference.py) on CPU. Both are static: pass them from Python, not
as traced values.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from kernels_pallas import reference

BACKENDS = ("auto", "reference", "gpu", "tpu")


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["slot_mapping", "block_tables", "context_lens",
                                "query_start_loc"],
                   meta_fields=["is_decode"])
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    """What an attention layer needs to read and write the paged pool.

    Attributes:
      slot_mapping:    i32[num_tokens] pool slot of each new token (out of
                       range for padding: dropped).
      block_tables:    i32[num_seqs, max_blocks_per_seq] physical block ids
                       (0 for unused entries).
      context_lens:    i32[num_seqs] tokens each sequence attends to, the new
                       tokens included (0 for padded sequences).
      query_start_loc: i32[num_seqs + 1] where each sequence's new tokens
                       start in the flat token axis. Every real sequence has
                       at least one new token; padded sequences come after
                       the real ones and repeat the last value (zero new
                       tokens).
      is_decode:       static; True when every sequence has exactly one new
                       token and num_tokens == num_seqs (the decode kernel
                       then runs instead of the ragged one).
    """
    slot_mapping: jax.Array
    block_tables: jax.Array
    context_lens: jax.Array
    query_start_loc: jax.Array
    is_decode: bool = False


def resolve_backend(backend: str = "auto") -> str:
    """Maps "auto" to the backend of jax's default platform."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    platform = jax.default_backend()
    return {"gpu": "gpu", "cuda": "gpu", "tpu": "tpu"}.get(platform, "reference")


def _impl(name: str, backend: str):
    backend = resolve_backend(backend)
    if backend == "reference":
        return getattr(reference, name), False
    if backend == "gpu":
        from kernels_pallas import gpu as module
    else:
        from kernels_pallas import tpu as module
    fn = getattr(module, name, None)
    if fn is None:  # a kernel not written for this backend yet
        return getattr(reference, name), False
    return fn, True


def write_kv(kv_cache, k, v, slot_mapping, *, backend="auto", interpret=False):
    """Scatters new keys and values into their pool slots.

    Args:
      kv_cache:     [2, num_blocks, num_kv_heads, block_size, head_dim]
      k, v:         [num_tokens, num_kv_heads, head_dim]
      slot_mapping: i32[num_tokens]; slots outside the pool, or in block 0
                    (the null block), are dropped.
    Returns:
      the updated kv_cache (same shape and dtype; updated in place under jit
      when the pool is donated).
    """
    fn, is_kernel = _impl("write_kv", backend)
    kwargs = {"interpret": interpret} if is_kernel else {}
    return fn(kv_cache, k, v, slot_mapping, **kwargs)


def copy_blocks(kv_cache, src_ids, dst_ids, *, backend="auto", interpret=False):
    """Copies whole blocks (copy-on-write) of one layer, all in one launch.

    Args:
      kv_cache: [2, num_blocks, num_kv_heads, block_size, head_dim]
      src_ids, dst_ids: i32[num_copies]; pairs with dst 0 are padding and skipped.
    Returns:
      the updated kv_cache.
    """
    fn, is_kernel = _impl("copy_blocks", backend)
    kwargs = {"interpret": interpret} if is_kernel else {}
    return fn(kv_cache, src_ids, dst_ids, **kwargs)


def paged_attention(q, kv_cache, block_tables, context_lens, *, scale,
                    backend="auto", interpret=False, **tuning):
    """Decode attention: one query token per sequence, through block tables.

    Args:
      q:            [num_seqs, num_heads, head_dim]
      kv_cache:     [2, num_blocks, num_kv_heads, block_size, head_dim]
      block_tables: i32[num_seqs, max_blocks_per_seq]
      context_lens: i32[num_seqs]; the query attends to positions
                    [0, context_len); 0 gives an all-zero output.
      scale:        softmax scale (usually head_dim ** -0.5).
      tuning:       kernel-specific knobs (ignored by the reference).
    Returns:
      [num_seqs, num_heads, head_dim] in q's dtype.
    """
    fn, is_kernel = _impl("paged_attention", backend)
    kwargs = dict(interpret=interpret, **tuning) if is_kernel else {}
    return fn(q, kv_cache, block_tables, context_lens, scale=scale, **kwargs)


def ragged_paged_attention(q, kv_cache, block_tables, context_lens,
                           query_start_loc, *, scale, backend="auto",
                           interpret=False, **tuning):
    """Prefill / mixed attention: several new tokens per sequence.

    Sequence s owns the new tokens q[query_start_loc[s]:query_start_loc[s+1]];
    with q_len = that count, its new token i sits at position
    context_lens[s] - q_len + i and attends causally to positions
    [0, that position]. The new tokens' K/V must already be in the pool
    (write_kv first). Tokens past query_start_loc[-1] are padding: their
    output is zero.

    Args:
      q:               [num_tokens, num_heads, head_dim]
      kv_cache:        [2, num_blocks, num_kv_heads, block_size, head_dim]
      block_tables:    i32[num_seqs, max_blocks_per_seq]
      context_lens:    i32[num_seqs]
      query_start_loc: i32[num_seqs + 1], non-decreasing, starts at 0.
      scale:           softmax scale.
    Returns:
      [num_tokens, num_heads, head_dim] in q's dtype.
    """
    fn, is_kernel = _impl("ragged_paged_attention", backend)
    kwargs = dict(interpret=interpret, **tuning) if is_kernel else {}
    return fn(q, kv_cache, block_tables, context_lens, query_start_loc,
              scale=scale, **kwargs)


def attention(q, k, v, kv_cache, metadata: AttentionMetadata, *, scale,
              backend="auto", interpret=False, decode_tuning=None):
    """One layer's paged attention: write the new K/V, then attend.

    Args:
      q:        [num_tokens, num_heads, head_dim]
      k, v:     [num_tokens, num_kv_heads, head_dim]
      kv_cache: [2, num_blocks, num_kv_heads, block_size, head_dim]
      metadata: AttentionMetadata of the step.
      decode_tuning: the decode kernel's knobs (paged_attention's tuning;
                    None: its own), e.g. from jpaged.bench.step_ceiling.
    Returns:
      (out [num_tokens, num_heads, head_dim], updated kv_cache)
    """
    kv_cache = write_kv(kv_cache, k.astype(kv_cache.dtype), v.astype(kv_cache.dtype),
                        metadata.slot_mapping, backend=backend, interpret=interpret)
    if metadata.is_decode:
        out = paged_attention(q, kv_cache, metadata.block_tables,
                              metadata.context_lens, scale=scale,
                              backend=backend, interpret=interpret, **(decode_tuning or {}))
    else:
        out = ragged_paged_attention(q, kv_cache, metadata.block_tables,
                                     metadata.context_lens,
                                     metadata.query_start_loc, scale=scale,
                                     backend=backend, interpret=interpret)
    return out, kv_cache


__all__ = ["AttentionMetadata", "BACKENDS", "attention", "copy_blocks",
           "paged_attention", "ragged_paged_attention", "resolve_backend",
           "write_kv", "reference"]
