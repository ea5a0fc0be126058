"""A device profile of one decode step and one prefill step (issue 15 item 1).

The same random-weight model runs (1) the decode loop of scripts/bench_step.py
(--num-seqs sequences at --context tokens, --steps greedy steps in one jitted
lax.fori_loop) and (2) one prefill step (--prefill-seqs sequences of
--prefill-len new tokens, greedy argmax of each last token), each compiled
once, warmed up, then called --calls times under jax.profiler. The trace is
joined with the compiled HLO (jpaged.bench.step_profile) into a table of the ops /
kernels the device ran: time per step, calls, bytes, achieved GB/s and
TFLOP/s where derivable (bytes: operands + result; KV-pool ops by the K/V
they must touch; FLOPs: the dots, attention by its formula). Rows are grouped
across layers (the jax op name with its layer index removed); the JSON keeps
the top instructions too. On CPU the table holds the host's XLA thunks.

Writes benchmarks/results/profile-<device>.json (or --out): device, commit,
command, settings, and per step kind the wall and device time per step, a
category summary, the grouped table and the top instructions; prints the
tables last. --trace-dir keeps the raw trace (view it in TensorBoard or
Perfetto).

Notes for issue 15 item 3 (measure first, on the GPU):
- Small-M matmuls: at decode, M = num_seqs (256); the kernel column shows
  whether XLA picked cuBLAS (sm90_xmma_gemm_* / nvjet_*) or a Triton GEMM
  fusion (a "fusion" whose kernel is named after it), and the TFLOP/s and
  GB/s columns whether it reads its weights at the bandwidth. To compare,
  rerun with XLA_FLAGS=--xla_gpu_enable_triton_gemm=false (cuBLAS only) or
  --xla_gpu_autotune_level=0; split-K shows as extra reduction kernels.
- If the table holds few kernels (a warning says so), XLA ran them inside
  command buffers (CUDA graphs), which the trace shows as one event: rerun
  with XLA_FLAGS=--xla_gpu_enable_command_buffer= (empty: off).
- Stacking layers and scanning over them (lax.scan over [num_layers, ...]
  params and pools) would cut the HLO's size and the jitted call's argument
  count, not the kernels per layer: the launches per step stay the same, and
  a scan slices each layer's pool out of a stacked array (a copy unless XLA
  aliases it in place; kernels_pallas's layout note). Worth it only if the
  per-kernel gaps (device time < wall time per step) are launch-bound.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def parse_args(argv):
    from jpaged.bench.harness import add_output_args, positive_int
    from jpaged.bench.step_ceiling import PEAK_BW
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-1.1b",
                   help="models.random_model preset or a JSON file holding an HF config dict")
    p.add_argument("--dtype", default="bfloat16", help="params and KV cache dtype")
    p.add_argument("--num-seqs", type=positive_int, default=256, help="decode: sequences")
    p.add_argument("--context", type=int, default=512, help="decode: tokens already cached")
    p.add_argument("--steps", type=positive_int, default=4,
                   help="decode: steps per jitted call (the table is per step)")
    p.add_argument("--prefill-seqs", type=int, default=4,
                   help="prefill: sequences in the step (0 skips the prefill profile)")
    p.add_argument("--prefill-len", type=positive_int, default=512,
                   help="prefill: new tokens per sequence (the step has seqs x len tokens)")
    p.add_argument("--calls", type=positive_int, default=3, help="calls traced per step kind")
    p.add_argument("--block-size", type=positive_int, default=16, help="tokens per KV block")
    p.add_argument("--attention-backend", default="auto",
                   help="kernels_pallas backend: auto, gpu, tpu, reference")
    p.add_argument("--interpret", action="store_true",
                   help="Pallas kernels in interpret mode (CPU checks of the GPU path)")
    p.add_argument("--peak-bw", type=float, default=PEAK_BW,
                   help="bytes/s for the %%-of-peak column (H200: 4.8e12)")
    p.add_argument("--top", type=positive_int, default=25, help="grouped rows printed per table")
    p.add_argument("--trace-dir", default=None,
                   help="keep the raw traces here (default: a temporary directory)")
    p.add_argument("--seed", type=int, default=0, help="weights, tokens, pool, block tables")
    add_output_args(p, "profile")
    args = p.parse_args(argv)
    if args.context < 0 or args.prefill_seqs < 0:
        p.error("--context and --prefill-seqs must be >= 0")
    return args


def _pool_info(model, num_blocks, block_size, tokens_read, attention_flops):
    """One layer's pool shape and what its attention reads and computes."""
    import jax.numpy as jnp
    from jpaged.bench.step_profile import PoolInfo
    from models.base import DTYPES
    c = model.config
    tp = 1 if model.kv_sharding is None else len(model.kv_sharding.device_set)
    per_token = 2 * c.num_kv_heads // tp * c.head_dim * jnp.dtype(DTYPES[model.dtype]).itemsize
    return PoolInfo(shape=(2, num_blocks, c.num_kv_heads // tp, block_size, c.head_dim),
                    read_bytes=tokens_read * per_token, attention_flops=attention_flops)


def _timed(compiled, state, make_args, calls=3) -> float:
    """Median wall seconds of ``calls`` calls (no profiler), threading the pool."""
    import jax
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        state["out"] = compiled(*make_args(state["out"]))
        jax.block_until_ready(state["out"])
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def profile_decode(model, args) -> dict:
    from jpaged.bench import step_ceiling, step_profile
    S, C, K, bs = args.num_seqs, args.context, args.steps, args.block_size
    inputs = step_ceiling.decode_inputs(model, S, C, K, bs, args.seed)
    loop = step_ceiling.decode_loop(model, K, bs)
    first = [model.params, inputs.kv_caches, inputs.tokens, inputs.positions, inputs.block_tables]
    inputs.kv_caches = None
    t = time.perf_counter()
    compiled = loop.lower(*first).compile()
    compile_s = time.perf_counter() - t

    def make_args(previous):
        if previous is not None:
            first[1] = previous[0]  # the donated pool comes back as the first result
        return list(first)
    state = {"out": None}
    _timed(compiled, state, make_args, calls=2)  # warm-up
    wall = _timed(compiled, state, make_args)
    c = model.config
    mean_ctx = C + (K + 1) / 2
    # NOTE: attention FLOPs: q.k and p.v, 2 * 2 * head_dim per head and cached token.
    pool = _pool_info(model, inputs.block_tables.size + 1, bs, S * mean_ctx,
                      4.0 * c.num_heads * c.head_dim * S * mean_ctx)
    res = step_profile.profile(compiled, lambda prev: make_args(prev or state["out"]),
                               num_calls=args.calls, steps_per_call=K, pool=pool,
                               trace_dir=args.trace_dir and f"{args.trace_dir}/decode")
    res.pop("result")
    moved = step_ceiling.step_bytes(model, S, C, K)
    return dict(res, num_seqs=S, context=C, K=K, compile_s=compile_s,
                wall_ms_per_step=1e3 * wall / K, tok_per_s=S / wall * K,
                roofline_ms=1e3 * moved["total"] / args.peak_bw, bytes=moved)


def profile_prefill(model, args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import kernels_pallas
    from jpaged.bench import step_ceiling, step_profile
    P, L, bs = args.prefill_seqs, args.prefill_len, args.block_size
    if L > model.config.max_position_embeddings:
        raise ValueError(f"--prefill-len {L} exceeds max_position_embeddings "
                         f"({model.config.max_position_embeddings})")
    rng = np.random.default_rng(args.seed)
    per_seq = -(-L // bs)
    tables = rng.permutation(np.arange(1, 1 + P * per_seq, dtype=np.int32)).reshape(P, per_seq)
    positions = np.tile(np.arange(L, dtype=np.int32), P)
    seq = np.repeat(np.arange(P), L)
    slots = tables[seq, positions // bs] * bs + positions % bs
    metadata = kernels_pallas.AttentionMetadata(
        slot_mapping=jnp.asarray(slots, jnp.int32), block_tables=jnp.asarray(tables),
        context_lens=jnp.full((P,), L, jnp.int32),
        query_start_loc=jnp.asarray(np.arange(P + 1) * L, jnp.int32), is_decode=False)

    def prefill(params, kv_caches, ids, positions, metadata, logits_indices):
        logits, kv_caches = model.apply(params, ids, positions, kv_caches, metadata,
                                        logits_indices)
        return kv_caches, jnp.argmax(logits, axis=-1).astype(jnp.int32)
    first = [model.params, step_ceiling.random_pool(model, 1 + tables.size, bs, args.seed),
             jnp.asarray(rng.integers(0, model.config.vocab_size, P * L), jnp.int32),
             jnp.asarray(positions), metadata, jnp.asarray(np.arange(1, P + 1) * L - 1, jnp.int32)]
    t = time.perf_counter()
    compiled = jax.jit(prefill, donate_argnums=(1,)).lower(*first).compile()
    compile_s = time.perf_counter() - t

    def make_args(previous):
        if previous is not None:
            first[1] = previous[0]
        return list(first)
    state = {"out": None}
    _timed(compiled, state, make_args, calls=2)
    wall = _timed(compiled, state, make_args)
    c = model.config
    pool = _pool_info(model, 1 + tables.size, bs, P * L,
                      4.0 * c.num_heads * c.head_dim * P * L * (L + 1) / 2)
    res = step_profile.profile(compiled, lambda prev: make_args(prev or state["out"]),
                               num_calls=args.calls, pool=pool,
                               trace_dir=args.trace_dir and f"{args.trace_dir}/prefill")
    res.pop("result")
    return dict(res, num_seqs=P, prompt_len=L, num_tokens=P * L, compile_s=compile_s,
                wall_ms_per_step=1e3 * wall, tok_per_s=P * L / wall)


def _tables(name: str, res: dict, args) -> str:
    from jpaged.bench.harness import format_table
    rows = [dict(r, pct_peak_bw=(100 * r["gb_per_s"] * 1e9 / args.peak_bw
                                 if r.get("gb_per_s") else None)) for r in res["groups"]]
    cats = [dict(r, pct_peak_bw=(100 * r["gb_per_s"] * 1e9 / args.peak_bw
                                 if r.get("gb_per_s") else None)) for r in res["categories"]]
    head = (f"{name}: wall {res['wall_ms_per_step']:.3f} ms/step, device (sum of kernels) "
            f"{res['device_us_per_step'] / 1e3:.3f} ms/step, {res['tok_per_s']:,.0f} tok/s"
            + (f", roofline {res['roofline_ms']:.3f} ms" if "roofline_ms" in res else "")
            + f"  [{res['trace'].get('plane')}: {res['trace'].get('num_events')} events]")
    columns = [("us_per_step", "us/step", ".1f"), ("pct", "%", ".1f"),
               ("gb_per_s", "GB/s", ",.0f"), ("pct_peak_bw", "% peak BW", ".0f"),
               ("tflop_per_s", "TFLOP/s", ".1f")]
    return "\n".join([
        head,
        format_table(cats, [("category", "category", "")] + columns),
        format_table(rows[:args.top], [("category", "category", ""),
                                       ("group", "op (all layers)", ""),
                                       ("calls_per_step", "calls", ".0f")] + columns)])


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import models
    from jpaged.bench.harness import default_out, result_header, write_result
    from models import load_hf_config
    header = result_header("scripts/profile_step.py", argv)
    out = args.out or default_out("profile", header["device"])
    model = models.random_model(load_hf_config(args.model), dtype=args.dtype, seed=args.seed,
                                attention_backend=args.attention_backend,
                                interpret=args.interpret, fast_init=True)
    result = dict(header, xla_flags=os.environ.get("XLA_FLAGS", ""), model=args.model,
                  dtype=args.dtype, block_size=args.block_size,
                  attention_backend=args.attention_backend, peak_bw=args.peak_bw)
    kinds = [("decode", profile_decode)] + ([("prefill", profile_prefill)]
                                            if args.prefill_seqs else [])
    for kind, fn in kinds:
        res = fn(model, args)
        res["ops"] = res["ops"][:100]  # NOTE: the JSON keeps the top instructions only
        if res["trace"]["num_events"] < model.config.num_layers * args.calls:
            res["warning"] = (
                f"only {res['trace']['num_events']} kernel events for {args.calls} calls of "
                f"{model.config.num_layers} layers: kernels may be hidden inside command "
                "buffers (CUDA graphs); rerun with XLA_FLAGS=--xla_gpu_enable_command_buffer=")
            print("WARNING: " + res["warning"], flush=True)
        result[kind] = res
        write_result(result, out)
        print(f"[{time.strftime('%H:%M:%S')}] {kind}: {res['wall_ms_per_step']:.3f} ms/step "
              f"({res['trace']['num_events']} events)", flush=True)
    print(f"\n{header['device']} ({header['platform']}), commit {header['commit']}, "
          f"{args.model} {args.dtype} -> {out}")
    for kind, _ in kinds:
        print("\n" + _tables(kind, result[kind], args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
