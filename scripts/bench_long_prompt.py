"""A long prompt beside running decodes (chunked prefill, issue 17).

S requests (prompts of C random tokens) decode together; the script times
their time per output token (TPOT: wall seconds over the tokens each
generated, averaged over the S) for --base-seconds while nothing else runs,
then adds one prompt of L tokens and times their TPOT again from then until
the long prompt's first token (its TTFT). With chunked prefill (the
default) the long prompt runs in chunks of the token budget beside one
decode token per running sequence; with --no-enable-chunked-prefill (the
budget then must hold L) its prefill is one step that stalls them. The
ratio of the two TPOTs is the target (issue 17: within 2x at L = 32k and S
= 64 on the H200). Prefill tokens/s of the long prompt are reported too.
--long-prefill-thresholds measures it again for each cap on the long
prompt's chunk (long_prefill_token_threshold), on the same engine, and
--decode-windows-between-chunks for each decode window run between its
chunks (decode_window_between_chunks); every pair of the two lists.

Writes benchmarks/results/long-prompt-<device>.json (or --out).
"""
from __future__ import annotations

import argparse
import contextlib
import time

from jpaged.sequence import PLACEHOLDER_TOKEN_ID


def _generated(engine, ids) -> list[int]:
    """Tokens each request has generated and the host has seen (tokens of a
    step still on the device, placeholders on the host, do not count)."""
    out = []
    for rid in ids:
        g = engine.get_request(rid)
        if g is None:
            out.append(-1)
            continue
        out_ids = g.get_seqs()[0].output_token_ids
        n = len(out_ids)
        while n and out_ids[n - 1] == PLACEHOLDER_TOKEN_ID:
            n -= 1
        out.append(n)
    return out


def _split(engine, before: dict) -> dict:
    """Per-step host, device-wait and dispatch milliseconds since `before`
    (an EngineStats snapshot), and the steps dispatched ahead."""
    now = engine.stats.snapshot()
    steps = max(1, now["num_steps"] - before["num_steps"])
    out = {f"{k}_ms_per_step": 1e3 * (now[f"{k}_seconds"] - before[f"{k}_seconds"]) / steps
           for k in ("host", "device", "dispatch")}
    out["steps_dispatched_ahead"] = now["num_steps_ahead"] - before["num_steps_ahead"]
    return out


def _tpot(engine, ids, until, min_seconds=0.0, max_tokens=None, profile=None):
    """Steps the engine until `until()` holds and min_seconds passed (or
    each of ids generated max_tokens); returns (mean seconds per output
    token of ids, seconds, steps, the longest step's seconds, the engine's
    per-step split of the time)."""
    before = _generated(engine, ids)
    counters = engine.stats.snapshot()
    t0 = time.perf_counter()
    steps, longest = 0, 0.0
    with profile or contextlib.nullcontext():
        while not until() or time.perf_counter() - t0 < min_seconds:
            if max_tokens is not None and min(
                    a - b for a, b in zip(_generated(engine, ids), before)) >= max_tokens:
                break
            t = time.perf_counter()
            engine.step()
            longest = max(longest, time.perf_counter() - t)
            steps += 1
    elapsed = time.perf_counter() - t0
    split = _split(engine, counters)
    after = _generated(engine, ids)
    if min(after) < 0:
        raise SystemExit("a decoding request finished during the measurement: raise "
                         "--max-model-len or lower --context")
    tokens = [a - b for a, b in zip(after, before)]
    if min(tokens) < 1:
        raise SystemExit("a decoding request generated no token during the measurement")
    return elapsed / (sum(tokens) / len(tokens)), elapsed, steps, longest, split


def _measure(engine, args, rng, L: int, profile=None) -> dict:
    """One measurement on the idle engine: the S decodes alone, then beside
    the long prompt until its first token. Returns its result fields."""
    from jpaged import SamplingParams
    max_len = engine.config.max_model_len
    vocab = engine.model.config.vocab_size
    sp = SamplingParams(temperature=0.0, max_tokens=max_len - args.context, ignore_eos=True)
    ids = [str(i) for i in range(args.num_seqs)]
    for rid in ids:
        engine.add_request(rid, None, sp, prompt_token_ids=rng.integers(
            0, vocab, args.context).tolist())
    while min(_generated(engine, ids)) < 1:
        engine.step()
    # (the alone part leaves the decodes room for the long prompt's prefill:
    # at most a third of what they may still generate, less the two windows
    # it may run past its cap: the one it stops after and the one ahead)
    room = sp.max_tokens - max(_generated(engine, ids))
    cap = max(1, room // 3 - 2 * engine.config.max_decode_window)
    base, base_s, base_steps, base_longest, base_split = _tpot(
        engine, ids, lambda: True, args.base_seconds, cap)
    engine.add_request("long", None, SamplingParams(temperature=0.0, max_tokens=1),
                       prompt_token_ids=rng.integers(0, vocab, L).tolist())
    prefill_tokens = engine.stats.num_prefill_tokens

    def long_done():  # its one token reached the host: it finished
        return engine.get_request("long") is None
    during, ttft, steps, longest, split = _tpot(engine, ids, long_done, profile=profile)
    prefilled = engine.stats.num_prefill_tokens - prefill_tokens
    engine.abort_request(ids)
    while engine.has_unfinished_requests():
        engine.step()
    return dict(long_prefill_token_threshold=engine.config.long_prefill_token_threshold,
                decode_window_between_chunks=engine.config.decode_window_between_chunks,
                tpot_alone_ms=1e3 * base, steps_alone=base_steps, seconds_alone=base_s,
                longest_step_ms_alone=1e3 * base_longest,
                tpot_during_ms=1e3 * during, steps_during=steps, long_prompt_ttft_s=ttft,
                longest_step_ms_during=1e3 * longest,
                long_prompt_prefill_tok_per_s=prefilled / ttft, tpot_ratio=during / base,
                **{f"{k}_alone": v for k, v in base_split.items()},
                **{f"{k}_during": v for k, v in split.items()})


def main(argv=None):
    from jpaged.bench.harness import (HostProfile, add_engine_args, add_model_args,
                                      add_output_args, default_out, engine_from_args,
                                      parse_list, result_header, write_result)
    from models import load_hf_config
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_engine_args(p, kv_cache_gib_default=0.0)
    add_output_args(p, "long-prompt")
    p.add_argument("--num-seqs", type=int, default=64, help="requests decoding (S)")
    p.add_argument("--context", type=int, default=512, help="their prompt tokens (C)")
    p.add_argument("--long-prompt", type=int, default=None,
                   help="tokens of the long prompt (L; default max_model_len - 8)")
    p.add_argument("--base-seconds", type=float, default=3.0,
                   help="how long the decodes are timed alone")
    p.add_argument("--long-prefill-thresholds", default=None,
                   help="comma list of long_prefill_token_threshold values, measured one "
                        "after another on the same engine (default: "
                        "--long-prefill-token-threshold alone); the result's top-level "
                        "fields are the first's, \"runs\" holds them all")
    p.add_argument("--decode-windows-between-chunks", default=None,
                   help="comma list of decode_window_between_chunks values, each measured "
                        "with each threshold (default: --decode-window-between-chunks alone)")
    p.add_argument("--profile-host", default=None, metavar="PATH",
                   help="cProfile the steps beside the long prompt (every run) and write "
                        "the tables to PATH")
    args = p.parse_args(argv)
    import numpy as np
    result = result_header("scripts/bench_long_prompt.py", argv)
    thresholds = (parse_list(args.long_prefill_thresholds, kind=int)
                  if args.long_prefill_thresholds else [args.long_prefill_token_threshold])
    if any(t < 0 for t in thresholds) or (any(thresholds) and not args.enable_chunked_prefill):
        raise SystemExit("--long-prefill-thresholds: ints >= 0, and > 0 only with chunked prefill")
    windows = (parse_list(args.decode_windows_between_chunks, kind=int)
               if args.decode_windows_between_chunks else [args.decode_window_between_chunks])
    model, engine, info = engine_from_args(args, load_hf_config(args.model), freeze=argv is None)
    max_len = engine.config.max_model_len
    L = args.long_prompt or max_len - 8
    if not 0 < L < max_len:
        raise SystemExit(f"--long-prompt must be in [1, {max_len})")
    rng = np.random.default_rng(0)
    runs = []
    profile = HostProfile(args.profile_host)
    for t in thresholds:
        for w in windows:  # (use_block_manager checks w)
            engine.use_block_manager(long_prefill_token_threshold=t, decode_window_between_chunks=w)
            runs.append(_measure(engine, args, rng, L, profile))
    profile.write()
    info["compiles_after_warmup"] = engine.stats.compiles_after_warmup
    result.update(model=args.model, dtype=args.dtype, random_weights=True, num_seqs=args.num_seqs,
                  context=args.context, long_prompt=L, engine=info, **runs[0], runs=runs)
    out = args.out or default_out("long-prompt", result["device"])
    write_result(result, out)
    for r in runs:
        print(f"S={args.num_seqs} decoding at {args.context}, a {L}-token prompt, chunked "
              f"prefill {'on' if engine.config.enable_chunked_prefill else 'off'} (budget "
              f"{engine.config.max_num_batched_tokens}, chunks of at most "
              f"{r['long_prefill_token_threshold'] or 'the budget'}, decode windows of "
              f"{r['decode_window_between_chunks']} between them): TPOT "
              f"{r['tpot_alone_ms']:.2f} ms alone, {r['tpot_during_ms']:.2f} ms during its "
              f"prefill ({r['tpot_ratio']:.2f}x; longest step {r['longest_step_ms_alone']:.1f} "
              f"ms alone, {r['longest_step_ms_during']:.1f} during); its TTFT "
              f"{r['long_prompt_ttft_s']:.2f} s ({r['long_prompt_prefill_tok_per_s']:,.0f} "
              f"prefill tok/s); per step alone / during: host {r['host_ms_per_step_alone']:.2f}"
              f" / {r['host_ms_per_step_during']:.2f} ms, waiting for the device "
              f"{r['device_ms_per_step_alone']:.2f} / {r['device_ms_per_step_during']:.2f}")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
