"""The device-side ceiling of a decode step: the model and its kernels alone.

K greedy decode steps of ``num_seqs`` sequences, ``context`` tokens each,
run inside ONE jitted ``lax.fori_loop``: no scheduler and no host work
between steps. Each step embeds the last tokens, runs every layer (the new
token's K/V written into the paged pool), takes the argmax of the logits and
feeds it back as the next token at the next position. The pool holds random
K/V; the block tables are a random permutation of its blocks. What this loop
reaches per step is the most the engine can reach (issue 14 reports the
engine's ratio to it, issue 15 this loop's ratio to the bandwidth roofline).

Variants swap the attention call through the modules' ``attention_backend``
seam (models.base.sharded_attention), so the model's own code runs as it is:

  full                      the model as it is
  no-attention              the KV write alone, no attention read (out = q)
  no-attention-no-kv-write  neither (out = q plus k + v, so k and v stay live
                            and their share of the qkv matmul is not dropped)

In the same process as an engine bench::

    from jpaged.bench.step_ceiling import run_point
    res = run_point(model, num_seqs=256, context=512, steps=16)
    res["ms_per_step"], res["tok_per_s"], res["roofline_ms"]

``run_point`` allocates its own pool (num_seqs * ceil((context + steps) /
block_size) + 1 blocks); the caller frees its engine's pool first if memory
is short.
"""
from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import kernels_pallas
import models
from models.base import DTYPES

VARIANTS = ("full", "no-attention", "no-attention-no-kv-write")
PEAK_BW = 4.8e12  # B/s: H200 HBM3e, the default roofline bandwidth


def with_variant(model, variant: str):
    """``model`` (a models.LoadedModel) with its attention replaced per VARIANTS."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if variant == "full":
        return model
    backend, interpret = model.module.attention_backend, model.module.interpret

    def kv_write_only(q, k, v, kv_cache, metadata, *, scale):
        kv_cache = kernels_pallas.write_kv(kv_cache, k.astype(kv_cache.dtype),
                                           v.astype(kv_cache.dtype), metadata.slot_mapping,
                                           backend=backend, interpret=interpret)
        return q, kv_cache

    def neither(q, k, v, kv_cache, metadata, *, scale):
        group = q.shape[1] // k.shape[1]
        return q + jnp.repeat((k + v).astype(q.dtype), group, axis=1), kv_cache

    attend = kv_write_only if variant == "no-attention" else neither
    return dataclasses.replace(model, module=model.module.clone(attention_backend=attend),
                               _jit_apply=None)


def parse_decode_tuning(text: str) -> dict:
    """"default" (the kernel's own launch settings) or CHUNK/WARPS/STAGES,
    e.g. "64/2/2": chunk_tokens, num_warps, num_stages of the GPU decode
    kernel."""
    if text == "default":
        return {}
    try:
        chunk, warps, stages = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"decode tuning {text!r} is not 'default' or CHUNK/WARPS/STAGES "
                         "(e.g. 64/2/2)") from None
    return dict(chunk_tokens=chunk, num_warps=warps, num_stages=stages)


def with_decode_tuning(model, tuning: dict):
    """``model`` whose decode attention runs the kernel with these launch
    settings (kernels_pallas.attention, as the model's own)."""
    if not tuning:
        return model
    backend, interpret = model.module.attention_backend, model.module.interpret
    if callable(backend):
        raise ValueError("decode tuning needs the model's own attention (variant full)")

    def attend(q, k, v, kv_cache, metadata, *, scale):
        return kernels_pallas.attention(q, k, v, kv_cache, metadata, scale=scale,
                                        backend=backend, interpret=interpret,
                                        decode_tuning=tuning)

    return dataclasses.replace(model, module=model.module.clone(attention_backend=attend),
                               _jit_apply=None)


def parse_compiler_options(text: str) -> dict:
    """"none" (XLA's own choices) or NAME=VALUE[,NAME=VALUE...]: XLA
    debug options for the decode loop's compile, e.g.
    "xla_gpu_experimental_force_split_k=1" (no split-K GEMMs) or
    "xla_gpu_enable_triton_gemm=false" (cuBLAS only). Values true/false
    become booleans, integers ints, anything else stays a string."""
    if text == "none":
        return {}
    options = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep or not name.startswith("xla_"):
            raise ValueError(f"compiler option {item!r} is not NAME=VALUE with an xla_ "
                             "name (e.g. xla_gpu_experimental_force_split_k=1)")
        if value.lower() in ("true", "false"):
            options[name] = value.lower() == "true"
        else:
            try:
                options[name] = int(value)
            except ValueError:
                options[name] = value
    return options


def random_pool(model, num_blocks: int, block_size: int, seed: int = 0) -> tuple:
    """Random K/V: one [2, num_blocks, num_kv_heads, block_size, head_dim]
    array per layer in the model's dtype, placed like model.init_kv_caches."""
    c = model.config
    shape = (2, num_blocks, c.num_kv_heads, block_size, c.head_dim)
    dtype = DTYPES[model.dtype]
    sharding = model.kv_sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    fill = jax.jit(lambda key: jax.random.normal(key, shape, dtype), out_shardings=sharding)
    # NOTE: "rbg" keys (XLA's RngBitGenerator): threefry's program takes
    # seconds to compile on CPU, and the values need no reproducibility across jax versions.
    keys = jax.random.split(jax.random.key(seed, impl="rbg"), c.num_layers)
    return tuple(fill(key) for key in keys)


def _block_tables(num_seqs: int, num_tokens: int, block_size: int, rng) -> np.ndarray:
    """i32[num_seqs, blocks per seq]: a random permutation of blocks 1.. (0 is the null block)."""
    per_seq = -(-num_tokens // block_size)
    ids = rng.permutation(np.arange(1, 1 + num_seqs * per_seq, dtype=np.int32))
    return ids.reshape(num_seqs, per_seq)


def _check_shape(model, num_seqs: int, num_tokens: int) -> None:
    if num_seqs < 1:
        raise ValueError(f"num_seqs must be >= 1, got {num_seqs}")
    limit = model.config.max_position_embeddings
    if num_tokens > limit:
        raise ValueError(f"{num_tokens} tokens per sequence exceed the model's "
                         f"max_position_embeddings ({limit}); lower context or steps")


@dataclasses.dataclass
class DecodeInputs:
    """The loop's device inputs (the pool is donated and replaced by each call)."""
    tokens: jax.Array        # i32[num_seqs]
    positions: jax.Array     # i32[num_seqs]: context, the first new token's position
    block_tables: jax.Array  # i32[num_seqs, ceil((context + steps) / block_size)]
    kv_caches: tuple         # per layer [2, num_blocks, num_kv_heads, block_size, head_dim]


def decode_inputs(model, num_seqs: int, context: int, steps: int, block_size: int = 16,
                  seed: int = 0) -> DecodeInputs:
    """Inputs for decode_loop: every sequence at ``context`` tokens, room for ``steps`` more."""
    _check_shape(model, num_seqs, context + steps)
    if context < 0 or steps < 1:
        raise ValueError(f"context must be >= 0 and steps >= 1, got {context}, {steps}")
    rng = np.random.default_rng(seed)
    tables = _block_tables(num_seqs, context + steps, block_size, rng)
    return DecodeInputs(
        tokens=jnp.asarray(rng.integers(0, model.config.vocab_size, num_seqs), jnp.int32),
        positions=jnp.full((num_seqs,), context, jnp.int32),
        block_tables=jnp.asarray(tables),
        kv_caches=random_pool(model, 1 + tables.size, block_size, seed))


def decode_loop(model, steps: int, block_size: int = 16,
                compiler_options: dict | None = None):
    """jit of (params, kv_caches, tokens, positions, block_tables) ->
    (kv_caches, tokens): ``steps`` greedy decode steps in one lax.fori_loop,
    the pool donated, compiled with ``compiler_options`` (XLA debug options;
    None: the model runner's own, models.compiler_options())."""
    def loop(params, kv_caches, tokens, positions, block_tables):
        num_seqs = tokens.shape[0]
        rows = jnp.arange(num_seqs, dtype=jnp.int32)
        query_start_loc = jnp.arange(num_seqs + 1, dtype=jnp.int32)

        def step(_, carry):
            kv_caches, tokens, positions = carry
            slots = (block_tables[rows, positions // block_size] * block_size
                     + positions % block_size)
            metadata = kernels_pallas.AttentionMetadata(
                slot_mapping=slots, block_tables=block_tables, context_lens=positions + 1,
                query_start_loc=query_start_loc, is_decode=True)
            logits, kv_caches = model.apply(params, tokens, positions, kv_caches, metadata)
            return kv_caches, jnp.argmax(logits, axis=-1).astype(jnp.int32), positions + 1

        kv_caches, tokens, _ = jax.lax.fori_loop(0, steps, step, (kv_caches, tokens, positions))
        return kv_caches, tokens
    if compiler_options is None:
        compiler_options = models.compiler_options()
    return jax.jit(loop, donate_argnums=(1,), compiler_options=compiler_options or None)


def _per_device_bytes(x) -> int:
    shape = x.sharding.shard_shape(x.shape) if hasattr(x, "sharding") else x.shape
    return int(np.prod(shape, dtype=np.int64)) * jnp.dtype(x.dtype).itemsize


def step_bytes(model, num_seqs: int, context: int, steps: int, variant: str = "full") -> dict:
    """Bytes one decode step must move per device, averaged over the loop's steps.

    weights:  every param once, except an untied token embedding, of which
              only the num_seqs looked-up rows are read;
    kv_read:  the K/V attention reads: context + j + 1 tokens per sequence
              at step j (mean over j < steps), all layers;
    kv_write: the new token's K and V, all layers.
    Activations (hidden states, the f32 logits) are left out: they are a few
    percent of the weights at these shapes.
    """
    c = model.config
    params = model.params
    weights = sum(_per_device_bytes(x) for x in jax.tree.leaves(params))
    embed = params["embed_tokens"]["embedding"]
    if not c.tie_word_embeddings:
        row = _per_device_bytes(embed) // embed.shape[0]
        weights += num_seqs * row - _per_device_bytes(embed)
    tp = 1 if model.kv_sharding is None else len(model.kv_sharding.device_set)
    itemsize = jnp.dtype(DTYPES[model.dtype]).itemsize
    per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * itemsize // tp
    kv_read = num_seqs * (context + (steps + 1) / 2) * per_token
    kv_write = num_seqs * per_token
    if variant != "full":
        kv_read = 0
    if variant == "no-attention-no-kv-write":
        kv_write = 0
    return dict(weights=int(weights), kv_read=int(kv_read), kv_write=int(kv_write),
                total=int(weights + kv_read + kv_write))


def _free_device_bytes() -> int | None:
    stats = jax.local_devices()[0].memory_stats() or {}
    if not stats.get("bytes_limit"):
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def pool_bytes(model, num_seqs: int, context: int, steps: int, block_size: int = 16) -> int:
    """Bytes of the pool decode_inputs allocates, per device."""
    blocks = 1 + num_seqs * -(-(context + steps) // block_size)
    tp = 1 if model.kv_sharding is None else len(model.kv_sharding.device_set)
    return blocks * model.kv_bytes_per_block(block_size) // tp


def run_point(model, *, num_seqs: int, context: int, steps: int = 16, variant: str = "full",
              block_size: int = 16, repeats: int = 5, warmup: int = 2,
              peak_bw: float = PEAK_BW, seed: int = 0,
              decode_tuning: dict | None = None,
              compiler_options: dict | None = None) -> dict:
    """Times ``steps`` decode steps in one jitted loop (median of ``repeats``
    calls after a compile call and ``warmup`` calls, each waited for).

    Args:
      model:      a models.LoadedModel (tensor-parallel twins work too).
      num_seqs:   sequences decoding together.
      context:    tokens already in each sequence's KV.
      steps:      K, decode steps per jitted call.
      variant:    one of VARIANTS.
      peak_bw:    B/s of the roofline.
      decode_tuning: launch settings of the decode kernel (parse_decode_tuning;
                  variant full only), None or {} for its own.
      compiler_options: XLA debug options of the loop's compile
                  (parse_compiler_options); None for the model runner's own.
    Returns:
      dict: num_seqs, context, K, variant, block_size, ms_per_step (median
      call / K), tok_per_s, roofline_ms (this variant's bytes / peak_bw),
      ratio (ms_per_step / roofline_ms), pipelined_ms_per_step (``repeats``
      calls back to back, waited for once), bytes (step_bytes), call_ms
      (every timed call), compile_s (the first call, compile included).
    Raises:
      ValueError for shapes the model cannot run or a pool that does not fit
      in the device's free memory.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    need, free = pool_bytes(model, num_seqs, context, steps, block_size), _free_device_bytes()
    if free is not None and need > 0.9 * free:
        raise ValueError(f"the KV pool for {num_seqs} sequences x {context + steps} tokens "
                         f"needs {need / 2**30:.1f} GiB, the device has {free / 2**30:.1f} GiB "
                         "free; lower num_seqs or context")
    inputs = decode_inputs(model, num_seqs, context, steps, block_size, seed)
    if decode_tuning and variant != "full":
        raise ValueError(f"decode tuning needs variant full, got {variant!r}")
    variant_model = with_decode_tuning(with_variant(model, variant), decode_tuning or {})
    if compiler_options is None:
        compiler_options = models.compiler_options()
    loop = decode_loop(variant_model, steps, block_size, compiler_options)
    kv_caches = inputs.kv_caches
    inputs.kv_caches = None  # NOTE: donated below; keep no handle on a deleted buffer

    def call(kv_caches):
        t = time.perf_counter()
        kv_caches, tokens = loop(model.params, kv_caches, inputs.tokens, inputs.positions,
                                 inputs.block_tables)
        jax.block_until_ready((kv_caches, tokens))
        return kv_caches, time.perf_counter() - t

    kv_caches, compile_s = call(kv_caches)
    for _ in range(warmup):
        kv_caches, _ = call(kv_caches)
    times = []
    for _ in range(repeats):
        kv_caches, seconds = call(kv_caches)
        times.append(seconds)
    # The same calls back to back, waited for once: the host's launch of
    # call i + 1 overlaps call i on the device, so this is the device's pace.
    t = time.perf_counter()
    for _ in range(repeats):
        kv_caches, tokens = loop(model.params, kv_caches, inputs.tokens, inputs.positions,
                                 inputs.block_tables)
    jax.block_until_ready((kv_caches, tokens))
    pipelined_ms = 1e3 * (time.perf_counter() - t) / repeats / steps
    del kv_caches
    ms_per_step = 1e3 * statistics.median(times) / steps
    moved = step_bytes(model, num_seqs, context, steps, variant)
    roofline_ms = 1e3 * moved["total"] / peak_bw
    return dict(num_seqs=num_seqs, context=context, K=steps, variant=variant,
                decode_tuning=decode_tuning or {},
                compiler_options=compiler_options,
                block_size=block_size, ms_per_step=ms_per_step,
                tok_per_s=num_seqs / ms_per_step * 1e3, roofline_ms=roofline_ms,
                ratio=ms_per_step / roofline_ms, pipelined_ms_per_step=pipelined_ms,
                peak_bw=peak_bw, bytes=moved,
                call_ms=[1e3 * t for t in times], compile_s=compile_s)
