"""Checks the GPU Pallas kernels against the reference, then benchmarks them.

In one run, on one device: the copy ceiling (a large device copy, bytes read
+ written), the bf16 matmul rate, paged decode attention (ours, with a small
tuning sweep; JAX's own Pallas GPU paged_attention with its best of a few
settings, on the same inputs converted to its [Hkv, pages, page_size, D]
layout outside the timed region; a dense contiguous-cache XLA attention of
the same shape), ragged prefill attention (the Triton kernel's tunings on
8 x 512 new tokens over 0-1536 cached; useful FLOPs / time vs the matmul
rate), the prefill sweep and, with --topk, the sampler's top-k
(jpaged.sampler.exact_top_k against jax.lax.top_k on the same rows: the
vocabulary's top 20 at 256 rows, and beam search's 200 candidates).
Prints tables last and writes
benchmarks/results/kernels-<device>.json (or --out).

The prefill sweep ("prefill_sweep" in the JSON): three batches (8 x 512
new tokens over 0-1536 cached; 1 x 4096 new, no cache; 64 x 128 new over
0-1920 cached, a mixed chunked-prefill step) x head_dim 128 / 64 x GQA
groups 4 / 8 / 1, always 32 query heads (32 / 8 / 4 KV heads), bf16,
block_size 16. Each shape times, at default launch settings, the Triton
ragged kernel and the Mosaic GPU one (kgpu.ragged_paged_attention with impl
forced; Mosaic only where the facade would pick it: Hopper and supports(),
otherwise recorded as skipped with the reason), both checked against the
reference, and cuDNN's jax.nn.dot_product_attention on the dense
equivalent: causal where nothing is cached; with a cached prefix the
unmasked new-tokens x context rectangle with key lengths (cuDNN has no
bottom-right causal mask), its field "computes" says which. TFLOP/s count
useful causal FLOPs (4 * head_dim * num_heads * attended pairs) for all
three, so x_cudnn (cuDNN's time / ours) compares equal work; x_matmul
divides by the bf16 matmul rate of the same run.

Timing: each measured call runs R distinct input sets back to back inside
one jitted function (different q and block tables over a pool 4x larger than
one call reads, so L2 cannot serve them); the per-call time is the slope
between R/2 and R sets (dispatch overhead cancels), median of --reps.

Usage (on the GPU machine, from the repository root):
  PYTHONPATH=. python3 scripts/bench_kernels.py --commit <sha> [--quick]
  # the prefill sweep alone, about 3-4 minutes on an H200 (benchmarks/gpu/issue16.sh):
  PYTHONPATH=. python3 scripts/bench_kernels.py --commit <sha> --no-check --shapes none
      --no-ragged --reps 7 --time-limit 200 --out kernels-prefill.json
  python3 scripts/bench_kernels.py --tiny --out /tmp/k.json  # CPU smoke test
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
import warnings

import numpy as np
import jax
import jax.numpy as jnp

from kernels_pallas import reference
from kernels_pallas import gpu as kgpu
from kernels_pallas.gpu import ragged_paged_attention_mgpu as mgpu
from jpaged import sampler

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import kernel_cases as kc  # noqa: E402  (shared cases, not an installed module)

try:
    from tqdm import tqdm
except ImportError:  # the GPU image may lack it
    def tqdm(x, **_):
        return x


# ----------------------------------------------------------------- checks ---

def check_all(log):
    """Runs every shared case on the device (compiled, not interpreted)."""
    failures = []
    rows = []
    for name, kw in kc.DECODE_CASES:
        c = kc.decode_case(1, **kw)
        args = (c["q"], c["kv_cache"], c["block_tables"], c["context_lens"])
        with jax.default_matmul_precision("highest"):  # XLA's f32 default is tf32
            ref = reference.paged_attention(*args, scale=c["scale"])
        for tune in [{}] + kc.DECODE_TUNINGS:
            out = kgpu.paged_attention(*args, scale=c["scale"], **tune)
            rows.append(("decode", name, tune, kc.max_abs_err(out, ref), kw["dtype"]))
    for name, kw in kc.RAGGED_CASES:
        c = kc.ragged_case(1, **kw)
        args = (c["q"], c["kv_cache"], c["block_tables"], c["context_lens"],
                c["query_start_loc"])
        with jax.default_matmul_precision("highest"):
            ref = reference.ragged_paged_attention(*args, scale=c["scale"])
        for tune in [{}] + kc.RAGGED_TUNINGS:
            try:
                out = kgpu.ragged_paged_attention(*args, scale=c["scale"], **tune)
            except ValueError as e:  # a tuning this shape does not allow
                log(f"check ragged {name} {tune}: skipped ({e})")
                continue
            rows.append(("ragged", name, tune, kc.max_abs_err(out, ref), kw["dtype"]))
    for dtype in ("float32", "bfloat16"):
        c = kc.write_kv_case(2, num_tokens=13, num_blocks=7, num_kv_heads=3,
                             block_size=8, head_dim=80, dtype=dtype)
        out = kgpu.write_kv(c["kv_cache"], c["k"], c["v"], c["slot_mapping"])
        ref = reference.write_kv(c["kv_cache"], c["k"], c["v"], c["slot_mapping"])
        rows.append(("write_kv", "hd80", {}, kc.max_abs_err(out, ref), dtype))
        src, dst = jnp.asarray([1, 2, 3, 4]), jnp.asarray([5, 0, 6, 0])
        out = kgpu.copy_blocks(c["kv_cache"], src, dst)
        ref = reference.copy_blocks(c["kv_cache"], src, dst)
        rows.append(("copy_blocks", "hd80", {}, kc.max_abs_err(out, ref), dtype))
    for kind, name, tune, err, dtype in rows:
        ok = err <= kc.GPU_ATOL[dtype]  # NaN fails
        log(f"check {kind:11s} {name:28s} {str(tune):45s} err={err:.2e} {'ok' if ok else 'FAIL'}")
        if not ok:
            failures.append((kind, name, tune, err))
    return rows, failures


# ----------------------------------------------------------------- timing ---

class TimingError(RuntimeError):
    """A slope that is not a time: the run of more input sets was no slower."""


def time_sets(fn, sets, reps, shared=(), return_first=False):
    """Median seconds per call of fn(*shared, *s), from the slope between
    running len(sets)//2 and len(sets) input sets inside one jit (shared
    arrays, e.g. the pool, are arguments: never baked in as constants).
    return_first: also return fn's output on sets[0] (from the warm-up, so
    checking it costs no compile of its own). A median slope that is not
    positive (noise larger than the work: a busy host, a tiny shape) is
    measured again with the reps so far kept (ROUNDS in all); TimingError
    when it is still not positive (the entry then reports the failure,
    never a negative time)."""
    half = len(sets) // 2
    f_half = jax.jit(lambda sh, ss: [fn(*sh, *s) for s in ss])
    f_full = jax.jit(lambda sh, ss: [fn(*sh, *s) for s in ss])
    a, b = sets[:half], sets
    for _ in range(2):
        first = jax.block_until_ready(f_half(shared, a))[0]
        jax.block_until_ready(f_full(shared, b))

    def measure():
        # (the order alternates: on a busy CPU host the first call of a pair
        # ran up to 2x slower than the second, a bias the slope took whole)
        calls = []
        for rep in range(reps):
            order = (f_half, f_full) if rep % 2 == 0 else (f_full, f_half)
            times = {}
            for f in order:
                t0 = time.perf_counter()
                jax.block_until_ready(f(shared, a if f is f_half else b))
                times[f] = time.perf_counter() - t0
            calls.append((times[f_half], times[f_full]))
        return calls

    t = measured_slope(measure, len(a), len(b))
    return (t, first) if return_first else t


ROUNDS = 3  # rounds of reps time_sets takes before a slope that is no time is an error


def measured_slope(measure, num_few: int, num_many: int, rounds: int = ROUNDS) -> float:
    """slope() of the (few, many) pairs measure() returns, measuring again
    (all pairs kept, so the median is over more reps) while the slope is not
    positive; the last round's TimingError is raised."""
    calls = []
    for r in range(rounds):
        calls += measure()
        try:
            return slope(calls, num_few, num_many)
        except TimingError:
            if r == rounds - 1:
                raise


def slope(calls, num_few: int, num_many: int) -> float:
    """Median seconds per input set from (time of num_few sets, time of
    num_many sets) pairs; TimingError unless positive."""
    t = float(np.median([(many - few) / (num_many - num_few) for few, many in calls]))
    if not t > 0:
        few_us, many_us = (float(np.median(c)) * 1e6 for c in zip(*calls))
        raise TimingError(
            f"{num_many} input sets ran no slower than {num_few} (median {many_us:.1f} us "
            f"against {few_us:.1f} us over {len(calls)} reps): the slope, {t * 1e6:.1f} us, "
            "is no time")
    return t


# (name, rows, row length, k): the vocabularies of llama (32000), SmolLM2
# (49152) and OPT (50272) at 256 decode rows, and beam_select's candidates
TOPK_SHAPES = (("llama_vocab", 256, 32000, 20), ("smollm2_vocab", 256, 49152, 20),
               ("opt_vocab", 256, 50272, 20), ("beam_candidates", 256, 200, 20))
TOPK_SHAPES_TINY = (("tiny_vocab", 32, 8192, 20), ("tiny_candidates", 256, 200, 20))


def bench_topk(reps, log):
    """exact_top_k and lax.top_k on the same f32 rows (normal values rounded
    to bf16, so ties occur as in a bf16 model's logprobs): us of each and
    x_lax (lax.top_k's time / ours); ours is checked equal to a stable sort."""
    rows = []
    for name, r, m, k in TOPK_SHAPES_TINY if TINY else TOPK_SHAPES:
        sets = [(jax.random.normal(jax.random.key(i), (r, m)).astype(jnp.bfloat16)
                 .astype(jnp.float32),) for i in range(4)]
        res = dict(name=name, rows=r, length=m, k=k)
        x = np.asarray(sets[0][0])
        want = np.argsort(-x, axis=1, kind="stable")[:, :k]
        for impl, fn in (("exact", lambda x: sampler.exact_top_k(x, k)),
                         ("lax", lambda x: jax.lax.top_k(x, k))):
            try:
                t, (vals, ids) = time_sets(fn, sets, reps, return_first=True)
                res[impl] = dict(us=t * 1e6)
                if impl == "exact":
                    res[impl]["equal_to_stable_sort"] = bool(np.array_equal(np.asarray(ids), want))
            except Exception:
                res[impl] = dict(error=traceback.format_exc())
        if "us" in res["exact"] and "us" in res["lax"]:
            res["x_lax"] = res["lax"]["us"] / res["exact"]["us"]
        log(f"  topk {name:16s} {r} x {m} k={k}: exact {res['exact'].get('us', float('nan')):8.1f} us"
            f" (stable-sort equal: {res['exact'].get('equal_to_stable_sort')}), lax "
            f"{res['lax'].get('us', float('nan')):8.1f} us")
        rows.append(res)
    return rows


def copy_ceiling(reps):
    # 1 GiB of bf16 per buffer; --tiny: 16 MiB (at 2 MiB a busy CPU's noise
    # outweighed the work: 4 sets timed no slower than 2 in three rounds)
    n = (1 << 29) if not TINY else (1 << 23)
    sets = [(jax.random.normal(jax.random.key(i), (n,), jnp.bfloat16),) for i in range(4)]
    t = time_sets(lambda x: x * 2, sets, reps)
    return 2 * n * 2 / t / 1e12  # TB/s, read + write


def matmul_rate(reps, n):
    """bf16 TFLOP/s of an n x n x n jnp matmul."""
    sets = [tuple(jax.random.normal(jax.random.key(i * 2 + j), (n, n), jnp.bfloat16)
                  for j in range(2)) for i in range(4)]
    t = time_sets(lambda a, b: a @ b, sets, reps)
    return 2 * n ** 3 / t / 1e12  # TFLOP/s


# ----------------------------------------------------------------- decode ---

def decode_inputs(seed, num_seqs, ctx, hq, hkv, d, block_size, num_sets, dtype):
    """A pool 4x larger than one call reads; num_sets (q, block_tables) pairs."""
    rng = np.random.default_rng(seed)
    blocks_per_seq = -(-ctx // block_size)
    need = num_seqs * blocks_per_seq
    num_blocks = 1 + 4 * need
    pool = jax.random.normal(jax.random.key(seed), (2, num_blocks, hkv, block_size, d), dtype)
    sets = []
    for i in range(num_sets):
        ids = rng.permutation(np.arange(1, num_blocks))[:need].reshape(num_seqs, blocks_per_seq)
        q = jax.random.normal(jax.random.key(1000 + i), (num_seqs, hq, d), dtype)
        sets.append((q, jnp.asarray(ids, jnp.int32)))
    lens = jnp.full((num_seqs,), ctx, jnp.int32)
    return pool, sets, lens


def bench_decode(shape, reps, quick, log, sweep=True):
    name, b, ctx, hq, hkv, d = shape
    bs, dtype = 16, jnp.bfloat16
    num_sets = 8
    pool, sets, lens = decode_inputs(0, b, ctx, hq, hkv, d, bs, num_sets, dtype)
    kv_bytes = b * ctx * hkv * d * 2 * 2
    scale = d ** -0.5
    res = {"shape": dict(name=name, num_seqs=b, context=ctx, num_heads=hq,
                         num_kv_heads=hkv, head_dim=d, block_size=bs, dtype="bfloat16"),
           "kv_bytes": kv_bytes}

    # correctness of the big shape against the reference (one set)
    q0, bt0 = sets[0]
    ref = reference.paged_attention(q0, pool, bt0, lens, scale=scale)

    ours = []
    group = hq // hkv
    tunings = [{}]
    if not quick:
        tunings += OURS_TUNINGS.get(name, []) if not sweep else (
            SWEEP_HD64 if d == 64 else SWEEP_OURS)
    for tune in tqdm(tunings, desc=f"{name} ours"):
        try:
            fn = lambda pool, lens, q, bt, tune=tune: kgpu.paged_attention(
                q, pool, bt, lens, scale=scale, interpret=TINY, **tune)
            err = kc.max_abs_err(fn(pool, lens, q0, bt0), ref)
            t = time_sets(fn, sets, reps, (pool, lens))
            ours.append(dict(tuning=tune, us=t * 1e6, tbps=kv_bytes / t / 1e12, err=err))
            log(f"  ours {str(tune):60s} {t*1e6:8.1f} us {kv_bytes/t/1e12:6.3f} TB/s err {err:.1e}")
        except Exception as e:  # a tuning that fails to compile is reported, not fatal
            log(f"  ours {tune} FAILED: {type(e).__name__}: {str(e)[:300]}")
            ours.append(dict(tuning=tune, error=f"{type(e).__name__}: {str(e)[:300]}"))
    res["ours"] = ours

    # JAX's Pallas GPU paged attention on the same inputs, in its layout
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from jax.experimental.pallas.ops.gpu import paged_attention as jax_pa
    k_pages = jnp.asarray(jnp.moveaxis(pool[0], 1, 0))  # [Hkv, pages, ps, D]
    v_pages = jnp.asarray(jnp.moveaxis(pool[1], 1, 0))
    jax.block_until_ready((k_pages, v_pages))
    pages = -(-ctx // bs)
    jax_tunings = [dict()]  # its defaults
    if not quick:
        jax_tunings += [t for t in JAX_TUNINGS.get(name, []) if pages % t["k_splits"] == 0]
    jax_res = []
    for tune in tqdm(jax_tunings, desc=f"{name} jax"):
        try:
            fn = lambda kp, vp, lens, q, bt, tune=tune: jax_pa.paged_attention(
                q * jnp.asarray(scale, q.dtype), kp, vp, bt, lens, interpret=TINY, **tune)
            err = kc.max_abs_err(fn(k_pages, v_pages, lens, q0, bt0), ref)
            t = time_sets(fn, sets, reps, (k_pages, v_pages, lens))
            jax_res.append(dict(tuning=tune, us=t * 1e6, tbps=kv_bytes / t / 1e12, err=err))
            log(f"  jax  {str(tune):60s} {t*1e6:8.1f} us {kv_bytes/t/1e12:6.3f} TB/s err {err:.1e}")
        except Exception as e:
            log(f"  jax  {tune} FAILED: {type(e).__name__}: {str(e)[:200]}")
            jax_res.append(dict(tuning=tune, error=f"{type(e).__name__}: {str(e)[:200]}"))
    res["jax_pallas"] = jax_res
    del k_pages, v_pages

    # dense contiguous-cache XLA attention of the same shape
    def dense(q, k, v):
        qg = q.reshape(b, hkv, group, d)
        s = jnp.einsum("bhgd,bhtd->bhgt", qg, k, preferred_element_type=jnp.float32) * scale
        p = jax.nn.softmax(s, axis=-1)
        o = jnp.einsum("bhgt,bhtd->bhgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return o.reshape(b, hq, d).astype(q.dtype)
    dense_sets = []
    for i in range(4):  # distinct caches: L2 cannot serve them
        k = jax.random.normal(jax.random.key(50 + i), (b, hkv, ctx, d), dtype)
        v = jax.random.normal(jax.random.key(80 + i), (b, hkv, ctx, d), dtype)
        dense_sets.append((sets[i][0], k, v))
    try:
        t = time_sets(dense, dense_sets, reps)
        res["dense_xla"] = dict(us=t * 1e6, tbps=kv_bytes / t / 1e12)
        log(f"  dense XLA {t*1e6:8.1f} us {kv_bytes/t/1e12:6.3f} TB/s")
    except TimingError as e:
        res["dense_xla"] = dict(error=str(e))
        log(f"  dense XLA FAILED: {e}")
    del dense_sets, pool
    return res


# ---------------------------------------------------------------- prefill ---

def _spread(lo, hi, n):
    return np.linspace(lo, hi, n).round().astype(int).tolist()


def prefill_batches(tiny):
    """(label, q_lens, cached) of the sweep's three batches: today's ragged
    shape, one long prompt, a mixed step of short chunks over varied caches."""
    if tiny:
        return [("8x16_c0-40", [16] * 8, _spread(0, 40, 8)), ("1x64", [64], [0]),
                ("8x8_mixed_c0-56", [8] * 8, _spread(0, 56, 8))]
    return [("8x512_c0-1536", [512] * 8, _spread(0, 1536, 8)), ("1x4096", [4096], [0]),
            ("64x128_mixed_c0-1920", [128] * 64, _spread(0, 1920, 64))]


def prefill_sweep_shapes(tiny):
    """(name, q_lens, cached, Hq, Hkv, head_dim, block_size) of the sweep,
    the most wanted first (a time limit cuts the tail)."""
    batches = prefill_batches(tiny)
    if tiny:  # one (head_dim, group) per batch, so each batch still runs on CPU
        hq = 8
        picks = [(b, d, g) for b, (d, g) in zip(batches, [(128, 4), (64, 1), (64, 8)])]
    else:
        hq = SWEEP_NUM_HEADS
        picks = [(b, d, g) for d, g in SWEEP_HEAD_DIM_GROUPS for b in batches]
    return [(f"{label}_hd{d}_g{g}", q_lens, cached, hq, hq // g, d, 16)
            for (label, q_lens, cached), d, g in picks]


def prefill_inputs(seed, q_lens, cached, hq, hkv, d, bs, num_sets, dtype):
    """A pool 4x larger than one call reads (L2 cannot serve it); num_sets
    (q, block_tables) pairs over it; context_lens; query_start_loc."""
    ctx_lens = [q + c for q, c in zip(q_lens, cached)]
    blocks = [-(-c // bs) for c in ctx_lens]
    num_blocks = 1 + 4 * sum(blocks)
    rng = np.random.default_rng(seed)
    pool = jax.random.normal(jax.random.key(seed), (2, num_blocks, hkv, bs, d), dtype)
    sets = [(jax.random.normal(jax.random.key(300 + i), (sum(q_lens), hq, d), dtype),
             jnp.asarray(kc.make_tables(rng, ctx_lens, bs, max(blocks), num_blocks)))
            for i in range(num_sets)]
    lens = jnp.asarray(ctx_lens, jnp.int32)
    qsl = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    return pool, sets, lens, qsl


def useful_flops(q_lens, cached, hq, d):
    """4 * head_dim * num_heads * attended (query, key) pairs: QK^T and PV,
    2 flops a multiply-add, causal (a new token sees the cache and itself)."""
    return 4 * d * hq * sum(q * c + q * (q + 1) // 2 for q, c in zip(q_lens, cached))


def mosaic_skip_reason(q, pool, bt, lens, qsl, interpret):
    """Why the Mosaic GPU kernel is not timed here; None where it is (the
    facade's own rule: kgpu.ragged_impl)."""
    if not mgpu.supports(q, pool):
        try:
            jax.eval_shape(lambda: kgpu.ragged_paged_attention(
                q, pool, bt, lens, qsl, scale=1.0, impl="mosaic"))
        except ValueError as e:
            return f"the Mosaic GPU kernel does not take this shape: {e}"
        return "the Mosaic GPU kernel does not take this shape (supports() is False)"
    if kgpu.ragged_impl(q, pool, interpret=interpret) != "mosaic":
        dev = jax.devices()[0]
        return (f"the Mosaic GPU kernel needs a Hopper GPU (sm_90), compiled; this run: "
                f"{dev.device_kind} ({dev.platform}){', interpret mode' if interpret else ''}")
    return None


def bench_cudnn_dense(q_lens, cached, hq, hkv, d, reps, flops):
    """cuDNN (jax.nn.dot_product_attention) on the dense equivalent of a
    ragged shape: q [num_seqs, max_q_len], K/V [num_seqs, max_context]."""
    dev = jax.devices()[0]
    if dev.platform != "gpu":
        return dict(skipped=f"cuDNN needs a CUDA GPU; this run: {dev.device_kind} ({dev.platform})")
    dtype, scale = jnp.bfloat16, d ** -0.5
    ctx_lens = [q + c for q, c in zip(q_lens, cached)]
    # NOTE: cuDNN's causal mask is top-left aligned, so a cached prefix cannot
    # be masked causally: those shapes run unmasked over each sequence's
    # whole context (key lengths given) and compute the q x context rectangle.
    causal = not any(cached)
    if causal:
        computes = ("causal self-attention of each sequence's new tokens (no cache): "
                    "the same (query, key) pairs as ours")
        own = flops
    else:
        computes = ("no mask, key_value_seq_lengths = context: each sequence's new queries "
                    "against its whole context, the q_len x context rectangle (own FLOPs); "
                    "cuDNN has no bottom-right causal mask for a cached prefix")
        own = 4 * d * hq * sum(q * c for q, c in zip(q_lens, ctx_lens))
    try:
        sets = [tuple(jax.random.normal(jax.random.key(500 + 10 * i + j), shape, dtype)
                      for j, shape in enumerate([(len(q_lens), max(q_lens), hq, d)]
                                                + 2 * [(len(q_lens), max(ctx_lens), hkv, d)]))
                for i in range(4)]  # distinct inputs: L2 cannot serve them

        def cudnn(kv_lens, q, k, v):
            return jax.nn.dot_product_attention(
                q, k, v, scale=scale, is_causal=causal,
                key_value_seq_lengths=None if causal else kv_lens, implementation="cudnn")
        t = time_sets(cudnn, sets, reps, (jnp.asarray(ctx_lens, jnp.int32),))
    except Exception:
        return dict(computes=computes, error=traceback.format_exc())
    return dict(computes=computes, us=t * 1e6, own_flops=int(own),
                tflops_own=own / t / 1e12, tflops=flops / t / 1e12)


def bench_prefill_shape(name, q_lens, cached, hq, hkv, d, bs, reps, log, *, tunings,
                        cudnn=True, matmul_tflops=None, interpret=False):
    """Times our ragged kernels (and cuDNN's dense attention) on one bf16
    prefill shape, each kernel checked against the reference first.

    Args:
      name:     the shape's label.
      q_lens, cached: new and cached tokens of each sequence.
      hq, hkv, d, bs: query heads, KV heads, head_dim, block_size.
      tunings:  {"triton": [...], "mosaic": [...]}: launch settings timed per
                kernel ({}: its defaults); a kernel left out is not run.
      cudnn:    also time cuDNN on the dense equivalent (bench_cudnn_dense).
      matmul_tflops: this run's bf16 matmul rate, for the x_matmul ratios.
      interpret: Pallas interpret mode (CPU).
    Returns:
      dict(name, shape, useful_flops, <kernel>=[entry per tuning], cudnn=...):
      an entry holds us, tflops (useful FLOPs / time), err (max |out - ref|),
      x_matmul (tflops / matmul rate) and x_cudnn (cuDNN's time / ours: the
      ratio at equal useful FLOPs), or skipped (why) or error (traceback).
    """
    flops = useful_flops(q_lens, cached, hq, d)
    res = dict(name=name, shape=dict(q_lens=q_lens, cached=cached, num_heads=hq,
                                     num_kv_heads=hkv, group=hq // hkv, head_dim=d,
                                     block_size=bs, dtype="bfloat16"),
               useful_flops=int(flops))
    num_sets = 2 if interpret else 4  # interpret mode: fewer kernel copies to compile
    pool, sets, lens, qsl = prefill_inputs(7, q_lens, cached, hq, hkv, d, bs, num_sets,
                                           jnp.bfloat16)
    scale = d ** -0.5
    q0, bt0 = sets[0]
    ref = reference.ragged_paged_attention(q0, pool, bt0, lens, qsl, scale=scale)
    for impl, impl_tunings in tunings.items():
        skip = mosaic_skip_reason(q0, pool, bt0, lens, qsl, interpret) if impl == "mosaic" else None
        if skip:
            res[impl] = [dict(tuning={}, skipped=skip)]
            log(f"  {name} {impl:6s} skipped: {skip}")
            continue
        res[impl] = []
        for tune in tqdm(impl_tunings, desc=f"{name} {impl}", disable=len(impl_tunings) < 2):
            try:
                fn = lambda pool, lens, qsl, q, bt, tune=tune, impl=impl: kgpu.ragged_paged_attention(
                    q, pool, bt, lens, qsl, scale=scale, interpret=interpret, impl=impl, **tune)
                t, out = time_sets(fn, sets, reps, (pool, lens, qsl), return_first=True)
                err = kc.max_abs_err(out, ref)
                res[impl].append(dict(tuning=tune, us=t * 1e6, tflops=flops / t / 1e12, err=err))
                log(f"  {name} {impl:6s} {str(tune):60s} {t * 1e6:9.1f} us "
                    f"{flops / t / 1e12:6.1f} TFLOP/s err {err:.1e}")
            except Exception:
                res[impl].append(dict(tuning=tune, error=traceback.format_exc()))
                log(f"  {name} {impl} {tune} FAILED\n{traceback.format_exc()}")
    del pool, sets
    if cudnn:
        c = res["cudnn"] = bench_cudnn_dense(q_lens, cached, hq, hkv, d, reps, flops)
        if "us" in c:
            log(f"  {name} cudnn  {c['us']:9.1f} us {c['tflops']:6.1f} TFLOP/s useful "
                f"({c['tflops_own']:.1f} own): {c['computes']}")
        else:
            log(f"  {name} cudnn  {c.get('skipped') or 'FAILED'}\n{c.get('error', '')}")
    cudnn_us = res.get("cudnn", {}).get("us")
    for impl in tunings:
        for e in res[impl]:
            if "us" in e and matmul_tflops:
                e["x_matmul"] = e["tflops"] / matmul_tflops
            if "us" in e and cudnn_us:
                e["x_cudnn"] = cudnn_us / e["us"]
    if cudnn and "us" in res["cudnn"] and matmul_tflops:
        res["cudnn"]["x_matmul"] = res["cudnn"]["tflops_own"] / matmul_tflops
    return res


def bench_ragged(reps, quick, log, matmul_tflops):
    """Today's ragged shape (8 x 512 new tokens over 0-1536 cached, 32/8
    heads, head_dim 128): the Triton kernel with its tuning list."""
    label, q_lens, cached = prefill_batches(TINY)[0]
    tunings = [{}] + ([] if quick else RAGGED_TUNINGS)
    return bench_prefill_shape(f"{label}_hd128_g4", q_lens, cached, 32, 8, 128, 16, reps, log,
                               tunings=dict(triton=tunings), cudnn=False,
                               matmul_tflops=matmul_tflops, interpret=TINY)


def _cell(entries, key="tflops"):
    """One kernel's table cells: TFLOP/s, % of matmul, x cuDNN (best tuning)."""
    if not entries or all("skipped" in e for e in entries):
        return f"{'skip':>7s} {'':>5s} {'':>6s}"
    b = best(entries, key)
    if b is None:
        return f"{'FAIL':>7s} {'':>5s} {'':>6s}"
    mm = f"{b['x_matmul'] * 100:4.0f}%" if "x_matmul" in b else f"{'-':>5s}"
    xc = f"{b['x_cudnn']:6.2f}" if "x_cudnn" in b else f"{'-':>6s}"
    return f"{b[key]:7.4g} {mm} {xc}"


def log_prefill_table(rows, log):
    log(f"{'prefill shape':36s} {'GFLOP':>7s} | {'triton':>7s} {'%mm':>5s} {'xcuDNN':>6s} | "
        f"{'mosaic':>7s} {'%mm':>5s} {'xcuDNN':>6s} | {'cuDNN':>7s} {'own':>6s}")
    for r in rows:
        if "skipped" in r:
            log(f"{r['name']:36s} skipped: {r['skipped']}")
            continue
        c = r.get("cudnn", {})
        cud = (f"{c['tflops']:7.4g} {c['tflops_own']:6.4g}" if "us" in c
               else f"{'skip' if 'skipped' in c else 'FAIL':>7s} {'':>6s}")
        log(f"{r['name']:36s} {r['useful_flops'] / 1e9:7.4g} | {_cell(r.get('triton'))} | "
            f"{_cell(r.get('mosaic'))} | {cud}")
    log("TFLOP/s of useful causal FLOPs; %mm: of this run's bf16 matmul; xcuDNN: cuDNN's "
        "time / ours (equal useful FLOPs); cuDNN own: its own FLOPs (the rectangle where cached)")


TINY = False  # --tiny: CPU smoke test of the script itself

# Tunings timed per shape. The lists keep the best few of a full sweep (run
# 1 in NOTES.md, benchmarks/results/kernels-*-sweep1.json: 13 of ours and 13
# of JAX's settings per main shape) so a run fits the device budget.
SWEEP_OURS = [dict(chunk_tokens=ct, num_warps=nw, num_stages=st)
              for ct in (32, 64, 128) for nw in (4, 8) for st in (2, 3)]
# head_dim 64 (issue 15 item 5): wider chunks, fewer or more warps, deeper pipelines
SWEEP_HD64 = [dict(chunk_tokens=ct, num_warps=nw, num_stages=st)
              for ct in (64, 128, 256) for nw in (2, 4, 8) for st in (2, 3, 4)]
OURS_TUNINGS = {
    "gqa_b64_c2048": [dict(chunk_tokens=128, num_warps=4), dict(num_stages=2), dict(num_splits=2)],
    "gqa_b1_c32768": [dict(num_stages=2), dict(num_splits=32, num_stages=2),
                      dict(num_splits=128, num_stages=2)],
    "mha_b64_c2048": [dict(chunk_tokens=128, num_warps=4), dict(chunk_tokens=32)],
    "gqa_b8_c4096": [dict(chunk_tokens=128, num_warps=8), dict(num_stages=2)],
    "gqa_b256_c1024": [dict(chunk_tokens=128, num_warps=8)],
    "smollm2_b64_c2048": [dict(chunk_tokens=128), dict(chunk_tokens=32)],
    "opt_hd64_b64_c2048": [dict(chunk_tokens=128), dict(chunk_tokens=32)],
    "opt_hd80_b64_c2048": [dict(chunk_tokens=128), dict(chunk_tokens=32)],
    "llama1b_b256_c512": [dict(chunk_tokens=128), dict(chunk_tokens=128, num_warps=8)],
    "smollm2_b256_c512": [dict(chunk_tokens=128), dict(chunk_tokens=128, num_warps=8)],
}
_J = lambda p, k, w: dict(pages_per_compute_block=p, k_splits=k, num_warps=w)
JAX_TUNINGS = {
    "gqa_b64_c2048": [_J(8, 1, 8), _J(8, 2, 8), _J(8, 4, 4), _J(16, 1, 8)],
    "gqa_b1_c32768": [_J(8, 32, 4), _J(8, 32, 8), _J(8, 16, 4), _J(8, 64, 4)],
    "mha_b64_c2048": [_J(8, 4, 4), _J(8, 2, 4), _J(8, 1, 8)],
    "gqa_b8_c4096": [_J(8, 4, 4), _J(8, 8, 4), _J(8, 8, 8)],
    "gqa_b256_c1024": [_J(8, 4, 4), _J(8, 1, 8), _J(8, 2, 8)],
    "smollm2_b64_c2048": [_J(8, 4, 4), _J(8, 1, 8)],
    "opt_hd64_b64_c2048": [_J(8, 1, 4), _J(8, 4, 4), _J(8, 1, 8)],
    "opt_hd80_b64_c2048": [],  # its kernel needs power-of-two head_dim
    "llama1b_b256_c512": [_J(8, 1, 4), _J(8, 1, 8), _J(4, 1, 4)],
    "smollm2_b256_c512": [_J(8, 1, 4), _J(8, 1, 8)],
}
RAGGED_TUNINGS = [
    dict(block_q=32, chunk_tokens=32, num_warps=8, num_stages=2),
    dict(block_q=32, chunk_tokens=64, num_warps=4, num_stages=3),
    dict(block_q=16, chunk_tokens=64, num_warps=4, num_stages=3),
    dict(block_q=64, chunk_tokens=32, num_warps=8, num_stages=2),
    dict(block_q=64, chunk_tokens=64, num_warps=8, num_stages=2),
    dict(block_q=32, chunk_tokens=128, num_warps=8, num_stages=2),
    dict(block_q=32, chunk_tokens=32, num_warps=8, num_stages=1),
]
# The prefill sweep: 32 query heads over 32 / 8 / 4 KV heads (GQA groups 1 /
# 4 / 8), each (head_dim, group) on all three batches of prefill_batches.
SWEEP_NUM_HEADS = 32
SWEEP_HEAD_DIM_GROUPS = [(128, 4), (64, 8), (128, 8), (64, 4), (128, 1), (64, 1)]

DECODE_SHAPES = [  # name, num_seqs, context, Hq, Hkv, head_dim
    ("gqa_b64_c2048", 64, 2048, 32, 8, 128),
    ("gqa_b1_c32768", 1, 32768, 32, 8, 128),
    ("mha_b64_c2048", 64, 2048, 32, 32, 128),
    ("gqa_b8_c4096", 8, 4096, 32, 8, 128),
    ("gqa_b256_c1024", 256, 1024, 32, 8, 128),
    ("smollm2_b64_c2048", 64, 2048, 9, 3, 64),
    ("opt_hd64_b64_c2048", 64, 2048, 32, 32, 64),   # OPT-1.3B-like heads
    ("opt_hd80_b64_c2048", 64, 2048, 32, 32, 80),   # OPT-2.7B-like heads
    ("llama1b_b256_c512", 256, 512, 32, 4, 64),     # the step of bench_step.py
    ("smollm2_b256_c512", 256, 512, 9, 3, 64),
]


def best(entries, key):
    ok = [e for e in entries if key in e and e.get("err", 0) == e.get("err", 0)
          and e.get("err", 0) <= 3e-2]
    return max(ok, key=lambda e: e[key]) if ok else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--commit", default="unknown", help="git commit of the code under test")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/kernels-<device>.json)")
    ap.add_argument("--log", default=None, help="also write the log to this file")
    ap.add_argument("--quick", action="store_true",
                    help="no tuning sweeps, and no prefill sweep unless --prefill-sweep (smoke test)")
    ap.add_argument("--reps", type=int, default=15, help="timed repetitions per measurement (median)")
    ap.add_argument("--shapes", default="all", help="comma-separated decode shape names, or 'all' / 'none'")
    ap.add_argument("--skip-check", action="store_true", help="benchmark even if a check fails")
    ap.add_argument("--no-check", action="store_true",
                    help="do not run the correctness checks of the shared cases (every benchmark "
                         "still compares its kernel with the reference: err in the JSON)")
    ap.add_argument("--no-ragged", action="store_true",
                    help="skip the ragged benchmark (the Triton kernel's tunings on 8 x 512)")
    ap.add_argument("--sweep", default="",
                    help="decode shapes that get the full tuning sweep (others: a few settings)")
    ap.add_argument("--prefill-sweep", action=argparse.BooleanOptionalAction, default=None,
                    help="the prefill sweep: Triton, Mosaic GPU and cuDNN over 3 batches x "
                         "head_dim 64/128 x GQA 1/4/8 (default: on, off with --quick)")
    ap.add_argument("--prefill-shapes", default="all",
                    help="comma-separated prefill sweep shape names (see the log), or 'all'")
    ap.add_argument("--time-limit", type=float, default=0,
                    help="seconds from the start after which no further prefill sweep shape "
                         "starts (those left are recorded as skipped); 0: no limit")
    ap.add_argument("--topk", action="store_true",
                    help="also time the sampler's top-k (exact_top_k against lax.top_k)")
    ap.add_argument("--tiny", action="store_true",
                    help="CPU smoke test of this script: tiny shapes, interpret mode, no checks")
    args = ap.parse_args(argv)
    global TINY
    TINY = args.tiny
    prefill_sweep = not args.quick if args.prefill_sweep is None else args.prefill_sweep

    logf = open(args.log, "w") if args.log else None

    def log(msg):
        print(msg, flush=True)
        if logf:
            logf.write(msg + "\n")
            logf.flush()

    dev = jax.devices()[0]
    device = dev.device_kind
    log(f"device {device}, jax {jax.__version__}, platform {dev.platform}")
    out = args.out or os.path.join("benchmarks", "results",
                                   f"kernels-{device.replace(' ', '_')}.json")

    def save(result):  # after every shape, so a cut-off run keeps its figures
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=1, default=float)

    t_start = time.time()
    rows, failures = check_all(log) if not (TINY or args.no_check) else ([], [])
    log(f"checks: {len(rows) - len(failures)}/{len(rows)} passed ({time.time()-t_start:.0f}s)")
    result = dict(device=device, jax=jax.__version__, commit=args.commit,
                  command=" ".join(["python3", "scripts/bench_kernels.py",
                                    *(sys.argv[1:] if argv is None else argv)]),
                  host=platform.node(),
                  checks=[dict(kernel=k, case=n, tuning=t, max_abs_err=e, dtype=dt)
                          for k, n, t, e, dt in rows],
                  checks_failed=len(failures))
    if failures and not args.skip_check:
        log("correctness checks failed; not benchmarking")
        sys.exit(1)

    result["copy_tbps"] = copy_ceiling(args.reps)
    # (--tiny: large enough that two more calls take well over a CPU's timing noise)
    result["matmul_tflops"] = matmul_rate(args.reps, 384 if TINY else 8192)
    log(f"copy ceiling {result['copy_tbps']:.3f} TB/s (read+write); "
        f"bf16 matmul {result['matmul_tflops']:.0f} TFLOP/s")

    shapes = DECODE_SHAPES if args.shapes == "all" else (
        [] if args.shapes == "none" else [s for s in DECODE_SHAPES if s[0] in args.shapes.split(",")])
    result["decode"] = []
    if TINY and shapes:
        shapes = [("tiny", 2, 64, 8, 2, 128)]
    sweep = args.sweep.split(",")
    for shape in shapes:
        log(f"decode {shape}")
        result["decode"].append(bench_decode(shape, args.reps, args.quick, log,
                                             sweep=shape[0] in sweep or TINY))
        save(result)
    if not args.no_ragged:
        log("ragged")
        result["ragged"] = bench_ragged(args.reps, args.quick, log, result["matmul_tflops"])
        save(result)
    if prefill_sweep:
        result["prefill_sweep"] = []
        wanted = args.prefill_shapes.split(",")
        for name, *spec in tqdm([s for s in prefill_sweep_shapes(TINY)
                                 if args.prefill_shapes == "all" or s[0] in wanted],
                                desc="prefill sweep"):
            if args.time_limit and time.time() - t_start > args.time_limit:
                result["prefill_sweep"].append(
                    dict(name=name, skipped=f"--time-limit {args.time_limit:g} s reached"))
                continue
            log(f"prefill {name}")
            result["prefill_sweep"].append(bench_prefill_shape(
                name, *spec, args.reps, log, tunings=dict(triton=[{}], mosaic=[{}]),
                matmul_tflops=result["matmul_tflops"], interpret=TINY))
            save(result)

    if args.topk:
        log("topk")
        result["topk"] = bench_topk(args.reps, log)
    save(result)

    log("")
    log(f"== {device}: copy {result['copy_tbps']:.2f} TB/s, "
        f"matmul {result['matmul_tflops']:.0f} TFLOP/s ==")
    if result["decode"]:
        log(f"{'decode shape':22s} {'ours TB/s':>9s} {'jax TB/s':>9s} {'x jax':>6s} {'dense TB/s':>10s}  best tuning")
    for r in result["decode"]:
        o, j = best(r["ours"], "tbps"), best(r["jax_pallas"], "tbps")
        ot = o["tbps"] if o else float("nan")
        jt = j["tbps"] if j else float("nan")
        dense = r["dense_xla"].get("tbps", float("nan"))  # (nan: its timing failed)
        log(f"{r['shape']['name']:22s} {ot:9.3f} {jt:9.3f} {ot/jt:6.2f} {dense:10.3f}  "
            f"{o['tuning'] if o else '-'}")
    if "ragged" in result:
        o = best(result["ragged"]["triton"], "tflops")
        if o:
            log(f"ragged {result['ragged']['name']} (Triton): {o['tflops']:.1f} TFLOP/s = "
                f"{o['x_matmul']*100:.1f}% of matmul  {o['tuning']}")
    if "prefill_sweep" in result:
        log_prefill_table(result["prefill_sweep"], log)
    log(f"wrote {out}; total {time.time()-t_start:.0f}s")


if __name__ == "__main__":
    main()
