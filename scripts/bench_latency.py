"""Latency vs request rate (the paper's Figure 12) for jpaged and the Orca variants.

Requests of the workload arrive by a Poisson process at each rate; the engine
is driven by LLMEngine.add_request / step on a simulated clock that advances
by each step's measured wall time and skips idle gaps (so low rates cost no
sleeping). Normalized latency = end-to-end latency / output tokens, averaged
over requests. Each rate runs --duration seconds of arrivals (between
--min-requests and --max-requests requests); a system stops its sweep once
its normalized latency passes --stop-factor x the bound, and the whole
run stops admitting work after --time-limit seconds so one GPU call suffices.

Reports, per system, the highest rate whose mean normalized latency stays
under one bound (s/token) shared by all systems. Writes benchmarks/results/latency-<device>.json
(or --out) and prints a table last; scripts/plot.py draws the figure.
"""
from __future__ import annotations

import argparse
import math
import time


def parse_args(argv):
    from jpaged.bench.harness import (SYSTEMS, add_engine_args, add_model_args, add_output_args,
                                      parse_list)
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--workload", default="synthetic",
                   help="sharegpt, synthetic, alpaca, or a workload .json (see bench_throughput)")
    p.add_argument("--seed", type=int, default=0, help="workload and arrival seed")
    p.add_argument("--systems", default="jpaged,orca-max,orca-pow2,orca-oracle",
                   help="comma-separated: jpaged, orca-max, orca-pow2, orca-oracle, "
                        "jpaged-sync, jpaged-window1, jpaged-nochunk (chunked prefill off)")
    p.add_argument("--rates", default="4,8,16,32,48,64",
                   help="comma-separated request rates (requests/s), ascending")
    p.add_argument("--duration", type=float, default=10.0,
                   help="seconds of arrivals per rate (requests = rate x duration, clamped)")
    p.add_argument("--min-requests", type=int, default=30, help="requests per rate, at least")
    p.add_argument("--warmup-requests", type=int, default=32,
                   help="requests of a first, unrecorded run (each system, the highest rate, "
                        "at most 64 tokens each): a program's first runs after the compile are "
                        "slower, and the first system measured paid for them (H200, 6b28a13: "
                        "the first 5 requests' TTFT 27-52 ms against 10-19 in the next system)")
    p.add_argument("--max-requests", type=int, default=1500, help="requests per rate, at most")
    p.add_argument("--latency-bound", type=float, default=None,
                   help="normalized-latency bound (s/token) for the sustained-rate figure, the "
                        "same for every system (default: --bound-factor x the first system's "
                        "latency at the lowest rate; short runs cannot build the long queues "
                        "of the paper's hour-long traces, so a fixed absolute bound may never "
                        "be crossed)")
    p.add_argument("--bound-factor", type=float, default=2.0,
                   help="sets the default bound relative to the unloaded latency")
    p.add_argument("--stop-factor", type=float, default=4.0,
                   help="stop a system's sweep once its latency exceeds this x the bound")
    p.add_argument("--time-limit", type=float, default=360.0,
                   help="wall seconds for all runs; later runs are skipped (marked truncated)")
    add_engine_args(p, kv_cache_gib_default=2.0,
                    max_model_len_help="context limit (Orca-Max's reservation)")
    add_output_args(p, "latency")
    args = p.parse_args(argv)
    try:
        args.systems = parse_list(args.systems, SYSTEMS)
        args.rates = parse_list(args.rates, kind=float)
    except ValueError as e:
        p.error(str(e))
    if any(not r > 0 for r in args.rates) or args.rates != sorted(args.rates):
        p.error("--rates must be positive and ascending")
    if not 1 <= args.min_requests <= args.max_requests:
        p.error("need 1 <= --min-requests <= --max-requests")
    if args.latency_bound is not None and not args.latency_bound > 0:
        p.error("--latency-bound must be > 0")
    if not args.duration > 0 or not args.bound_factor > 1:
        p.error("--duration must be > 0 and --bound-factor > 1")
    return args


def sustained_rate(points: list[dict], bound: float) -> float | None:
    """Highest rate of an ascending sweep before the mean normalized latency
    first exceeds `bound` (None if even the lowest does)."""
    best = None
    for pt in points:
        if pt.get("truncated") or not pt["mean_normalized_latency"] <= bound:
            break
        best = pt["rate"]
    return best


def main(argv=None):
    args = parse_args(argv)
    from tqdm import tqdm
    from jpaged import SamplingParams
    from jpaged.bench.harness import (LABELS, default_out, engine_from_args, format_table,
                                      progress_line, result_header, run_poisson,
                                      use_system, write_result)
    from jpaged.bench.workloads import make_workload, poisson_arrivals
    from models import load_hf_config
    hf_config = load_hf_config(args.model)
    counts = [min(args.max_requests, max(args.min_requests, math.ceil(r * args.duration)))
              for r in args.rates]
    workload = make_workload(args.workload, max(counts), hf_config["vocab_size"], args.seed,
                             max_total_len=args.max_model_len)
    result = result_header("scripts/bench_latency.py", argv)
    result.update(model=args.model, dtype=args.dtype, random_weights=True,
                  workload=workload.summary(),
                  clock="simulated: sum of measured step times, idle gaps skipped")
    _, engine, info = engine_from_args(args, hf_config, freeze=argv is None)
    result["engine"] = info
    result["warmup_requests"] = warm = min(args.warmup_requests, len(workload.requests))
    for system in args.systems if warm else ():
        use_system(engine, system,
                   decode_window_between_chunks=args.decode_window_between_chunks)
        run_poisson(engine, workload.requests[:warm],
                    poisson_arrivals(warm, max(args.rates), seed=args.seed + 1000),
                    [SamplingParams(temperature=0.0, max_tokens=min(r.output_len, 64),
                                    ignore_eos=True) for r in workload.requests[:warm]])
    out = args.out or default_out("latency", result["device"])
    deadline = time.perf_counter() + args.time_limit
    systems = {}
    jobs = [(s, i) for s in args.systems for i in range(len(args.rates))]
    bar = tqdm(jobs, desc="system x rate", disable=args.no_progress)
    stopped = set()
    bound = args.latency_bound
    result["latency_bound_source"] = "--latency-bound"
    for system, i in bar:
        rate, n = args.rates[i], counts[i]
        points = systems.setdefault(system, dict(points=[]))["points"]
        if system in stopped:
            continue
        if time.perf_counter() > deadline:
            points.append(dict(rate=rate, num_requests=n, truncated=True,
                               mean_normalized_latency=math.nan, skipped="time limit"))
            continue
        use_system(engine, system,
                   decode_window_between_chunks=args.decode_window_between_chunks)
        reqs = workload.requests[:n]
        params = [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True)
                  for r in reqs]
        arrivals = poisson_arrivals(n, rate, seed=args.seed + i)
        pt = run_poisson(engine, reqs, arrivals, params, deadline=deadline)
        pt = dict(rate=rate, **pt)
        points.append(pt)
        result["systems"] = systems
        progress_line(f"{system} @ {rate:g} req/s", pt)
        write_result(result, out)  # so far: a run stopped later keeps this
        if pt["truncated"]:
            # (drops what the abort left behind)
            use_system(engine, system,
                       decode_window_between_chunks=args.decode_window_between_chunks)
        if bound is None:
            bound = args.bound_factor * pt["mean_normalized_latency"]
            result["latency_bound_source"] = (f"{args.bound_factor} x {LABELS[system]}'s "
                                              f"latency at {rate:g} req/s")
        if not pt["mean_normalized_latency"] <= args.stop_factor * bound:
            stopped.add(system)
    for name, s in systems.items():
        s["label"] = LABELS[name]
    if bound is None:  # nothing ran
        bound = math.nan
    for name, s in systems.items():
        s["sustained_rate"] = sustained_rate(s["points"], bound)
    result["latency_bound"] = bound
    result["engine"]["compiles_after_warmup"] = engine.stats.compiles_after_warmup
    result["systems"] = systems
    write_result(result, out)

    rows = []
    for name, s in systems.items():
        row = dict(system=LABELS[name], sustained=s["sustained_rate"])
        for pt in s["points"]:
            row[f"r{pt['rate']:g}"] = pt["mean_normalized_latency"]
        rows.append(row)
    cols = [("system", "system", ""), ("sustained", "max rate", "g")]
    cols += [(f"r{r:g}", f"{r:g}/s", ".3f") for r in args.rates]
    print(f"\n{result['device']}  model {args.model}  workload {workload.name}  "
          f"mean normalized latency (s/token) by rate; max rate under {bound:.4g} s/token "
          f"({result['latency_bound_source']})")
    print(format_table(rows, cols))
    rows = [dict(system=LABELS[name], rate=pt["rate"], **{k: pt.get(k) for k in (
        "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "behind_window_share",
        "ttft_p50_behind_window_ms", "ttft_p50_no_window_ms")})
        for name, s in systems.items() for pt in s["points"] if "skipped" not in pt]
    print(format_table(rows, [("system", "system", ""), ("rate", "req/s", "g"),
                              ("ttft_p50_ms", "TTFT p50 ms", ".1f"),
                              ("ttft_p99_ms", "TTFT p99 ms", ".1f"),
                              ("tpot_p50_ms", "TPOT p50 ms", ".2f"),
                              ("tpot_p99_ms", "TPOT p99 ms", ".2f"),
                              ("behind_window_share", "behind a window", ".2f"),
                              ("ttft_p50_behind_window_ms", "TTFT p50 then", ".1f"),
                              ("ttft_p50_no_window_ms", "TTFT p50 else", ".1f")]))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
