"""Where a decode step's host time goes: input building, the jitted call, the wait.

Runs `ModelRunner` alone (no scheduler) on a random-weight model: S sequences
decoding at a fixed context, the step compiled once. Three loops:
  sync:     build inputs, call the jitted model and sampler, wait for the
            tokens; the two calls are timed apart (wrappers around them);
  pipelined: dispatch step k+1 before fetching step k (async scheduling's shape);
  device:   the jitted calls made back to back on inputs already on the
            device: the call alone (launch cost) and, over the loop, the
            larger of launch and device time per step.
Prints and (--out) appends one JSON record per run; XLA_FLAGS is recorded, so
runs with different flags compare side by side in one file.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="llama-1.1b", help="models.random_model preset or HF config JSON")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--num-seqs", type=int, default=256)
    p.add_argument("--context", type=int, default=512, help="tokens already in each sequence")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--label", default="", help="a name for this run in the JSON")
    p.add_argument("--out", help="JSON file to append this run's record to")
    args = p.parse_args(argv)
    import jax
    import numpy as np
    import models
    from jpaged.benchmark import load_hf_config
    from jpaged.engine import enable_compilation_cache
    from jpaged.model_runner import ModelRunner, SeqInput
    enable_compilation_cache()
    S, C, bs = args.num_seqs, args.context, 16
    model = models.random_model(load_hf_config(args.model), dtype=args.dtype, fast_init=True)
    per_seq = C // bs + 2
    runner = ModelRunner(model, block_size=bs, max_num_seqs=S, max_num_batched_tokens=2048,
                         max_model_len=2048, num_gpu_blocks=S * per_seq + 1)
    seqs = [SeqInput([7], C, list(range(1 + i * per_seq, 1 + (i + 1) * per_seq)))
            for i in range(S)]
    rows = [dict(temperature=0.0, seed=i, step=3) for i in range(S)]
    forward_fn, sample_fn, calls, last = runner._forward_fn, runner._sample_fn, [], {}

    def timed_forward(*a):
        t = time.perf_counter()
        out = forward_fn(*a)
        last["call_start"], last["forward"] = t, a
        return out

    def timed_sample(*a, **k):
        out = sample_fn(*a, **k)
        calls.append(time.perf_counter() - last["call_start"])
        last["sample"], last["modes"] = a[1:], k
        return out
    runner._forward_fn, runner._sample_fn = timed_forward, timed_sample
    t = time.perf_counter()
    runner.fetch(runner.dispatch(seqs, rows, is_prefill=False))
    compile_s = time.perf_counter() - t
    ms = lambda xs: round(1e3 * statistics.median(xs), 3)

    def sync_loop():
        calls.clear()
        total, wait = [], []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step = runner.dispatch(seqs, rows, is_prefill=False)
            t1 = time.perf_counter()
            runner.fetch(step)
            t2 = time.perf_counter()
            total.append(t1 - t0)
            wait.append(t2 - t1)
        build = [d - c for d, c in zip(total, calls)]
        return dict(dispatch_ms=ms(total), build_ms=ms(build), call_ms=ms(calls),
                    wait_ms=ms(wait))

    def pipelined_loop():
        prev = runner.dispatch(seqs, rows, is_prefill=False)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step = runner.dispatch(seqs, rows, is_prefill=False)
            runner.fetch(prev)
            prev = step
        runner.fetch(prev)
        return dict(step_ms=round(1e3 * (time.perf_counter() - t0) / args.steps, 3))

    def device_loop():
        a = list(last["forward"])
        a[2:] = jax.device_put(a[2:])  # every per-step input already on the device
        sampling = jax.device_put(last["sample"][0])
        kv, lat = runner.kv_caches, []  # a[1] was donated to that call

        def one(kv):
            kv, logits, _ = forward_fn(a[0], kv, *a[2:])
            out, _ = sample_fn(logits, sampling, **last["modes"])
            return kv, out
        for _ in range(3):
            kv, out = one(kv)
        jax.block_until_ready(out)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            t = time.perf_counter()
            kv, out = one(kv)
            lat.append(time.perf_counter() - t)
        jax.block_until_ready(out)
        wall = (time.perf_counter() - t0) / args.steps
        t = time.perf_counter()
        kv, out = one(kv)
        jax.block_until_ready(out)
        single = time.perf_counter() - t
        runner.kv_caches = kv
        return dict(call_ms=ms(lat), step_ms=round(1e3 * wall, 3),
                    one_step_ms=round(1e3 * single, 3))

    sync_loop()  # warm
    rec = dict(label=args.label, model=args.model, dtype=args.dtype, num_seqs=S, context=C,
               steps=args.steps, device=jax.devices()[0].device_kind,
               xla_flags=os.environ.get("XLA_FLAGS", ""), compile_s=round(compile_s, 1),
               num_param_leaves=len(jax.tree.leaves(model.params)),
               num_kv_arrays=len(jax.tree.leaves(runner.kv_caches)),
               sync=sync_loop(), pipelined=pipelined_loop(), device_only=device_loop())
    print(json.dumps(rec), flush=True)
    if args.out:
        runs = json.load(open(args.out)) if os.path.exists(args.out) else []
        json.dump(runs + [rec], open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
