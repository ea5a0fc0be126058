"""End-to-end check and benchmark of the engine on one device.

1. Logits of a random-weight model through the Pallas kernels equal those of
   the pure-jnp reference path (prefill, then decode steps).
2. A batch of random-token prompts through LLM.generate: output tokens/s,
   warm-up time, compile count, host time per step, preemptions.
Writes benchmarks/results/generate-<device>.json (or --out).
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-shape",
                   help="models.random_model preset (random weights of that shape)")
    p.add_argument("--dtype", default="bfloat16", help="params and KV dtype")
    p.add_argument("--num-prompts", type=int, default=300, help="requests in the batch")
    p.add_argument("--prompt-len", type=int, default=128, help="tokens per prompt")
    p.add_argument("--max-tokens", type=int, default=128, help="output tokens per request")
    p.add_argument("--max-num-seqs", type=int, default=256, help="decode batch limit")
    p.add_argument("--max-model-len", type=int, default=1024, help="context limit")
    p.add_argument("--commit", default=None, help="commit hash to record (default: git)")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/...)")
    args = p.parse_args(argv)

    import jax
    import numpy as np
    import models
    from jpaged import LLM, SamplingParams

    device = jax.devices()[0].device_kind
    result = dict(device=device, command=" ".join(["python"] + sys.argv),
                  commit=args.commit or _git_commit(), jax=jax.__version__,
                  host=platform.node(), model=args.model, dtype=args.dtype,
                  random_weights=True)

    # 1. Pallas path vs reference path, same weights.
    ref = models.random_model(args.model, dtype="float32", seed=0, attention_backend="reference")
    pal = models.random_model(args.model, dtype="float32", seed=0, attention_backend="auto")
    ids = np.random.default_rng(0).integers(0, ref.config.vocab_size, 40).tolist()
    a, b = ref.logits(ids), pal.logits(ids)
    ga, gb = ref.generate_greedy(ids, 16, stop_at_eos=False), pal.generate_greedy(ids, 16, stop_at_eos=False)
    result["pallas_vs_reference"] = dict(
        prefill_max_abs_diff=float(np.max(np.abs(a - b))),
        logit_scale=float(np.max(np.abs(a))),
        greedy_16_equal=ga == gb)
    del ref, pal

    # 2. The engine on a batch of random prompts.
    model = models.random_model(args.model, dtype=args.dtype, seed=0)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, model.config.vocab_size, args.prompt_len).tolist()
               for _ in range(args.num_prompts)]
    sp = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    llm = LLM(model, max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
              max_num_batched_tokens=max(args.max_model_len, 4096))
    t1 = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=sp, use_tqdm=False)
    t2 = time.perf_counter()
    eng = llm.engine
    gen = sum(len(o.outputs[0].token_ids) for o in outs)
    st = eng.stats
    result["generate"] = dict(
        num_prompts=args.num_prompts, prompt_len=args.prompt_len, max_tokens=args.max_tokens,
        output_tokens=gen, seconds=t2 - t1, output_tokens_per_s=gen / (t2 - t1),
        startup_seconds=t1 - t0, warmup_seconds=eng.runner.warmup_seconds,
        compiles_at_warmup=eng.runner.num_traces, num_gpu_blocks=eng.runner.num_gpu_blocks,
        num_steps=st["num_steps"], host_ms_per_step=1e3 * st["host_seconds"] / st["num_steps"],
        device_ms_per_step=1e3 * st["device_seconds"] / st["num_steps"],
        peak_blocks_used=st["peak_blocks_used"], preemptions=eng.scheduler.num_preemptions)
    traces = eng.runner.num_traces
    llm.generate(prompt_token_ids=prompts[:17], sampling_params=SamplingParams(
        temperature=0.8, top_p=0.9, max_tokens=9, seed=3), use_tqdm=False)
    result["generate"]["compiles_after_warmup"] = eng.runner.num_traces - traces

    out = args.out or f"benchmarks/results/generate-{device.replace(' ', '_')}.json"
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


def _git_commit():
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True).strip()
    except Exception:
        return None


if __name__ == "__main__":
    main()
