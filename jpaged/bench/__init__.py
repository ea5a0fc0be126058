"""The benchmark harness, apart from the engine it measures.

It drives the engine through its public seams only (``LLMEngine``'s
constructor arguments, ``use_block_manager``, ``stats``):

- ``harness``: engine set-up from flags, the systems compared side by side
  (jpaged, jpaged-sync, jpaged-window1, the Orca baselines), offline and
  Poisson runs, per-step probes, result JSON;
- ``reservation``: the contiguous-reservation baseline (Orca-Max / Pow2 /
  Oracle), a block manager the engine takes as its argument (host only);
- ``workloads``: ShareGPT, synthetic and shared-prefix requests, Poisson
  arrivals (host only; ``python -m jpaged.bench.workloads``);
- ``step_ceiling`` / ``step_profile``: the model alone on the device (the
  engine's ceiling) and the profile of one step;
- ``hf_baseline``: Hugging Face transformers baselines, in a process of
  their own (``python -m jpaged.bench.hf_baseline``);
- ``client``: the HTTP load generator of the serving benchmark.

The scripts in ``scripts/bench_*.py`` are its command lines.
"""
