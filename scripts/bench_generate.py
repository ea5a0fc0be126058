"""End-to-end check and benchmark of the engine on one device.

1. Logits of a random-weight model through the Pallas kernels equal those of
   the pure-jnp reference path (prefill, then decode steps).
2. A batch of random-token prompts through LLM.generate: output tokens/s,
   warm-up time, compile count, host time per step, preemptions; the same
   batch with async scheduling on and off, side by side on one engine.
3. Swapping: blocks moved device -> host -> device come back bit for bit,
   and the batch through a small share of the pool in swap mode finishes
   with swaps counted (its tokens are compared with the full-pool run).
4. The ceiling: the same model alone (jpaged.bench.step_ceiling: decode
   steps in one jitted loop, no scheduler) at the batch's shape, and the
   engine's tokens/s over it.
Writes benchmarks/results/generate-<device>.json (or --out).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import subprocess
import sys
import time

from jpaged.config import EngineConfig


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-shape",
                   help="models.random_model preset (random weights of that shape) or a JSON "
                        "file holding an HF config dict")
    p.add_argument("--dtype", default="bfloat16", help="params and KV dtype")
    p.add_argument("--num-prompts", type=int, default=300, help="requests in the batch")
    p.add_argument("--prompt-len", type=int, default=128, help="tokens per prompt")
    p.add_argument("--max-tokens", type=int, default=128, help="output tokens per request")
    p.add_argument("--max-num-seqs", type=int, default=EngineConfig.max_num_seqs,
                   help="decode batch limit")
    p.add_argument("--max-model-len", type=int, default=1024, help="context limit")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="tokens one step may hold (default: max(max-model-len, 4096))")
    p.add_argument("--max-decode-window", type=int, default=None,
                   help="decode steps per jitted call (default: EngineConfig's)")
    p.add_argument("--block-size", type=int, default=None,
                   help="tokens per KV block (default: EngineConfig's)")
    p.add_argument("--num-gpu-blocks", type=int, default=None,
                   help="KV pool size in blocks, null block included (default: sized from "
                        "EngineConfig's gpu_memory_utilization)")
    p.add_argument("--swap-blocks", type=int, default=600,
                   help="usable blocks in the swap-mode run (3.); 0 skips it")
    p.add_argument("--ceiling", default="auto", metavar="S:C",
                   help="time the model alone at S sequences and context C in this run (4.); "
                        "auto: min(num-prompts, max-num-seqs) sequences at prompt-len + "
                        "max-tokens / 2, the batch's mean context; none skips it")
    p.add_argument("--commit", default=None, help="commit hash to record (default: git)")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/...)")
    args = p.parse_args(argv)
    if args.ceiling == "auto":
        args.ceiling = (min(args.num_prompts, args.max_num_seqs),
                        args.prompt_len + args.max_tokens // 2)
    elif args.ceiling == "none":
        args.ceiling = None
    else:
        try:
            args.ceiling = tuple(int(x) for x in args.ceiling.split(":"))
            assert len(args.ceiling) == 2 and min(args.ceiling) > 0
        except (ValueError, AssertionError):
            p.error(f"--ceiling must be S:C (two positive integers), auto or none; "
                    f"got {args.ceiling!r}")

    import jax
    import numpy as np
    import models
    from jpaged import LLM, SamplingParams
    from jpaged.bench.harness import use_system
    spec = models.load_hf_config(args.model)

    device = jax.devices()[0].device_kind
    result = dict(device=device, command=" ".join(["python"] + sys.argv),
                  commit=args.commit or _git_commit(), jax=jax.__version__,
                  host=platform.node(), model=args.model, dtype=args.dtype,
                  random_weights=True)

    # 1. Pallas path vs reference path, same weights.
    ref = models.random_model(spec, dtype="float32", seed=0, attention_backend="reference",
                              fast_init=True)
    pal = models.random_model(spec, dtype="float32", seed=0, attention_backend="auto",
                              fast_init=True)
    ids = np.random.default_rng(0).integers(0, ref.config.vocab_size, 40).tolist()
    a, b = ref.logits(ids), pal.logits(ids)
    ga, gb = ref.generate_greedy(ids, 16, stop_at_eos=False), pal.generate_greedy(ids, 16, stop_at_eos=False)
    result["pallas_vs_reference"] = dict(
        prefill_max_abs_diff=float(np.max(np.abs(a - b))),
        logit_scale=float(np.max(np.abs(a))),
        greedy_16_equal=ga == gb)
    del ref, pal

    # 2. The engine on a batch of random prompts.
    model = models.random_model(spec, dtype=args.dtype, seed=0, fast_init=True)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, model.config.vocab_size, args.prompt_len).tolist()
               for _ in range(args.num_prompts)]
    sp = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    given = {k: getattr(args, k) for k in ("max_decode_window", "block_size", "num_gpu_blocks")
             if getattr(args, k) is not None}  # (the others: EngineConfig's defaults)
    llm = LLM(model, max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
              max_num_batched_tokens=args.max_num_batched_tokens or max(args.max_model_len, 4096),
              **given)
    t1 = time.perf_counter()
    eng = llm.engine
    runs = {}
    for mode in (True, False, True):  # on, off, on again: the second "on" is reported
        # (use_system zeroes the counters too, all but the compile counters)
        use_system(eng, "jpaged" if mode else "jpaged-sync")
        t = time.perf_counter()
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=sp, use_tqdm=False)
        elapsed = time.perf_counter() - t
        gen = sum(len(o.outputs[0].token_ids) for o in outs)
        st = eng.stats.snapshot()
        runs["async" if mode else "sync"] = dict(
            output_tokens=gen, seconds=elapsed, output_tokens_per_s=gen / elapsed,
            num_steps=st["num_steps"], num_steps_ahead=st["num_steps_ahead"],
            host_ms_per_step=1e3 * st["host_seconds"] / st["num_steps"],
            wait_ms_per_step=1e3 * st["device_seconds"] / st["num_steps"],
            wall_ms_per_step=1e3 * elapsed / st["num_steps"],
            peak_blocks_used=st["peak_blocks_used"], preemptions=eng.stats.num_preemptions,
            tokens=[o.outputs[0].token_ids for o in outs])
    same = sum(a == b for a, b in zip(runs["async"].pop("tokens"), runs["sync"]["tokens"]))
    full_pool_tokens = runs["sync"].pop("tokens")
    result["generate"] = dict(
        num_prompts=args.num_prompts, prompt_len=args.prompt_len, max_tokens=args.max_tokens,
        startup_seconds=t1 - t0, warmup_seconds=eng.stats.warmup_seconds,
        compiles_at_warmup=eng.stats.compiles_at_warmup, num_gpu_blocks=eng.runner.num_gpu_blocks,
        **runs["async"], sync=runs["sync"],
        async_speedup=runs["async"]["output_tokens_per_s"] / runs["sync"]["output_tokens_per_s"],
        requests_with_equal_tokens_async_vs_sync=same,
        note="host_ms_per_step: host work per step; wait_ms_per_step: time the host waited "
             "for device results (with async scheduling the device also runs while the "
             "host works, so wall < host + wait is possible)")
    llm.generate(prompt_token_ids=prompts[:17], sampling_params=SamplingParams(
        temperature=0.8, top_p=0.9, max_tokens=9, seed=3), use_tqdm=False)

    # 3. Swapping on this device.
    if args.swap_blocks:
        result["swap"] = _check_swap(llm, prompts, sp, full_pool_tokens, args.swap_blocks)
    result["generate"]["compiles_after_warmup"] = eng.stats.compiles_after_warmup

    # 4. The model alone at the batch's shape, in this process (the engine's
    # pool freed first).
    if args.ceiling:
        from jpaged.bench.step_ceiling import run_point
        num_seqs, context = args.ceiling
        window = eng.config.max_decode_window
        del llm, eng
        import gc
        gc.collect()
        ceiling = run_point(model, num_seqs=num_seqs, context=context, steps=window)
        ceiling.pop("call_ms", None)
        result["ceiling"] = ceiling
        result["generate"]["vs_ceiling"] = (result["generate"]["output_tokens_per_s"]
                                            / ceiling["tok_per_s"])

    out = args.out or f"benchmarks/results/generate-{device.replace(' ', '_')}.json"
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    if args.ceiling:
        print(f"engine {result['generate']['output_tokens_per_s']:,.0f} tok/s; model alone "
              f"({args.ceiling[0]} seqs at {args.ceiling[1]}, {ceiling['K']} steps a call) "
              f"{ceiling['tok_per_s']:,.0f} tok/s: {result['generate']['vs_ceiling']:.2f}x")


def _check_swap(llm, prompts, sp, full_pool_tokens, num_blocks) -> dict:
    """Round trip of blocks through the host pool (pinned staging where the
    device has it), then the batch in swap mode through num_blocks blocks."""
    import jax
    import numpy as np
    from jpaged.bench.harness import use_system
    eng = llm.engine
    runner = eng.runner
    rng = np.random.default_rng(5)
    n = min(64, runner.num_cpu_blocks, runner.num_gpu_blocks - 1)
    src = rng.choice(np.arange(1, runner.num_gpu_blocks), size=2 * n, replace=False)
    out_blocks, in_blocks = src[:n].tolist(), src[n:].tolist()
    before = [np.asarray(jax.device_get(c[:, out_blocks])) for c in runner.kv_caches]
    t = time.perf_counter()
    runner.swap_out(list(zip(out_blocks, range(n))))
    runner.swap_in(list(zip(range(n), in_blocks)))
    jax.block_until_ready(runner.kv_caches)
    seconds = time.perf_counter() - t
    after = [np.asarray(jax.device_get(c[:, in_blocks])) for c in runner.kv_caches]
    exact = all(np.array_equal(a.view(np.uint8), b.view(np.uint8)) for a, b in zip(before, after))
    nbytes = sum(a.nbytes for a in before)
    res = dict(round_trip_blocks=n, round_trip_bit_exact=bool(exact),
               round_trip_gbytes_per_s=2 * nbytes / seconds / 1e9,
               pinned_host_staging=bool(runner.pool.pinned_host))
    use_system(eng, "jpaged", num_blocks=num_blocks)
    eng.scheduler.config = dataclasses.replace(eng.scheduler.config, preemption_mode="swap")
    t = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=sp, use_tqdm=False)
    elapsed = time.perf_counter() - t
    toks = [o.outputs[0].token_ids for o in outs]
    res.update(usable_blocks=num_blocks, seconds=elapsed,
               all_finished=all(len(t) == sp.max_tokens for t in toks),
               swaps_out=eng.stats.num_swaps_out, swaps_in=eng.stats.num_swaps_in,
               preemptions=eng.stats.num_preemptions,
               requests_with_tokens_equal_to_full_pool=sum(
                   a == b for a, b in zip(toks, full_pool_tokens)),
               num_requests=len(toks),
               note="bf16 random weights: other batch compositions may flip near-tied "
                    "greedy tokens, so equality with the full-pool run is reported, not required")
    use_system(eng, "jpaged")
    return res


def _git_commit():
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True).strip()
    except Exception:
        return None


if __name__ == "__main__":
    main()
