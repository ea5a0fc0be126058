"""Tensor parallelism check: greedy tokens at tensor_parallel_size N vs 1.

For each model (a models.random_model preset or a JSON file with an HF
config; random weights, seed 0), runs the same seeded prompts (random token
ids, mixed lengths, the first one the longest) through LLMEngine at every
size in --tp, all in this process (tp N uses the first N devices), and
compares each with tp 1: requests whose tokens are all equal, the first
position where each request's tokens differ, and the max |difference| of
the first prompt's prefill logits (one extra forward pass per size).

Random weights give nearly flat logits, so in bfloat16 a greedy tie can
break differently at tp 2 from the all-reduce's summation order alone. The
default is therefore float32 with "highest" matmul precision (no TF32);
the precision used is recorded. Engines skip warm-up: only the buckets the
prompts use are compiled.

Writes benchmarks/results/tp-check-<device>.json (or --out), rewritten
after every run so a stopped job leaves what it finished; prints a table
last. Exit status 0 whether or not the tokens agree (the JSON says); 1 if
a run failed or a model cannot be split that many ways (jpaged.parallel's
rules: the size must divide the MLP width, and for OPT the heads; Llama
query heads are padded with zero heads where needed; the JSON holds the
reason, and a model no size but 1 can split is skipped), 2 for bad flags.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
import traceback

import numpy as np

PRECISIONS = ("highest", "high", "default")


def parse_args(argv):
    from jpaged.bench.harness import parse_list, positive_int
    from jpaged.config import EngineConfig
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-shape,llama-1.1b",
                   help="comma-separated models.random_model presets or JSON files with an HF "
                        "config")
    p.add_argument("--dtype", default="float32", help="params and KV cache dtype")
    p.add_argument("--matmul-precision", default="highest", choices=PRECISIONS,
                   help="jax_default_matmul_precision: highest = true float32 matmuls (no "
                        "TF32); default leaves jax's setting")
    p.add_argument("--tp", default="1,2",
                   help="comma-separated tensor-parallel sizes; must include 1 (the reference)")
    p.add_argument("--num-prompts", type=positive_int, default=8, help="prompts per run")
    p.add_argument("--min-prompt-len", type=positive_int, default=5, help="shortest prompt")
    p.add_argument("--max-prompt-len", type=positive_int, default=200,
                   help="longest prompt (the first one); lengths are spread evenly between")
    p.add_argument("--max-tokens", type=positive_int, default=32,
                   help="greedy output tokens per prompt (ignore_eos)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts' token ids")
    p.add_argument("--block-size", type=positive_int, default=EngineConfig.block_size,
                   help="tokens per KV block")
    p.add_argument("--max-num-seqs", type=positive_int, default=8, help="sequences per step")
    p.add_argument("--max-model-len", type=positive_int, default=512, help="context limit")
    p.add_argument("--max-num-batched-tokens", type=positive_int, default=None,
                   help="prefill token budget per step (default: EngineConfig's for "
                        "--max-num-seqs and --max-model-len)")
    p.add_argument("--num-gpu-blocks", type=positive_int, default=None,
                   help="KV pool in blocks (default: every prompt's whole sequence, no "
                        "preemption)")
    p.add_argument("--no-logits", action="store_true",
                   help="skip the prefill-logits comparison (saves one compile per size)")
    p.add_argument("--out", default=None,
                   help="result JSON path (default benchmarks/results/tp-check-<device>.json)")
    args = p.parse_args(argv)
    try:
        args.model = parse_list(args.model)
        args.tp = parse_list(args.tp, kind=int)
    except ValueError as e:
        p.error(f"--model / --tp: {e}")
    if any(t < 1 for t in args.tp) or 1 not in args.tp:
        p.error(f"--tp must hold sizes >= 1 and include 1 (the reference), got {args.tp}")
    args.tp = sorted(set(args.tp))
    if args.max_num_batched_tokens is None:  # (the result JSON names the budget run)
        args.max_num_batched_tokens = EngineConfig(
            max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len).get_scheduler_config(
                args.max_model_len).max_num_batched_tokens
    if args.min_prompt_len > args.max_prompt_len:
        p.error(f"--min-prompt-len ({args.min_prompt_len}) must be <= --max-prompt-len "
                f"({args.max_prompt_len})")
    if args.max_prompt_len + args.max_tokens > args.max_model_len:
        p.error(f"--max-prompt-len + --max-tokens ({args.max_prompt_len + args.max_tokens}) "
                f"must fit in --max-model-len ({args.max_model_len})")
    return args


def make_prompts(num: int, min_len: int, max_len: int, vocab_size: int, seed: int):
    """Token-id lists of lengths spread evenly from max_len down to min_len."""
    rng = np.random.default_rng(seed)
    lens = np.linspace(max_len, min_len, num).round().astype(int)
    return [rng.integers(3, vocab_size, n).tolist() for n in lens]


def split_errors(hf_config: dict, tps) -> dict:
    """{tp: why the model cannot be split tp ways} for the sizes that fail
    jpaged.parallel's divisibility rules (checked before any weights exist)."""
    import models
    from jpaged import parallel
    family = models.ARCHITECTURES[models.architecture_of(hf_config)]
    config = family.config_cls.from_hf(hf_config)
    errors = {}
    for tp in tps:
        try:
            parallel.check_divisible(config, tp)
        except ValueError as e:
            errors[tp] = f"ValueError: {e}"
    return errors


def run_one(model, tp: int, prompts, args) -> dict:
    """Greedy tokens (and the first prompt's prefill logits) at one size."""
    import jax
    from jpaged import EngineConfig, SamplingParams
    from jpaged.engine import LLMEngine
    t0 = time.perf_counter()
    blocks = args.num_gpu_blocks or 1 + sum(
        -(-(len(p) + args.max_tokens) // args.block_size) for p in prompts)
    config = EngineConfig(model="random", block_size=args.block_size,
                          max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                          max_num_batched_tokens=args.max_num_batched_tokens,
                          num_gpu_blocks=blocks, swap_space=0.0, tensor_parallel_size=tp)
    engine = LLMEngine(config, model=model, warm_up=False, progress=False)
    sp = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), None, sp, prompt_token_ids=p)
    engine.clear_arrivals()  # an offline batch
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            done[out.request_id] = out
    errors = [o.error for o in done.values() if o.error is not None]
    if errors:
        raise RuntimeError(f"tp {tp}: a request failed: {errors[0]}")
    tokens = [list(done[str(i)].outputs[0].token_ids) for i in range(len(prompts))]
    res = dict(tensor_parallel_size=tp, tokens=tokens,
               num_preemptions=engine.stats.num_preemptions,
               kv_pool_devices=len(engine.runner.kv_caches[0].sharding.device_set))
    logits = None
    if not args.no_logits:
        # runner.model is the sharded twin at tp > 1: the same forward the engine runs
        logits = engine.runner.model.logits(prompts[0], block_size=args.block_size)
        res["prefill_logits_max_abs"] = float(np.abs(logits).max())
    res["compiles"] = engine.stats.num_compiles
    jax.block_until_ready(engine.runner.kv_caches)
    res["seconds"] = time.perf_counter() - t0
    del engine
    gc.collect()
    return res, logits


def compare(run: dict, ref: dict, logits, ref_logits) -> dict:
    """run vs the tp 1 reference: equal requests, first divergence, logits."""
    first = []
    for a, b in zip(run["tokens"], ref["tokens"]):
        diff = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
        first.append(diff[0] if diff else (None if len(a) == len(b) else min(len(a), len(b))))
    out = dict(num_requests=len(first), num_equal=sum(f is None for f in first),
               first_divergence=first)
    out["all_equal"] = out["num_equal"] == out["num_requests"]
    if logits is not None and ref_logits is not None:
        out["prefill_logits_max_abs_diff"] = float(np.abs(logits - ref_logits).max())
        out["prefill_argmax_equal_frac"] = float(
            np.mean(logits.argmax(-1) == ref_logits.argmax(-1)))
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax
    if args.matmul_precision != "default":
        jax.config.update("jax_default_matmul_precision", args.matmul_precision)
    import models
    from jpaged.bench.harness import (default_out, format_table, result_header,
                                      write_result)
    from models import load_hf_config
    if max(args.tp) > len(jax.devices()):
        raise ValueError(f"--tp {max(args.tp)} needs that many devices, but jax sees "
                         f"{len(jax.devices())}")
    hf_configs = {m: load_hf_config(m) for m in args.model}  # bad names fail before any run
    result = result_header("scripts/check_tp.py", argv)
    result.update(devices=[d.device_kind for d in jax.devices()], dtype=args.dtype,
                  matmul_precision=jax.config.jax_default_matmul_precision or "default",
                  random_weights=True,
                  prompts=dict(num_prompts=args.num_prompts, max_tokens=args.max_tokens,
                               min_prompt_len=args.min_prompt_len,
                               max_prompt_len=args.max_prompt_len, seed=args.seed),
                  engine=dict(block_size=args.block_size, max_num_seqs=args.max_num_seqs,
                              max_model_len=args.max_model_len,
                              max_num_batched_tokens=args.max_num_batched_tokens,
                              warm_up=False),
                  models={})
    out = args.out or default_out("tp-check", result["device"])
    failed = False
    for name, hf_config in hf_configs.items():
        entry = result["models"][name] = dict(runs={})
        cannot = split_errors(hf_config, args.tp)
        for tp, error in cannot.items():
            failed = True
            entry["runs"][str(tp)] = dict(tensor_parallel_size=tp, error=error)
        if cannot and len(cannot) == len(args.tp) - 1:  # nothing to compare tp 1 with
            entry["skipped"] = "no tensor-parallel size other than 1 can split this model"
            write_result(result, out)
            continue
        try:
            t0 = time.perf_counter()
            model = models.random_model(hf_config, dtype=args.dtype, seed=0, fast_init=True)
            jax.block_until_ready(model.params)
            entry["init_seconds"] = time.perf_counter() - t0
        except Exception as e:  # recorded; the other models still run
            failed = True
            entry["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
            write_result(result, out)
            continue
        c = model.config
        entry["config"] = dict(num_layers=c.num_layers, hidden_size=c.hidden_size,
                               num_heads=c.num_heads, num_kv_heads=c.num_kv_heads,
                               vocab_size=c.vocab_size)
        prompts = make_prompts(args.num_prompts, args.min_prompt_len, args.max_prompt_len,
                               c.vocab_size, args.seed)
        entry["prompt_lens"] = [len(p) for p in prompts]
        ref = ref_logits = None
        for tp in [t for t in args.tp if t not in cannot]:
            try:
                run, logits = run_one(model, tp, prompts, args)
            except Exception as e:
                failed = True
                entry["runs"][str(tp)] = dict(tensor_parallel_size=tp,
                                              error=f"{type(e).__name__}: {e}")
                traceback.print_exc()
                write_result(result, out)
                continue
            if tp == 1:
                ref, ref_logits = run, logits
            elif ref is not None:
                run["vs_tp1"] = compare(run, ref, logits, ref_logits)
            entry["runs"][str(tp)] = run
            write_result(result, out)
            print(f"{name} tp {tp}: {run['seconds']:.1f} s, {run['compiles']} compiles",
                  file=sys.stderr, flush=True)
        del model
        gc.collect()
    checks = [r["vs_tp1"]["all_equal"] for m in result["models"].values()
              for r in m["runs"].values() if "vs_tp1" in r]
    result["all_equal"] = bool(checks) and all(checks) and not failed
    write_result(result, out)

    rows = []
    for name, m in result["models"].items():
        for tp, r in sorted(m["runs"].items(), key=lambda kv: int(kv[0])):
            v = r.get("vs_tp1", {})
            firsts = [f for f in v.get("first_divergence", []) if f is not None]
            rows.append(dict(model=name, tp=tp, status="error" if "error" in r else "ok",
                             equal=f"{v['num_equal']}/{v['num_requests']}" if v else None,
                             first=str(min(firsts)) if firsts else None,
                             diff=v.get("prefill_logits_max_abs_diff"),
                             scale=r.get("prefill_logits_max_abs"), seconds=r.get("seconds")))
    print(f"\n{result['device']} x{len(jax.devices())}  {args.dtype}, matmul precision "
          f"{result['matmul_precision']}  {args.num_prompts} prompts "
          f"({args.min_prompt_len}..{args.max_prompt_len} tokens) x {args.max_tokens} greedy "
          "tokens, random weights")
    print(format_table(rows, [
        ("model", "model", ""), ("tp", "tp", ""), ("status", "", ""),
        ("equal", "reqs equal to tp 1", ""), ("first", "first diff at", ""),
        ("diff", "logits max|diff|", ".2e"), ("scale", "logits max|x|", ".2f"),
        ("seconds", "s", ".1f")]))
    for name, m in result["models"].items():
        for r in [m] + list(m["runs"].values()):
            if "error" in r:
                print(f"  {name}: {r['error']}")
        if "skipped" in m:
            print(f"  {name}: skipped: {m['skipped']}")
    print(f"all equal: {result['all_equal']}\nwrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
