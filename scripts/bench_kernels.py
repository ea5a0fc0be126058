"""Checks the GPU Pallas kernels against the reference, then benchmarks them.

In one run, on one device: the copy ceiling (a large device copy, bytes read
+ written), the bf16 matmul rate, paged decode attention (ours, with a small
tuning sweep; JAX's own Pallas GPU paged_attention with its best of a few
settings, on the same inputs converted to its [Hkv, pages, page_size, D]
layout outside the timed region; a dense contiguous-cache XLA attention of
the same shape) and ragged prefill attention (useful FLOPs / time vs the
matmul rate). Prints a table last and writes
benchmarks/results/kernels-<device>.json (or --out).

Timing: each measured call runs R distinct input sets back to back inside
one jitted function (different q and block tables over a pool 4x larger than
one call reads, so L2 cannot serve them); the per-call time is the slope
between R/2 and R sets (dispatch overhead cancels), median of --reps.

Usage (on the GPU machine, from the repository root):
  PYTHONPATH=. python3 scripts/bench_kernels.py --commit <sha> [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings

import numpy as np
import jax
import jax.numpy as jnp

from kernels_pallas import reference
from kernels_pallas import gpu as kgpu

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

def time_sets(fn, sets, reps, shared=()):
    """Median seconds per call of fn(*shared, *s), from the slope between
    running len(sets)//2 and len(sets) input sets inside one jit (shared
    arrays, e.g. the pool, are arguments: never baked in as constants)."""
    half = len(sets) // 2
    f_half = jax.jit(lambda sh, ss: [fn(*sh, *s) for s in ss])
    f_full = jax.jit(lambda sh, ss: [fn(*sh, *s) for s in ss])
    a, b = sets[:half], sets
    for _ in range(2):
        jax.block_until_ready(f_half(shared, a))
        jax.block_until_ready(f_full(shared, b))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f_half(shared, a))
        t1 = time.perf_counter()
        jax.block_until_ready(f_full(shared, b))
        t2 = time.perf_counter()
        samples.append(((t2 - t1) - (t1 - t0)) / (len(b) - len(a)))
    return float(np.median(samples))


def copy_ceiling(reps):
    n = (1 << 29) if not TINY else (1 << 16)  # 1 GiB of bf16 per buffer
    sets = [(jax.random.normal(jax.random.key(i), (n,), jnp.bfloat16),) for i in range(4)]
    t = time_sets(lambda x: x * 2, sets, reps)
    return 2 * n * 2 / t / 1e12  # TB/s, read + write


def matmul_rate(reps):
    n = 8192 if not TINY else 128
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
    t = time_sets(dense, dense_sets, reps)
    res["dense_xla"] = dict(us=t * 1e6, tbps=kv_bytes / t / 1e12)
    log(f"  dense XLA {t*1e6:8.1f} us {kv_bytes/t/1e12:6.3f} TB/s")
    del dense_sets, pool
    return res


# ----------------------------------------------------------------- ragged ---

def bench_ragged(reps, quick, log):
    hq, hkv, d, bs, dtype = 32, 8, 128, 16, jnp.bfloat16
    q_len = 512 if not TINY else 16
    cached = np.linspace(0, 1536 if not TINY else 40, 8).round().astype(int)
    ctx_lens = [int(c) + q_len for c in cached]
    n = 8 * q_len
    useful_pairs = sum(q_len * c + q_len * (q_len + 1) // 2 for c in cached)
    flops = 4 * d * hq * useful_pairs  # QK^T and PV, 2 flops per MAC
    rng = np.random.default_rng(3)
    blocks_per_seq = [-(-c // bs) for c in ctx_lens]
    need = sum(blocks_per_seq)
    num_blocks = 1 + 4 * need
    max_blocks = max(blocks_per_seq)
    pool = jax.random.normal(jax.random.key(7), (2, num_blocks, hkv, bs, d), dtype)
    sets = []
    for i in range(6):
        ids = rng.permutation(np.arange(1, num_blocks))[:need]
        bt = np.zeros((8, max_blocks), np.int32)
        used = 0
        for s, nb in enumerate(blocks_per_seq):
            bt[s, :nb] = ids[used:used + nb]
            used += nb
        q = jax.random.normal(jax.random.key(300 + i), (n, hq, d), dtype)
        sets.append((q, jnp.asarray(bt)))
    lens = jnp.asarray(ctx_lens, jnp.int32)
    qsl = jnp.asarray(np.arange(9) * q_len, jnp.int32)
    scale = d ** -0.5
    q0, bt0 = sets[0]
    ref = reference.ragged_paged_attention(q0, pool, bt0, lens, qsl, scale=scale)
    tunings = [{}] + ([] if quick else RAGGED_TUNINGS)
    out = []
    for tune in tqdm(tunings, desc="ragged"):
        try:
            fn = lambda pool, lens, qsl, q, bt, tune=tune: kgpu.ragged_paged_attention(
                q, pool, bt, lens, qsl, scale=scale, interpret=TINY, **tune)
            err = kc.max_abs_err(fn(pool, lens, qsl, q0, bt0), ref)
            t = time_sets(fn, sets, reps, (pool, lens, qsl))
            out.append(dict(tuning=tune, us=t * 1e6, tflops=flops / t / 1e12, err=err))
            log(f"  ragged {str(tune):70s} {t*1e6:8.1f} us {flops/t/1e12:6.1f} TFLOP/s err {err:.1e}")
        except Exception as e:
            log(f"  ragged {tune} FAILED: {type(e).__name__}: {str(e)[:300]}")
            out.append(dict(tuning=tune, error=f"{type(e).__name__}: {str(e)[:300]}"))
    return dict(shape=dict(num_seqs=8, new_tokens=q_len, cached=cached.tolist(),
                           num_heads=hq, num_kv_heads=hkv, head_dim=d, block_size=bs,
                           dtype="bfloat16"),
                useful_flops=int(flops), ours=out)


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


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--commit", default="unknown", help="git commit of the code under test")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/kernels-<device>.json)")
    ap.add_argument("--log", default=None, help="also write the log to this file")
    ap.add_argument("--quick", action="store_true", help="no tuning sweeps (smoke test)")
    ap.add_argument("--reps", type=int, default=15, help="timed repetitions per measurement (median)")
    ap.add_argument("--shapes", default="all", help="comma-separated decode shape names, or 'all' / 'none'")
    ap.add_argument("--skip-check", action="store_true", help="benchmark even if a check fails")
    ap.add_argument("--no-ragged", action="store_true", help="skip the ragged benchmark")
    ap.add_argument("--sweep", default="",
                    help="decode shapes that get the full tuning sweep (others: a few settings)")
    ap.add_argument("--tiny", action="store_true",
                    help="CPU smoke test of this script: tiny shapes, interpret mode, no checks")
    args = ap.parse_args()
    global TINY
    TINY = args.tiny

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
    rows, failures = check_all(log) if not TINY else ([], [])
    log(f"checks: {len(rows) - len(failures)}/{len(rows)} passed ({time.time()-t_start:.0f}s)")
    result = dict(device=device, jax=jax.__version__, commit=args.commit,
                  command=" ".join(["python3"] + sys.argv), host=platform.node(),
                  checks=[dict(kernel=k, case=n, tuning=t, max_abs_err=e, dtype=dt)
                          for k, n, t, e, dt in rows],
                  checks_failed=len(failures))
    if failures and not args.skip_check:
        log("correctness checks failed; not benchmarking")
        sys.exit(1)

    result["copy_tbps"] = copy_ceiling(args.reps)
    result["matmul_tflops"] = matmul_rate(args.reps)
    log(f"copy ceiling {result['copy_tbps']:.3f} TB/s (read+write); bf16 matmul {result['matmul_tflops']:.0f} TFLOP/s")

    shapes = DECODE_SHAPES if args.shapes == "all" else (
        [] if args.shapes == "none" else [s for s in DECODE_SHAPES if s[0] in args.shapes.split(",")])
    result["decode"] = []
    if TINY:
        shapes = [("tiny", 2, 64, 8, 2, 128)]
    sweep = args.sweep.split(",")
    for shape in shapes:
        log(f"decode {shape}")
        result["decode"].append(bench_decode(shape, args.reps, args.quick, log,
                                             sweep=shape[0] in sweep or TINY))
        save(result)
    if not args.no_ragged:
        result["ragged"] = bench_ragged(args.reps, args.quick, log)

    save(result)

    log("")
    log(f"== {device}: copy {result['copy_tbps']:.2f} TB/s, matmul {result['matmul_tflops']:.0f} TFLOP/s ==")
    log(f"{'decode shape':22s} {'ours TB/s':>9s} {'jax TB/s':>9s} {'x jax':>6s} {'dense TB/s':>10s}  best tuning")
    for r in result["decode"]:
        o, j = best(r["ours"], "tbps"), best(r["jax_pallas"], "tbps")
        ot = o["tbps"] if o else float("nan")
        jt = j["tbps"] if j else float("nan")
        log(f"{r['shape']['name']:22s} {ot:9.3f} {jt:9.3f} {ot/jt:6.2f} {r['dense_xla']['tbps']:10.3f}  {o['tuning'] if o else '-'}")
    if "ragged" in result:
        o = best(result["ragged"]["ours"], "tflops")
        if o:
            log(f"ragged 8x512 (+0..1536 cached): {o['tflops']:.1f} TFLOP/s = "
                f"{o['tflops']/result['matmul_tflops']*100:.1f}% of matmul  {o['tuning']}")
    log(f"wrote {out}; total {time.time()-t_start:.0f}s")


if __name__ == "__main__":
    main()
