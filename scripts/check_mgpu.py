"""Checks the Mosaic GPU ragged kernel on one Hopper GPU, then times it.

Phases (each guarded: a crash in one is recorded and the next still runs):

1. check: every ragged case of tests/kernel_cases.py (random permuted block
   tables, every slot no sequence may read NaN-filled), plus a few larger
   cases that wrap the KV ring buffers, through
   kernels_pallas/gpu/ragged_paged_attention_mgpu.py with several tunings,
   against kernels_pallas.reference (f32, highest precision). float32 cases
   run as bf16 (the kernel takes bf16/f16 only); a case the kernel refuses
   (ValueError, e.g. head_dim 80) is recorded as unsupported. Each failure
   prints its full traceback.
2. bench: scripts/bench_kernels.py's bench_prefill_shape (its timing, its
   cuDNN dense equivalent, its useful-FLOPs count) with more launch
   settings: the Mosaic GPU kernel ("mosaic", a few tunings; skipped off
   Hopper, so in --tiny too), the Triton-backend kernel ("triton") and
   cuDNN's jax.nn.dot_product_attention, at 8 seqs x 512 new tokens over
   0..1536 cached (32/8 heads, hd 128; 32/4, hd 64), 1 x 4096 causal (32/8,
   hd 128) and 1 x 4096 causal (32/4, hd 64). The bf16 matmul rate (8192^3
   jnp.dot) is measured in the same run.
3. Everything goes to one JSON file (--out).

Usage (on the GPU machine, from the repository root):
  PYTHONPATH=. python3 scripts/check_mgpu.py --out $OUT/mgpu.json
  PYTHONPATH=. python3 scripts/check_mgpu.py --tiny --out /tmp/mgpu.json  # CPU smoke test
"""
from __future__ import annotations

import argparse
import json
import traceback

import numpy as np
import jax
import jax.numpy as jnp

from kernels_pallas import reference
from kernels_pallas.gpu import ragged_paged_attention_mgpu as mgpu
from scripts import bench_kernels as bk
from tests import kernel_cases as kc

CHECK_TUNINGS = [{}, dict(p_via_smem=True), dict(block_kv=128, num_stages=2),
                 dict(block_kv=64, num_stages=1), dict(block_kv=64, num_stages=2)]
BENCH_TUNINGS = [{}, dict(block_kv=128, num_stages=2), dict(block_kv=128, num_stages=3),
                 dict(block_kv=64, num_stages=2), dict(block_kv=64, num_stages=4),
                 dict(p_via_smem=True)]
TRITON_TUNINGS = [{}, dict(block_q=32, chunk_tokens=64, num_warps=4, num_stages=3),
                  dict(block_q=64, chunk_tokens=64, num_warps=8, num_stages=2)]
# Larger cases: several KV tiles per query tile (the ring wraps), GQA 4 and
# 8, block sizes 8 / 16 / 32, decode rows and a padded tail.
EXTRA_CASES = [
    ("big_gqa4_hd128_bs16", dict(q_lens=[100, 1, 37, 300, 0], ctx_lens=[612, 900, 37, 1300, 0],
                                 num_tokens=450, num_heads=32, num_kv_heads=8,
                                 head_dim=128, block_size=16, dtype="bfloat16")),
    ("big_gqa8_hd64_bs16", dict(q_lens=[257, 1, 64], ctx_lens=[257, 700, 1000],
                                num_tokens=330, num_heads=32, num_kv_heads=4,
                                head_dim=64, block_size=16, dtype="bfloat16")),
    ("big_mha_hd128_bs32", dict(q_lens=[130, 65], ctx_lens=[500, 65], num_tokens=200,
                                num_heads=4, num_kv_heads=4, head_dim=128,
                                block_size=32, dtype="bfloat16")),
    ("big_gqa2_hd64_bs8", dict(q_lens=[33, 200, 1], ctx_lens=[400, 200, 129], num_tokens=240,
                               num_heads=8, num_kv_heads=4, head_dim=64,
                               block_size=8, dtype="bfloat16")),
]
TINY = False  # --tiny: small shapes, interpret mode (CPU smoke test of this script)


def log(msg):
    print(msg, flush=True)


def _args(c):
    return (c["q"], c["kv_cache"], c["block_tables"], c["context_lens"], c["query_start_loc"])


# ------------------------------------------------------------------ check ---

def check(tunings):
    rows = []
    cases = [(n, kw) for n, kw in kc.RAGGED_CASES] + ([] if TINY else EXTRA_CASES)
    for name, kw in cases:
        ran_as = kw["dtype"]
        if kw["dtype"] == "float32":
            ran_as = "bfloat16"  # the kernel takes bf16/f16 only (checked below)
        try:
            c = kc.ragged_case(1, **{**kw, "dtype": ran_as})
            with jax.default_matmul_precision("highest"):
                ref = reference.ragged_paged_attention(*_args(c), scale=c["scale"])
            n_real = int(c["query_start_loc"][-1])
        except Exception:
            log(f"check {name}: building the case FAILED\n{traceback.format_exc()}")
            rows.append(dict(case=name, error=traceback.format_exc()))
            continue
        for tune in tunings:
            row = dict(case=name, dtype=ran_as, tuning=tune)
            try:
                out = mgpu.ragged_paged_attention(*_args(c), scale=c["scale"],
                                                  interpret=TINY, **tune)
                err = kc.max_abs_err(out, ref)
                pad_ok = not np.asarray(jnp.asarray(out[n_real:], jnp.float32)).any()
                ok = bool(err <= kc.GPU_ATOL[ran_as] and pad_ok)  # NaN compares False
                row.update(max_abs_err=err, padding_zero=pad_ok, ok=ok)
                log(f"check {name:42s} {str(tune):40s} err {err:.2e} pad0 {pad_ok} "
                    f"{'ok' if ok else 'MISMATCH'}")
            except ValueError as e:
                row.update(unsupported=str(e), ok=None)
                log(f"check {name:42s} {str(tune):40s} unsupported: {e}")
            except Exception:
                row.update(error=traceback.format_exc(), ok=False)
                log(f"check {name:42s} {str(tune):40s} FAILED\n{traceback.format_exc()}")
            rows.append(row)
    # the float32 refusal is part of the contract (the caller falls back)
    c = kc.ragged_case(1, **kc.RAGGED_CASES[0][1])
    try:
        mgpu.ragged_paged_attention(*_args(c), scale=c["scale"], interpret=TINY)
        rows.append(dict(case="float32_refused", ok=False, error="no ValueError"))
    except ValueError as e:
        rows.append(dict(case="float32_refused", ok=True, message=str(e)))
    return rows


# ------------------------------------------------------------------ bench ---

def bench(reps, out, save, matmul_tflops):
    if TINY:
        shapes = [("mixed", [16] * 2, [0, 40], 4, 2, 64, 16),
                  ("causal", [64], [0], 4, 1, 64, 16)]
    else:
        shapes = [("8x512_cached0-1536_hd128", [512] * 8,
                   np.linspace(0, 1536, 8).round().astype(int).tolist(), 32, 8, 128, 16),
                  ("8x512_cached0-1536_hd64_32-4", [512] * 8,
                   np.linspace(0, 1536, 8).round().astype(int).tolist(), 32, 4, 64, 16),
                  ("1x4096_causal_hd128", [4096], [0], 32, 8, 128, 16),
                  ("1x4096_causal_hd64_32-4", [4096], [0], 32, 4, 64, 16)]
    for name, *spec in shapes:
        log(f"bench {name}")
        try:
            out[name] = bk.bench_prefill_shape(
                name, *spec, reps, log, matmul_tflops=matmul_tflops, interpret=TINY,
                tunings=dict(mosaic=BENCH_TUNINGS, triton=TRITON_TUNINGS[:1] if TINY
                             else TRITON_TUNINGS))
        except Exception:
            out[name] = dict(error=traceback.format_exc())
            log(f"bench {name} FAILED\n{traceback.format_exc()}")
        save()  # NOTE: after every shape, so a run stopped by its time limit keeps them


class SkipPhase(Exception):
    pass


def main():
    global TINY
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file for every result and traceback")
    ap.add_argument("--reps", type=int, default=11, help="timed repetitions per measurement (median)")
    ap.add_argument("--skip-bench", action="store_true", help="run the checks only")
    ap.add_argument("--skip-check", action="store_true", help="run the timings only")
    ap.add_argument("--tiny", action="store_true",
                    help="small shapes in interpret mode: a CPU smoke test of this script")
    args = ap.parse_args()
    TINY = args.tiny
    from jpaged.bench.harness import result_header
    result = dict(result_header("scripts/check_mgpu.py", None), tiny=TINY)

    def save():
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, default=str)

    log(f"device {result['device']}, jax {jax.__version__}")
    try:
        if args.skip_check:
            raise SkipPhase
        result["check"] = check(CHECK_TUNINGS[:2] if TINY else CHECK_TUNINGS)
        bad = [r for r in result["check"] if r.get("ok") is False]
        log(f"check: {len(bad)} failing of {len(result['check'])}")
    except SkipPhase:
        pass
    except Exception:
        result["check_error"] = traceback.format_exc()
        log(f"check phase FAILED\n{result['check_error']}")
    save()
    if not args.skip_bench:
        try:
            result["matmul_tflops"] = bk.matmul_rate(args.reps, 128 if TINY else 8192)
            log(f"bf16 matmul {result['matmul_tflops']:.0f} TFLOP/s")
        except Exception:
            result["matmul_error"] = traceback.format_exc()
            log(f"matmul FAILED\n{result['matmul_error']}")
        save()
        try:
            result["bench"] = {}
            bench(args.reps, result["bench"], save, result.get("matmul_tflops"))
        except Exception:
            result["bench_error"] = traceback.format_exc()
            log(f"bench phase FAILED\n{result['bench_error']}")
        save()
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
