"""Host time of each part of the engine's steps on an offline workload,
per kind of step (a decode window, a ragged step that holds prompt work),
to find what keeps the device waiting after a short step (issue 14's
throughput diagnosis): wraps the scheduler, the launch, the finish of the
step in flight (its wait for the device and its update, apart), the slot
diff and the jitted calls in timers, runs the workload once to warm up and
once timed, and prints per part and kind: calls, mean, median and total ms.

    PYTHONPATH=. python3 benchmarks/gpu/time_step_parts.py --model llama-1.1b \
        --kv-cache-gib 2 --workload benchmarks/workloads/sharegpt-1000.json --no-progress
"""

from __future__ import annotations

import argparse
import collections
import gc
import time

import numpy as np


def main(argv=None):
    from jpaged import SamplingParams
    from jpaged.bench.harness import (add_engine_args, add_model_args, engine_from_args,
                                      run_offline)
    from jpaged.bench.workloads import make_workload
    from models import load_hf_config

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_engine_args(p, kv_cache_gib_default=2.0)
    p.add_argument("--workload", default="benchmarks/workloads/sharegpt-1000.json")
    p.add_argument("--num-requests", type=int, default=1000)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    hf_config = load_hf_config(args.model)
    model, engine, info = engine_from_args(args, hf_config)
    w = make_workload(args.workload, args.num_requests, hf_config["vocab_size"], 0,
                      max_total_len=engine.config.max_model_len)
    params = [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True)
              for r in w.requests]
    record = collections.defaultdict(list)   # (part, kind) -> seconds per call
    kind_of = {}                              # id(_InFlight) -> its kind
    state = dict(launching=None, finishing=None)

    def current_kind():
        return state["launching"] or state["finishing"] or "-"

    def timed(obj, name, kind_fn=current_kind):
        f = getattr(obj, name)

        def wrapper(*a, **k):
            t = time.perf_counter()
            out = f(*a, **k)
            record[(name, kind_fn())].append(time.perf_counter() - t)
            return out
        setattr(obj, name, wrapper)

    launch, finish = engine._launch, engine._finish_oldest

    def launch_wrapper(out):
        kind = "ragged" if out.is_prefill else "window"
        state["launching"] = kind
        t = time.perf_counter()
        try:
            inflight = launch(out)
        finally:
            state["launching"] = None
        record[("_launch", kind)].append(time.perf_counter() - t)
        kind_of[id(inflight)] = kind
        return inflight

    def finish_wrapper():
        kind = kind_of.pop(id(engine._inflight[0]), "?")
        state["finishing"] = kind
        wait0 = engine._wait
        t = time.perf_counter()
        try:
            finish()
        finally:
            state["finishing"] = None
        total = time.perf_counter() - t
        waited = engine._wait - wait0
        record[("finish: wait", kind)].append(waited)
        record[("finish: update", kind)].append(total - waited)

    engine._launch, engine._finish_oldest = launch_wrapper, finish_wrapper
    runner = engine.runner
    for name in ("_decode_fn", "_forward_fn", "_prefill_sample_fn", "_pack_prefill",
                 "apply_diff"):
        timed(runner, name)
    for name in ("_prefill_inputs", "_decode_inputs"):
        timed(engine, name)
    step = engine.step

    def step_wrapper():
        t = time.perf_counter()
        out = step()
        record[("step (whole call)", "-")].append(time.perf_counter() - t)
        return out
    engine.step = step_wrapper

    gc_start = {}

    def gc_timer(phase, info):  # Python's cyclic collector: its pauses, per generation
        if phase == "start":
            gc_start["t"] = time.perf_counter()
        else:
            record[(f"gc gen {info['generation']}", "-")].append(
                time.perf_counter() - gc_start["t"])
    gc.callbacks.append(gc_timer)

    for run in ("warm", "timed", "timed, gc.freeze() first"):
        if run.endswith("first"):  # the objects alive now leave the collector's scans
            gc.collect()
            gc.freeze()
        engine.use_block_manager()
        timed(engine.scheduler, "schedule", lambda: "-")  # (a new scheduler each run)
        record.clear()
        t = time.perf_counter()
        res = run_offline(engine, w.requests, params, progress=not args.no_progress)
        wall = time.perf_counter() - t
        print(f"{run}: {res['output_tokens_per_s']:,.0f} out tok/s, {res['num_steps']} steps, "
              f"{res['decode_steps']} decode steps, wall {wall:.2f} s")
        if run != "warm":
            table(record)


def table(record):
    print(f"{'part':22s} {'kind':7s} {'calls':>6s} {'mean ms':>8s} {'p50 ms':>8s} "
          f"{'max ms':>8s} {'total ms':>9s}")
    for (name, kind), secs in sorted(record.items()):
        ms = 1e3 * np.array(secs)
        print(f"{name:22s} {kind:7s} {len(ms):6d} {ms.mean():8.3f} {np.median(ms):8.3f} "
              f"{ms.max():8.2f} {ms.sum():9.1f}")


if __name__ == "__main__":
    main()
