"""Batch generation from the command line.

Examples:
  python scripts/generate.py --prompt "The capital of France is" --max-tokens 16
  python scripts/generate.py --prompts-file prompts.txt --output out.jsonl
  cat prompts.jsonl | python scripts/generate.py --stdin --temperature 0.8 --n 2
  python scripts/generate.py --prompt "Hello" --tensor-parallel-size 2   # 2 devices

Several hosts (run on every host, process ids 0 .. N-1; README, "Tensor parallelism"):
  python scripts/generate.py --prompt "Hello" --tensor-parallel-size 16 \
      --coordinator-address host0:1234 --num-processes 2 --process-id 0
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("prompts (any mix; at least one)")
    src.add_argument("--prompt", action="append", default=[],
                     help="a prompt (repeat the flag for several)")
    src.add_argument("--prompts-file", help="a text file with one prompt per line, "
                     "or a .jsonl file with {'prompt': ...} or {'prompt_token_ids': [...]} "
                     "per line")
    src.add_argument("--stdin", action="store_true",
                     help="read prompts from standard input (text lines or JSONL)")
    src.add_argument("--chat", action="store_true",
                     help="wrap each prompt as a user message in the model's chat template")
    m = p.add_argument_group("model and engine")
    m.add_argument("--model", default="smollm2-135m",
                   help="registered name, HF directory, converted directory or .gguf file")
    m.add_argument("--random-weights", action="store_true",
                   help="use random weights of --model's shape (a models.random_model "
                        "preset or HF config); prompts must then be token ids or are "
                        "random, see --num-random-prompts")
    m.add_argument("--num-random-prompts", type=int, default=0,
                   help="with --random-weights: generate this many random token prompts")
    m.add_argument("--random-prompt-len", type=int, default=128,
                   help="length of each random prompt")
    m.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto")
    m.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    m.add_argument("--max-num-seqs", type=int, default=None,
                   help="most sequences in one step (default: the number of sequences "
                        "asked for, rounded up to a power of two, at most 256; every "
                        "batch-size bucket up to it is compiled at start-up)")
    m.add_argument("--max-model-len", type=int, default=2048,
                   help="longest prompt + output; every prefill bucket up to it is "
                        "compiled at start-up (0: the model's own limit)")
    m.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="most tokens in one prefill step")
    m.add_argument("--num-gpu-blocks", type=int, default=None,
                   help="KV pool size in blocks (default: from --gpu-memory-utilization)")
    m.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of device memory for weights + KV pool")
    m.add_argument("--swap-space", type=float, default=4.0,
                   help="host swap pool in GiB")
    m.add_argument("--preemption-mode", choices=["recompute", "swap"], default=None,
                   help="how to preempt (default: recompute single sequences, swap groups)")
    m.add_argument("--enable-prefix-caching", action="store_true",
                   help="reuse cached KV blocks of shared prompt prefixes")
    m.add_argument("--seed", type=int, default=0, help="engine seed")
    m.add_argument("--no-async-scheduling", action="store_true",
                   help="wait for each step's tokens before scheduling the next (by default "
                        "the host schedules the next step while the device runs)")
    t = p.add_argument_group("tensor parallelism (README, \"Tensor parallelism\")")
    t.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="devices the model and KV pool are split over (heads, MLP columns, "
                        "vocabulary); must divide the MLP width; query heads that don't "
                        "split evenly are padded with zero heads")
    t.add_argument("--coordinator-address", default=None,
                   help="multi-host: host:port of process 0, for jax.distributed.initialize "
                        "(or JAX_COORDINATOR_ADDRESS); a single host needs none of these")
    t.add_argument("--num-processes", type=int, default=None,
                   help="multi-host: number of processes, one per host (or JAX_NUM_PROCESSES)")
    t.add_argument("--process-id", type=int, default=None,
                   help="multi-host: this process's id in [0, num_processes) "
                        "(or JAX_PROCESS_ID); only process 0 writes the output")
    s = p.add_argument_group("sampling")
    s.add_argument("--max-tokens", type=int, default=64, help="most new tokens per output")
    s.add_argument("--min-tokens", type=int, default=0, help="fewest new tokens before stopping")
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    s.add_argument("--top-k", type=int, default=-1, help="keep the k best tokens (-1 off)")
    s.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p * best")
    s.add_argument("--n", type=int, default=1, help="outputs per prompt")
    s.add_argument("--best-of", type=int, default=None, help="candidates per prompt (>= n)")
    s.add_argument("--beam-width", type=int, default=0,
                   help="beam search with this width (sets use_beam_search, best_of)")
    s.add_argument("--length-penalty", type=float, default=1.0, help="beam search length penalty")
    s.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI-style presence penalty")
    s.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI-style frequency penalty")
    s.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL-style repetition penalty")
    s.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    s.add_argument("--stop-token-id", type=int, action="append", default=None,
                   help="stop token id (repeatable)")
    s.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS")
    s.add_argument("--logprobs", type=int, default=None, help="top logprobs per output token")
    s.add_argument("--sampling-seed", type=int, default=None, help="per-request seed")
    o = p.add_argument_group("output")
    o.add_argument("--output", help="write JSONL here (default: standard output)")
    o.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p.parse_args(argv)


def read_prompts(args):
    lines = []
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            lines += f.read().splitlines()
    if args.stdin:
        lines += sys.stdin.read().splitlines()
    prompts = list(args.prompt)
    for line in lines:
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            rec = json.loads(line)
            prompts.append(rec["prompt_token_ids"] if "prompt_token_ids" in rec else rec["prompt"])
        else:
            prompts.append(line)
    return prompts


def main(argv=None):
    args = parse_args(argv)
    distributed = bool(args.coordinator_address or args.num_processes is not None
                       or args.process_id is not None
                       or os.environ.get("JAX_COORDINATOR_ADDRESS"))
    if distributed:  # before anything starts jax's backend
        from jpaged.parallel import initialize_distributed
        initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    import numpy as np
    from jpaged import LLM, SamplingParams
    prompts = read_prompts(args)
    model = args.model
    if args.random_weights:
        import models
        from jpaged.benchmark import load_hf_config  # a preset name or an HF config .json
        from jpaged.engine import enable_compilation_cache
        enable_compilation_cache()  # the model's init compiles too
        model = models.random_model(load_hf_config(args.model),
                                    dtype="bfloat16" if args.dtype == "auto" else args.dtype,
                                    seed=args.seed, fast_init=True)
        rng = np.random.default_rng(args.seed)
        vocab = model.config.vocab_size
        prompts += [rng.integers(0, vocab, args.random_prompt_len).tolist()
                    for _ in range(args.num_random_prompts)]
    if not prompts:
        sys.exit("no prompts: give --prompt, --prompts-file or --stdin")
    beam = args.beam_width > 0
    sp = SamplingParams(
        n=args.n, best_of=args.beam_width if beam else args.best_of,
        temperature=0.0 if beam else args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, seed=args.sampling_seed, use_beam_search=beam,
        length_penalty=args.length_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, repetition_penalty=args.repetition_penalty,
        stop=args.stop, stop_token_ids=args.stop_token_id, ignore_eos=args.ignore_eos,
        max_tokens=args.max_tokens, min_tokens=args.min_tokens, logprobs=args.logprobs)
    max_num_seqs = args.max_num_seqs
    if max_num_seqs is None:
        wanted = len(prompts) * max(args.n, args.best_of or 1, args.beam_width)
        max_num_seqs = min(256, 1 << max(0, wanted - 1).bit_length())
    t0 = time.perf_counter()
    llm = LLM(model, dtype=args.dtype, block_size=args.block_size,
              max_num_seqs=max_num_seqs, max_model_len=args.max_model_len or None,
              max_num_batched_tokens=args.max_num_batched_tokens,
              num_gpu_blocks=args.num_gpu_blocks,
              gpu_memory_utilization=args.gpu_memory_utilization,
              swap_space=args.swap_space, preemption_mode=args.preemption_mode,
              enable_prefix_caching=args.enable_prefix_caching, seed=args.seed,
              async_scheduling=not args.no_async_scheduling,
              tensor_parallel_size=args.tensor_parallel_size,
              use_tqdm_warmup=not args.no_progress)
    t_ready = time.perf_counter()
    traces_at_warmup = llm.engine.runner.num_traces
    if args.chat:
        outs = [llm.chat([{"role": "user", "content": p}], sp, use_tqdm=False)[0]
                if isinstance(p, str) else llm.generate([p], sp, use_tqdm=False)[0]
                for p in prompts]
    else:
        outs = llm.generate(prompts, sp, use_tqdm=not args.no_progress)
    t_done = time.perf_counter()
    if distributed:
        import jax
        if jax.process_index() != 0:  # every process ran the same schedule
            return
    sink = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    for out in outs:
        rec = {"request_id": out.request_id, "prompt": out.prompt,
               "error": out.error,
               "outputs": [{"text": c.text, "token_ids": c.token_ids,
                            "cumulative_logprob": c.cumulative_logprob,
                            "finish_reason": c.finish_reason} for c in out.outputs]}
        sink.write(json.dumps(rec, ensure_ascii=False) + "\n")
    if sink is not sys.stdout:
        sink.close()
    eng = llm.engine
    st = eng.stats
    gen = sum(len(c.token_ids) for o in outs for c in o.outputs)
    elapsed = t_done - t_ready
    pool = eng.runner.num_gpu_blocks - 1
    steps = max(1, st["num_steps"])
    print(f"\nrequests: {len(outs)} ({sum(o.error is not None for o in outs)} rejected) | "
          f"generated tokens: {gen} | {gen / max(elapsed, 1e-9):.1f} tokens/s over {elapsed:.2f} s | "
          f"start-up {t_ready - t0:.1f} s (warm-up {eng.runner.warmup_seconds or 0:.1f} s, "
          f"{traces_at_warmup} compiles, {eng.runner.num_traces - traces_at_warmup} after) | "
          f"{st['num_steps']} steps ({st['num_steps_ahead']} dispatched ahead): host "
          f"{1e3 * st['host_seconds'] / steps:.2f} ms/step, waiting for the device "
          f"{1e3 * st['device_seconds'] / steps:.2f} ms/step | peak KV usage "
          f"{st['peak_blocks_used']}/{pool} blocks "
          f"({100 * st['peak_blocks_used'] / max(pool, 1):.1f}%) | preemptions "
          f"{eng.scheduler.num_preemptions}", file=sys.stderr)


if __name__ == "__main__":
    main()
