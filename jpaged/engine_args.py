"""The model and engine flags the scripts share (generate.py, serve.py,
bench_serving.py), and the model and LLM keyword arguments they give.

Host only: nothing here starts jax until ``load_model`` is called.
"""
from __future__ import annotations

import argparse


def add_engine_args(parser: argparse.ArgumentParser, *,
                    max_num_seqs_help: str = "most sequences in one step (every batch-size "
                                             "bucket up to it is compiled at start-up)"):
    """Adds the "model and engine" and "tensor parallelism" groups.

    Returns: (model_group, tp_group), so a script can add its own flags to them.
    """
    from jpaged.config import EngineConfig
    d = EngineConfig()  # every engine default below is EngineConfig's
    m = parser.add_argument_group("model and engine")
    m.add_argument("--model", default=d.model,
                   help="registered name, HF directory, converted directory or .gguf file")
    m.add_argument("--random-weights", action="store_true",
                   help="use random weights of --model's shape (a models.random_model "
                        "preset or HF config); such a model has no tokenizer, so prompts "
                        "must be token ids")
    m.add_argument("--dtype", default=d.dtype, help="float32, bfloat16, float16 or auto")
    m.add_argument("--block-size", type=int, default=d.block_size, help="tokens per KV block")
    m.add_argument("--max-num-seqs", type=int, default=None, help=max_num_seqs_help)
    m.add_argument("--max-model-len", type=int, default=2048,
                   help="longest prompt + output; every prefill bucket up to it is "
                        "compiled at start-up (0: the model's own limit)")
    m.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="most tokens in one prefill step")
    m.add_argument("--num-gpu-blocks", type=int, default=None,
                   help="KV pool size in blocks (default: from --gpu-memory-utilization)")
    m.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization,
                   help="fraction of device memory for weights + KV pool")
    m.add_argument("--swap-space", type=float, default=d.swap_space,
                   help="host swap pool in GiB")
    m.add_argument("--preemption-mode", choices=["recompute", "swap"], default=None,
                   help="how to preempt (default: recompute single sequences, swap groups)")
    m.add_argument("--enable-prefix-caching", action="store_true",
                   help="reuse cached KV blocks of shared prompt prefixes")
    m.add_argument("--seed", type=int, default=d.seed, help="engine seed")
    m.add_argument("--no-async-scheduling", action="store_true",
                   help="wait for each step's tokens before scheduling the next (by default "
                        "the host schedules the next step while the device runs)")
    m.add_argument("--max-decode-window", type=int, default=d.max_decode_window,
                   help="decode steps one jitted call may run, a power of two (1: off); "
                        "windows wait while requests arrive into a batch with room")
    t = parser.add_argument_group("tensor parallelism (README, \"Tensor parallelism\")")
    t.add_argument("--tensor-parallel-size", type=int, default=d.tensor_parallel_size,
                   help="devices the model and KV pool are split over (heads, MLP columns, "
                        "vocabulary); must divide the MLP width; query heads that don't "
                        "split evenly are padded with zero heads")
    return m, t


def load_model(args):
    """--model as LLM takes it: a name or path, or random weights of its shape."""
    if not args.random_weights:
        return args.model
    import models
    from models import load_hf_config
    from jpaged.engine import enable_compilation_cache
    enable_compilation_cache()  # the model's init compiles too
    return models.random_model(load_hf_config(args.model),
                               dtype="bfloat16" if args.dtype == "auto" else args.dtype,
                               seed=args.seed, fast_init=True)


def llm_kwargs(args) -> dict:
    """The EngineConfig fields the flags set (max_num_seqs only when given,
    so EngineConfig's default stands otherwise)."""
    kwargs = dict(dtype=args.dtype, block_size=args.block_size,
                  max_model_len=args.max_model_len or None,
                  max_num_batched_tokens=args.max_num_batched_tokens,
                  num_gpu_blocks=args.num_gpu_blocks,
                  gpu_memory_utilization=args.gpu_memory_utilization,
                  swap_space=args.swap_space, preemption_mode=args.preemption_mode,
                  enable_prefix_caching=args.enable_prefix_caching, seed=args.seed,
                  async_scheduling=not args.no_async_scheduling,
                  max_decode_window=args.max_decode_window,
                  tensor_parallel_size=args.tensor_parallel_size)
    if args.max_num_seqs is not None:
        kwargs["max_num_seqs"] = args.max_num_seqs
    return kwargs
