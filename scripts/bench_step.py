"""The device-side ceiling of a decode step (issue 14 item 6, issue 15's targets).

A random-weight model of a preset shape decodes --num-seqs sequences at
--context tokens each: --steps (K) greedy decode steps inside ONE jitted
lax.fori_loop (argmax feeding the next step's token and position, the new
K/V written each step), no scheduler, no host work between steps. The pool
holds random K/V and the block tables are a random permutation of its
blocks. Timing: one compile call, --warmup calls, then the median of
--repeats calls, each waited for (block_until_ready); ms per step = call / K.

Reported per point: ms per step, tokens/s (num_seqs / step), the bandwidth
roofline (bytes the step must read and write: weights once, the K/V the
attention reads, the new token's K/V; at --peak-bw) and the ratio. Variants
(--variant) replace the attention call through the model's attention seam,
the model's code unchanged: full; no-attention (the KV write alone);
no-attention-no-kv-write (both removed).

Points: the product of --model, --num-seqs, --context, --steps and
--variant, or explicit --point MODEL:NUM_SEQS:CONTEXT:K entries (each run
with every --variant). The core is jpaged.bench.step_ceiling.run_point, which the
engine benches can call in their own process.

Writes benchmarks/results/step-<device>.json (or --out) after every point:
device, commit (git rev-parse HEAD, or $JPAGED_COMMIT), command, and per
point model, num_seqs, context, K, variant, ms_per_step, tok_per_s,
roofline_ms, ratio, bytes; prints a table last.

Example (issue 15's targets):
  python scripts/bench_step.py --point llama-1.1b:256:512:16 \\
      --point smollm2-135m-shape:256:512:16 --point llama-13b:128:512:16
"""
from __future__ import annotations

import argparse
import os
import itertools
import sys
import time


def parse_args(argv):
    from jpaged.bench.harness import add_output_args, parse_list, positive_int
    from jpaged.bench.step_ceiling import (PEAK_BW, VARIANTS, parse_compiler_options,
                                           parse_decode_tuning)
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-1.1b",
                   help="comma-separated models.random_model presets (llama-1.1b, "
                        "smollm2-135m-shape, llama-13b, opt-1.3b, ...) or JSON files holding "
                        "an HF config dict")
    p.add_argument("--num-seqs", default="256", help="comma-separated sequences per step")
    p.add_argument("--context", default="512",
                   help="comma-separated tokens already in each sequence's KV cache")
    p.add_argument("--steps", default="16", help="comma-separated K: decode steps per jitted call")
    p.add_argument("--point", action="append", default=[], metavar="MODEL:NUM_SEQS:CONTEXT:K",
                   help="an explicit point (repeatable); given, it replaces the product of "
                        "--model/--num-seqs/--context/--steps")
    p.add_argument("--variant", default="full",
                   help=f"comma-separated variants, each run at every point: {', '.join(VARIANTS)}")
    p.add_argument("--decode-tuning", action="append", default=[], metavar="CHUNK/WARPS/STAGES",
                   help="launch settings of the GPU decode kernel (chunk_tokens/num_warps/"
                        "num_stages, or 'default'); repeatable: each runs at every point "
                        "(variant full), side by side in one run")
    p.add_argument("--compiler-options", action="append", default=[],
                   metavar="NAME=VALUE[,NAME=VALUE]",
                   help="XLA debug options of the loop's compile, or 'default' (the model "
                        "runner's own: models.compiler_options()), or 'none' (XLA's own "
                        "choices); repeatable: each runs at every point, side by side in one "
                        "run, e.g. xla_gpu_experimental_force_split_k=1")
    p.add_argument("--dtype", default="bfloat16", help="params and KV cache dtype")
    p.add_argument("--block-size", type=positive_int, default=16, help="tokens per KV block")
    p.add_argument("--repeats", type=positive_int, default=5,
                   help="timed calls per point (the median counts)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls after the compile call")
    p.add_argument("--peak-bw", type=float, default=PEAK_BW,
                   help="bytes/s of the roofline (H200 HBM3e: 4.8e12)")
    p.add_argument("--attention-backend", default="auto",
                   help="kernels_pallas backend: auto (the platform's Pallas kernels; the "
                        "jnp reference on CPU), gpu, tpu, reference")
    p.add_argument("--interpret", action="store_true",
                   help="run the Pallas kernels in interpret mode (CPU checks of the GPU path)")
    p.add_argument("--tensor-parallel-size", type=positive_int, default=1,
                   help="devices the model and KV pool are split over (roofline per device)")
    p.add_argument("--seed", type=int, default=0, help="weights, tokens, pool and block tables")
    add_output_args(p, "step")
    args = p.parse_args(argv)
    try:
        args.variant = parse_list(args.variant, VARIANTS)
        args.tunings = [(t, parse_decode_tuning(t)) for t in args.decode_tuning or ["default"]]
        args.option_sets = [(o, None if o == "default" else parse_compiler_options(o))
                            for o in args.compiler_options or ["default"]]
        if any(t for _, t in args.tunings) and args.variant != ["full"]:
            raise ValueError("--decode-tuning needs --variant full")
        if args.point:
            args.points = [_parse_point(s) for s in args.point]
        else:
            args.points = list(itertools.product(
                parse_list(args.model), parse_list(args.num_seqs, kind=int),
                parse_list(args.context, kind=int), parse_list(args.steps, kind=int)))
    except ValueError as e:
        p.error(str(e))
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    return args


def _parse_point(text: str) -> tuple[str, int, int, int]:
    parts = text.rsplit(":", 3)
    try:
        model, num_seqs, context, steps = parts[0], *(int(x) for x in parts[1:])
    except ValueError:
        raise ValueError(f"--point {text!r} is not MODEL:NUM_SEQS:CONTEXT:K "
                         "(e.g. llama-1.1b:256:512:16)") from None
    return model, num_seqs, context, steps


def _build(name: str, args):
    import models
    from models import load_hf_config
    model = models.random_model(load_hf_config(name), dtype=args.dtype, seed=args.seed,
                                attention_backend=args.attention_backend,
                                interpret=args.interpret, fast_init=True)
    if args.tensor_parallel_size > 1:
        from jpaged import parallel
        model = parallel.shard_model(model, parallel.make_mesh(args.tensor_parallel_size))
    return model


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import jax
    from jpaged.bench.harness import default_out, format_table, result_header, write_result
    from jpaged.bench.step_ceiling import run_point
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        def tqdm(x, **_):
            return x
    header = result_header("scripts/bench_step.py", argv)
    out = args.out or default_out("step", header["device"])
    result = dict(header, xla_flags=os.environ.get("XLA_FLAGS", ""), dtype=args.dtype,
                  block_size=args.block_size,
                  attention_backend=args.attention_backend, interpret=args.interpret,
                  tensor_parallel_size=args.tensor_parallel_size, peak_bw=args.peak_bw,
                  repeats=args.repeats, warmup=args.warmup, results=[])
    jobs = [(p, v, t, o) for p in args.points for v in args.variant for t in args.tunings
            for o in args.option_sets]
    bar = tqdm(jobs, desc="points", disable=args.no_progress)
    model, model_name = None, None
    for (name, num_seqs, context, steps), variant, (tuning_name, tuning), (
            options_name, options) in bar:
        record = dict(model=name, num_seqs=num_seqs, context=context, K=steps, variant=variant,
                      tuning=tuning_name, options=options_name)
        try:
            if name != model_name:
                model, model_name = None, None  # NOTE: frees the last model's weights first
                t = time.perf_counter()
                model, model_name = _build(name, args), name
                result.setdefault("model_build_s", {})[name] = time.perf_counter() - t
            record.update(run_point(model, num_seqs=num_seqs, context=context, steps=steps,
                                    variant=variant, block_size=args.block_size,
                                    repeats=args.repeats, warmup=args.warmup,
                                    peak_bw=args.peak_bw, seed=args.seed,
                                    decode_tuning=tuning, compiler_options=options))
        except (ValueError, RuntimeError, jax.errors.JaxRuntimeError) as e:
            # NOTE: one point that cannot run (no memory, a bad shape) is
            # recorded and the others go on.
            record["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:500]}"
        result["results"].append(record)
        write_result(result, out)
        shown = {k: round(record[k], 3) for k in ("ms_per_step", "roofline_ms", "ratio")
                 if k in record}
        print(f"[{time.strftime('%H:%M:%S')}] {name} S={num_seqs} ctx={context} K={steps} "
              f"{variant} ({tuning_name}, {options_name}): {shown or record.get('error')}",
              flush=True)
    rows = [dict(r, weights_gb=r["bytes"]["weights"] / 1e9, kv_gb=r["bytes"]["kv_read"] / 1e9)
            if "bytes" in r else r for r in result["results"]]
    print(f"\n{header['device']} ({header['platform']}), commit {header['commit']}, "
          f"{args.dtype}, peak {args.peak_bw / 1e12:.2f} TB/s -> {out}")
    print(format_table(rows, [("model", "model", ""), ("num_seqs", "seqs", "d"),
                              ("context", "ctx", "d"), ("K", "K", "d"),
                              ("variant", "variant", ""), ("tuning", "decode tuning", ""),
                              ("options", "XLA options", ""),
                              ("ms_per_step", "ms/step", ".3f"),
                              ("tok_per_s", "tok/s", ",.0f"), ("roofline_ms", "roofline ms", ".3f"),
                              ("ratio", "x roofline", ".2f"),
                              ("pipelined_ms_per_step", "piped ms", ".3f"),
                              ("weights_gb", "weights GB", ".3f"),
                              ("kv_gb", "KV read GB", ".3f"), ("error", "error", "")]))
    return 0 if all("error" not in r for r in result["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
