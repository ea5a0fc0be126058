"""KV sharing: parallel sampling, beam search and shared prefixes (paper section 6.3-6.4).

On Alpaca-like requests (synthetic lengths, or --workload):
- parallel sampling n = 2, 4, 6 (--parallel): % of KV blocks saved by
  sharing (block-table entries vs distinct blocks, summed over steps) and
  throughput against the same work without sharing: n independent requests
  of the same prompt with their own seeds.
- beam search of width 2, 4, 6 (--beams): % saved, and throughput against
  width independent greedy sequences of the same lengths (what a beam search
  without sharing holds in memory and computes per step).
- shared prefix (--shots 1,5: the paper's 80- and 341-token few-shot
  prompts in front of every request): throughput with vs without prefix caching.
Output lengths are fixed per request (ignore_eos). Writes
benchmarks/results/sharing-<device>.json (or --out), prints a table last.
"""
from __future__ import annotations

import argparse


def parse_args(argv):
    from jpaged.bench.harness import add_engine_args, add_model_args, add_output_args, parse_list
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--workload", default="alpaca",
                   help="alpaca (synthetic Alpaca-like lengths), synthetic, sharegpt, or a "
                        "workload .json")
    p.add_argument("--num-requests", type=int, default=200,
                   help="requests per experiment (parallel sampling / beam search)")
    p.add_argument("--num-prefix-requests", type=int, default=400,
                   help="requests per shared-prefix experiment")
    p.add_argument("--seed", type=int, default=0, help="workload and sampling seed")
    p.add_argument("--parallel", default="2,4,6", help="parallel sampling sizes n ('' skips)")
    p.add_argument("--beams", default="2,4,6", help="beam widths ('' skips)")
    p.add_argument("--shots", default="1,5",
                   help="few-shot prefixes to test: 1 (80 tokens), 5 (341 tokens) ('' skips)")
    p.add_argument("--prefix-scale", type=float, default=1.0,
                   help="multiplies the prefix lengths (tiny test models only)")
    add_engine_args(p, kv_cache_gib_default=1.0,
                    kv_cache_gib_note="; sharing pays off when memory bounds the batch")
    p.add_argument("--usable-kv-gib", type=float, default=None,
                   help="hand out only this many GiB of the pool's blocks (default: all); "
                        "keeps the compiled steps of a larger --kv-cache-gib (e.g. "
                        "bench_throughput's) while memory bounds the batch")
    p.add_argument("--profile-host", default=None, metavar="PATH",
                   help="profile the host side of the beam search runs, shared and unshared "
                        "(cProfile, two files: PATH.beam and PATH.unshared)")
    p.add_argument("--profile-device", default=None, metavar="DIR",
                   help="trace the beam search runs with jax.profiler under DIR and record "
                        "their device time per jitted function and kernel in the JSON")
    add_output_args(p, "sharing")
    args = p.parse_args(argv)
    try:
        args.parallel = parse_list(args.parallel, kind=int) if args.parallel else []
        args.beams = parse_list(args.beams, kind=int) if args.beams else []
        args.shots = parse_list(args.shots, kind=int) if args.shots else []
    except ValueError as e:
        p.error(str(e))
    from jpaged.bench.workloads import PREFIX_LENS
    if any(n < 2 for n in args.parallel + args.beams):
        p.error("--parallel and --beams sizes must be >= 2")
    if any(s not in PREFIX_LENS for s in args.shots):
        p.error(f"--shots must be among {sorted(PREFIX_LENS)}")
    if args.usable_kv_gib is not None and not args.usable_kv_gib > 0:
        p.error("--usable-kv-gib must be > 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    from jpaged import SamplingParams
    from jpaged.bench.harness import (HostProfile, default_out, device_trace, engine_from_args,
                                      format_table, progress_line, result_header, run_offline,
                                      use_system, write_result)
    from jpaged.bench.workloads import PREFIX_LENS, Request, make_workload, shared_prefix
    from models import load_hf_config

    hf_config = load_hf_config(args.model)
    vocab = hf_config["vocab_size"]
    prefix_lens = {s: max(1, round(PREFIX_LENS[s] * args.prefix_scale)) for s in args.shots}
    longest_prefix = max(prefix_lens.values(), default=0)
    workload = make_workload(args.workload, max(args.num_requests, args.num_prefix_requests),
                             vocab, args.seed, max_total_len=args.max_model_len - longest_prefix)
    reqs = workload.requests[:args.num_requests]
    result = result_header("scripts/bench_sharing.py", argv)
    result.update(model=args.model, dtype=args.dtype, random_weights=True,
                  workload=workload.summary())
    model, engine, info = engine_from_args(args, hf_config, freeze=argv is None)
    num_blocks = None
    if args.usable_kv_gib is not None:
        num_blocks = 1 + int(args.usable_kv_gib * (1 << 30)
                             // model.kv_bytes_per_block(args.block_size))
        if num_blocks > engine.runner.num_gpu_blocks:
            raise SystemExit(f"--usable-kv-gib {args.usable_kv_gib} is more than the pool "
                             f"({engine.runner.num_gpu_blocks} blocks)")
    info["usable_blocks"] = num_blocks or engine.runner.num_gpu_blocks
    result["engine"] = info
    out = args.out or default_out("sharing", result["device"])
    progress = not args.no_progress

    def run(requests, params, desc, caching=False):
        use_system(engine, "jpaged", enable_prefix_caching=caching, num_blocks=num_blocks)
        return run_offline(engine, requests, params, sharing=True, progress=progress, desc=desc)

    rows = []

    def compare(kind, size, shared, unshared, note):
        progress_line(f"{kind} {size}", shared)
        write_result(result, out)  # so far: a run stopped later keeps this
        entry = dict(shared=shared, unshared=unshared, unshared_is=note,
                     blocks_saved_pct=shared["blocks_saved_pct"],
                     throughput_gain=shared["output_tokens_per_s"] / unshared["output_tokens_per_s"])
        rows.append(dict(experiment=f"{kind} {size}", saved=entry["blocks_saved_pct"],
                         with_tps=shared["output_tokens_per_s"],
                         without_tps=unshared["output_tokens_per_s"],
                         gain=entry["throughput_gain"]))
        return entry

    seed = args.seed
    result["parallel_sampling"] = {}
    for n in args.parallel:
        shared = run(reqs, [SamplingParams(n=n, temperature=1.0, seed=seed + i,
                                           max_tokens=r.output_len, ignore_eos=True)
                            for i, r in enumerate(reqs)], f"parallel n={n}")
        split = [r for r in reqs for _ in range(n)]
        unshared = run(split, [SamplingParams(temperature=1.0, seed=seed + 7919 * i,
                                              max_tokens=r.output_len, ignore_eos=True)
                               for i, r in enumerate(split)], f"parallel n={n}, unshared")
        result["parallel_sampling"][str(n)] = compare(
            "parallel", n, shared, unshared, f"{n} independent requests per prompt")

    result["beam_search"] = {}
    profiles = {kind: HostProfile(args.profile_host and f"{args.profile_host}.{kind}")
                for kind in ("beam", "unshared")}
    for k in args.beams:
        device_profile = {}
        with profiles["beam"], device_trace(args.profile_device, f"beam{k}", device_profile):
            shared = run(reqs, [SamplingParams(n=k, use_beam_search=True, temperature=0.0,
                                               max_tokens=r.output_len, ignore_eos=True)
                                for r in reqs], f"beam width {k}")
        split = [Request(list(r.prompt_token_ids), r.output_len) for r in reqs for _ in range(k)]
        with profiles["unshared"], device_trace(args.profile_device, f"beam{k}-unshared",
                                                   device_profile):
            unshared = run(split, [SamplingParams(temperature=0.0, max_tokens=r.output_len,
                                                  ignore_eos=True) for r in split],
                           f"beam width {k}, unshared")
        entry = result["beam_search"][str(k)] = compare(
            "beam", k, shared, unshared,
            f"{k} independent greedy sequences per prompt (a beam search's memory without sharing)")
        if device_profile:
            entry["device_profile"] = device_profile
    for profile in profiles.values():
        profile.write()

    result["shared_prefix"] = {}
    base = make_workload(args.workload, args.num_prefix_requests, vocab, args.seed + 1,
                         max_total_len=args.max_model_len - longest_prefix)
    for shots in args.shots:
        w = shared_prefix(base, prefix_lens[shots], vocab, seed=args.seed)
        params = [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True)
                  for r in w.requests]
        cached = run(w.requests, params, f"{shots}-shot, prefix caching", caching=True)
        plain = run(w.requests, params, f"{shots}-shot, no caching")
        entry = dict(prefix_len=prefix_lens[shots], with_caching=cached, without_caching=plain,
                     throughput_gain=cached["output_tokens_per_s"] / plain["output_tokens_per_s"])
        result["shared_prefix"][f"{shots}-shot"] = entry
        progress_line(f"{shots}-shot prefix", entry)
        write_result(result, out)
        rows.append(dict(experiment=f"{shots}-shot prefix ({prefix_lens[shots]} tok)",
                         saved=None, with_tps=cached["output_tokens_per_s"],
                         without_tps=plain["output_tokens_per_s"],
                         gain=entry["throughput_gain"]))
    result["engine"]["compiles_after_warmup"] = engine.stats.compiles_after_warmup
    write_result(result, out)
    print(f"\n{result['device']}  model {args.model}  workload {workload.name}  "
          f"pool {engine.runner.num_gpu_blocks} blocks")
    print(format_table(rows, [("experiment", "experiment", ""),
                              ("saved", "blocks saved %", ".1f"),
                              ("with_tps", "shared tok/s", ",.0f"),
                              ("without_tps", "unshared tok/s", ",.0f"),
                              ("gain", "gain x", ".2f")]))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
