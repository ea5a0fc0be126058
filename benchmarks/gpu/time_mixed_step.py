"""Host time of the parts of a step, a long prompt's chunks beside decodes
(issue 17's diagnosis): wraps the runner's jitted calls and packing, the
engine's launch and finish and the scheduler in timers, runs
bench_long_prompt's measurement (caps 128 and 0 on the long prompt's
chunk) and prints each part's calls, mean, median and max in ms, and the
cost of a trivial jitted call over the same arguments (the pytree alone).

    PYTHONPATH=. python3 benchmarks/gpu/time_mixed_step.py \
        --model benchmarks/models/llama-small-32k.json --no-progress \
        --max-model-len 32768 --kv-cache-gib 8 --num-seqs 64 --context 512

(the output of 2026-12-03: benchmarks/results/mixed-step-timing-NVIDIA_H200.log)
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import time

import numpy as np


def _timed(record, obj, name):
    """Replaces obj.name by a wrapper that appends each call's seconds to record[name]."""
    f = getattr(obj, name)

    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        out = f(*args, **kwargs)
        record[name].append(time.perf_counter() - t)
        return out
    setattr(obj, name, wrapper)


def main(argv=None):
    import jax

    from jpaged.bench.harness import add_engine_args, add_model_args, engine_from_args
    from models import load_hf_config
    spec = importlib.util.spec_from_file_location("bench_long_prompt",
                                                  "scripts/bench_long_prompt.py")
    blp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(blp)
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_engine_args(p, kv_cache_gib_default=0.0)
    p.add_argument("--num-seqs", type=int, default=64)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--base-seconds", type=float, default=1.0)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    model, engine, info = engine_from_args(args, load_hf_config(args.model), freeze=argv is None)
    runner = engine.runner
    record = collections.defaultdict(list)
    for name in ("_forward_fn", "_prefill_sample_fn", "_decode_fn", "_pack_prefill",
                 "apply_diff", "fetch"):
        _timed(record, runner, name)
    for name in ("_launch", "_finish_oldest", "_prefill_inputs"):
        _timed(record, engine, name)
    rng = np.random.default_rng(0)
    for cap in (128, 0):  # (windows between chunks off: every step holds a chunk)
        engine.use_block_manager(long_prefill_token_threshold=cap, decode_window_between_chunks=0)
        _timed(record, engine.scheduler, "schedule")  # (use_block_manager made a new one)
        record.clear()
        res = blp._measure(engine, args, rng, args.max_model_len - 96)
        print(f"cap {cap}: TPOT alone {res['tpot_alone_ms']:.2f} ms, during "
              f"{res['tpot_during_ms']:.2f}; host per step during "
              f"{res['host_ms_per_step_during']:.2f}")
        for name, secs in sorted(record.items()):
            ms = 1e3 * np.array(secs)
            print(f"  {name:22s} n={len(ms):5d} mean {ms.mean():.3f} ms p50 "
                  f"{np.median(ms):.3f} max {ms.max():.2f}")
    trivial = jax.jit(lambda params, kv, state: 0)
    call_args = (runner.model.params, runner.pool.arrays, runner.state)
    trivial(*call_args)
    t = time.perf_counter()
    for _ in range(100):
        trivial(*call_args)
    print(f"trivial jit over the same args: {(time.perf_counter() - t) * 10:.3f} ms/call "
          f"({len(jax.tree.leaves(call_args))} leaves)")


if __name__ == "__main__":
    main()
