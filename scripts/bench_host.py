"""Host work per engine step at many running sequences.

Runs a tiny random model (so device time is small) with --num-seqs sequences
decoding together and reports the engine's host time per step (scheduling,
input building, bookkeeping), plus a cProfile of the hottest host functions.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--num-seqs", type=int, default=256, help="sequences decoding together")
    p.add_argument("--prompt-len", type=int, default=32, help="tokens per prompt")
    p.add_argument("--max-tokens", type=int, default=64, help="decode steps")
    p.add_argument("--top", type=int, default=15, help="profile rows to print")
    args = p.parse_args(argv)
    import numpy as np
    import models
    from jpaged import LLM, EngineConfig, SamplingParams
    m = models.random_model({"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
                             "intermediate_size": 128, "num_hidden_layers": 2,
                             "num_attention_heads": 4, "num_key_value_heads": 2,
                             "vocab_size": 512, "max_position_embeddings": 1024},
                            dtype="float32")
    max_len = args.prompt_len + args.max_tokens
    llm = LLM(m, max_num_seqs=args.num_seqs, max_model_len=max_len,
              max_num_batched_tokens=max(max_len, args.num_seqs * args.prompt_len),
              num_gpu_blocks=args.num_seqs * (max_len // EngineConfig.block_size + 2) + 1,
              swap_space=0.01,
              use_tqdm_warmup=False)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 512, args.prompt_len).tolist() for _ in range(args.num_seqs)]
    sp = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    eng = llm.engine
    prof = cProfile.Profile()
    prof.enable()
    llm.generate(prompt_token_ids=prompts, sampling_params=sp, use_tqdm=False)
    prof.disable()
    st = eng.stats.snapshot()
    pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)
    print(f"steps {st['num_steps']}: host {1e3 * st['host_seconds'] / st['num_steps']:.2f} ms/step, "
          f"device call {1e3 * st['device_seconds'] / st['num_steps']:.2f} ms/step")


if __name__ == "__main__":
    main()
