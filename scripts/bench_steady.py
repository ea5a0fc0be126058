"""Steady decode: the engine against its own model's ceiling, in one run.

S requests with prompts of C random tokens each are prefilled, then the
engine decodes all S together; the tokens it generates while every request
is still running, over the wall time they took, are the engine's steady
decode rate. In the same process, jpaged.bench.step_ceiling.run_point times the
model and kernels alone (K decode steps in one jitted loop, no scheduler)
at the same S and the midpoint context; the JSON records both, their
ratio, the host time per jitted call and per decode step, and the windows.

Writes benchmarks/results/steady-<device>.json (or --out); prints a table.
"""
from __future__ import annotations

import argparse
import time


def main(argv=None):
    from jpaged.bench.harness import (add_engine_args, add_model_args, add_output_args,
                                      default_out, engine_from_args, result_header, write_result)
    from models import load_hf_config
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_engine_args(p, kv_cache_gib_default=0.0)
    add_output_args(p, "steady")
    p.add_argument("--num-seqs", type=int, default=256, help="requests decoding together (S)")
    p.add_argument("--context", type=int, default=512, help="prompt tokens per request (C)")
    p.add_argument("--decode-tokens", type=int, default=128,
                   help="tokens each request generates; the steady part is measured "
                        "while every request still runs")
    p.add_argument("--no-ceiling", action="store_true", help="skip the model-alone ceiling")
    args = p.parse_args(argv)
    from jpaged import SamplingParams
    import numpy as np
    result = result_header("scripts/bench_steady.py", argv)
    model, engine, info = engine_from_args(args, load_hf_config(args.model), freeze=argv is None)
    result.update(model=args.model, dtype=args.dtype, num_seqs=args.num_seqs,
                  context=args.context, decode_tokens=args.decode_tokens, engine=info)
    rng = np.random.default_rng(0)
    vocab = model.config.vocab_size
    sp = SamplingParams(temperature=0.0, max_tokens=args.decode_tokens, ignore_eos=True)
    for i in range(args.num_seqs):
        engine.add_request(str(i), None, sp,
                           prompt_token_ids=rng.integers(0, vocab, args.context).tolist())
    engine.clear_arrivals()  # an offline batch
    while any(s.get_output_len() == 0 for g in engine.scheduler.waiting + engine.scheduler.running
              for s in g.get_seqs()) and engine.has_unfinished_requests():
        engine.step()
    start = engine.stats.snapshot()
    t0 = time.perf_counter()
    finished = 0
    while engine.has_unfinished_requests():
        finished += len(engine.step())
        if finished:  # the batch starts to shrink: the steady part is over
            break
    elapsed = time.perf_counter() - t0
    d = {k: v - start[k] for k, v in engine.stats.snapshot().items()}
    calls = max(1, d["num_steps"])
    engine_run = dict(
        tokens=d["num_generated_tokens"], seconds=elapsed,
        tok_per_s=d["num_generated_tokens"] / elapsed,
        ms_per_decode_step=1e3 * elapsed / max(1, d["num_decode_steps"]),
        jitted_calls=d["num_steps"], decode_steps=d["num_decode_steps"],
        host_ms_per_call=1e3 * d["host_seconds"] / calls,
        host_ms_per_decode_step=1e3 * d["host_seconds"] / max(1, d["num_decode_steps"]),
        wait_ms_per_call=1e3 * d["device_seconds"] / calls,
        dispatch_ms_per_call=1e3 * d["dispatch_seconds"] / calls)
    result["engine_run"] = engine_run
    while engine.has_unfinished_requests():
        engine.step()
    out = args.out or default_out("steady", result["device"])
    write_result(result, out)
    print(f"engine: {engine_run['tok_per_s']:,.0f} tok/s, {engine_run['ms_per_decode_step']:.2f} "
          f"ms per decode step, host {engine_run['host_ms_per_decode_step']:.2f} ms per decode "
          f"step ({engine_run['host_ms_per_call']:.2f} per call)", flush=True)
    if not args.no_ceiling:
        from jpaged.bench.step_ceiling import run_point
        mid = args.context + args.decode_tokens // 2
        ceiling = run_point(model, num_seqs=args.num_seqs, context=mid,
                            steps=engine.config.max_decode_window * 2,
                            block_size=args.block_size)
        ceiling.pop("call_ms", None)
        result["ceiling"] = ceiling
        result["engine_vs_ceiling"] = engine_run["tok_per_s"] / ceiling["tok_per_s"]
        write_result(result, out)
        print(f"ceiling: {ceiling['tok_per_s']:,.0f} tok/s ({ceiling['ms_per_step']:.2f} ms/step, "
              f"roofline {ceiling['roofline_ms']:.2f} ms); engine / ceiling "
              f"{result['engine_vs_ceiling']:.2f}")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
