"""What the bench scripts share: one warmed-up engine, systems swapped in,
the offline and Poisson run loops, per-step probes, result metadata.

Systems: "jpaged" (the paged block manager, default settings), the
contiguous-reservation baselines "orca-max", "orca-pow2", "orca-oracle"
(jpaged.bench.reservation), and "jpaged-sync" (jpaged with async scheduling off,
for the host/device overlap's share). All run on the same engine object, so the same
compiled steps, model, kernels and KV pool: ``use_system`` swaps the block
manager and scheduler between runs (compiling once keeps a multi-system run
within one GPU call).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import pathlib
import platform
import shlex
import subprocess
import sys
import time

import numpy as np

from jpaged.block_manager import BlockSpaceManager
from jpaged.config import EngineConfig
from jpaged.bench.reservation import ReservationBlockManager, kv_slot_usage
from jpaged.sequence import SequenceStatus

SYSTEMS = ("jpaged", "orca-max", "orca-pow2", "orca-oracle", "jpaged-sync", "jpaged-window1",
           "jpaged-nochunk", "jpaged-between0", "jpaged-between8", "jpaged-between16",
           "jpaged-nooverlap")
LABELS = {"jpaged": "jpaged", "orca-max": "Orca-Max", "orca-pow2": "Orca-Pow2",
          "orca-oracle": "Orca-Oracle", "jpaged-sync": "jpaged, async scheduling off",
          "jpaged-window1": "jpaged, one decode step per call",
          "jpaged-nochunk": "jpaged, chunked prefill off",
          "jpaged-between0": "jpaged, no decode windows between chunks",
          "jpaged-between8": "jpaged, decode windows of 8 between chunks",
          "jpaged-between16": "jpaged, decode windows of 16 between chunks",
          "jpaged-nooverlap": "jpaged, overlap_ragged_updates off",
          "hf-generate": "HF generate (static)",
          "hf-generate-batch": "HF generate_batch (continuous)"}


def parse_list(text: str, allowed=None, kind=str) -> list:
    """Comma-separated flag value -> list; ValueError naming a bad entry."""
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise ValueError(f"empty list {text!r}")
    out = []
    for s in items:
        if allowed is not None and s not in allowed:
            raise ValueError(f"unknown entry {s!r}; choose from {list(allowed)}")
        try:
            out.append(kind(s))
        except ValueError:
            raise ValueError(f"{s!r} is not a valid {kind.__name__}") from None
    return out


def build_engine(model, *, kv_cache_gib=None, progress=True, **config):
    """An LLMEngine on a loaded model, warmed up (every bucket compiled); with
    data_parallel_size > 1 a DataParallelEngine of such replicas.

    config: EngineConfig fields (its defaults for the others; None leaves a
    field at its default).
    kv_cache_gib: size the KV pool in GiB (all layers, a replica's devices
    together; each replica has one) instead of from gpu_memory_utilization;
    num_gpu_blocks overrides both.
    """
    from jpaged.data_parallel import DataParallelEngine
    from jpaged.engine import LLMEngine
    config = EngineConfig(model="random",
                          **{k: v for k, v in config.items() if v is not None})
    if config.num_gpu_blocks is None and kv_cache_gib is not None:
        if not kv_cache_gib > 0:
            raise ValueError(f"kv_cache_gib must be > 0, got {kv_cache_gib}")
        config = dataclasses.replace(config, num_gpu_blocks=1 + int(
            kv_cache_gib * (1 << 30) // model.kv_bytes_per_block(config.block_size)))
    engine_cls = LLMEngine if config.data_parallel_size == 1 else DataParallelEngine
    return engine_cls(config, model=model, progress=progress)


# ------------------------------------------------------------------ flags
def add_model_args(parser, *, model_help="models.random_model preset or a JSON file with an "
                   "HF config") -> None:
    """--model and --dtype: the random-weight model engine_from_args builds."""
    parser.add_argument("--model", default="llama-1.1b", help=model_help)
    parser.add_argument("--dtype", default="bfloat16", help="params and KV cache dtype")


def positive_int(text: str) -> int:
    """argparse type: an int >= 1, else an error naming the value."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an int") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {value}")
    return value


def add_engine_args(parser, *, kv_cache_gib_default: float, kv_cache_gib_note: str = "",
                    max_num_seqs_help="sequences per step, at most",
                    max_model_len_help="context limit", data_parallel: bool = False) -> None:
    """The engine and KV pool flags engine_from_args reads (--block-size,
    --max-num-seqs, --max-model-len, --max-num-batched-tokens, --kv-cache-gib,
    --num-gpu-blocks, --gpu-memory-utilization, --swap-space,
    --tensor-parallel-size; --data-parallel-size with data_parallel, for a
    script that reads its engine through replicas() and the engine's
    request API only).

    kv_cache_gib_note: the script's reason for its pool size, put into the
    --kv-cache-gib help (e.g. "; sharing pays off when ...").
    """
    from jpaged.config import DEFAULT_MIN_BATCHED_TOKENS, EngineConfig
    from jpaged.engine_args import SCRIPT_MAX_MODEL_LEN
    d, p = EngineConfig(), parser
    if data_parallel:
        kv_cache_gib_note += "; each replica's with --data-parallel-size"
    p.add_argument("--block-size", type=int, default=d.block_size, help="tokens per KV block")
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs, help=max_num_seqs_help)
    p.add_argument("--max-model-len", type=int, default=SCRIPT_MAX_MODEL_LEN,
                   help=max_model_len_help)
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="prefill token budget per step (default: EngineConfig's, "
                        f"max({DEFAULT_MIN_BATCHED_TOKENS}, max-num-seqs), and at least "
                        "max-model-len without chunked prefill)")
    p.add_argument("--kv-cache-gib", type=float, default=kv_cache_gib_default,
                   help=f"KV pool size in GiB over all layers{kv_cache_gib_note} (0: size it "
                        "from --gpu-memory-utilization)")
    p.add_argument("--num-gpu-blocks", type=int, default=None,
                   help="KV pool size in blocks (null block included); overrides --kv-cache-gib")
    p.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization,
                   help="fraction of device memory for the engine when the pool is not sized")
    p.add_argument("--swap-space", type=float, default=d.swap_space,
                   help="GiB of host swap space")
    p.add_argument("--max-decode-window", type=positive_int, default=None,
                   help="decode steps per jitted call, a power of two (default: EngineConfig's)")
    p.add_argument("--tensor-parallel-size", type=positive_int, default=d.tensor_parallel_size,
                   help="devices the model and KV pool are split over (the first N devices; "
                        "--kv-cache-gib is the pool over all of them)")
    if data_parallel:
        p.add_argument("--data-parallel-size", type=positive_int, default=d.data_parallel_size,
                       help="independent engine replicas, each on its own "
                            "--tensor-parallel-size devices with its own KV pool (--kv-cache-gib "
                            "or --num-gpu-blocks each); requests go to the replica with the "
                            "fewest unfinished ones")
    p.add_argument("--no-enable-chunked-prefill", dest="enable_chunked_prefill",
                   action="store_false", default=d.enable_chunked_prefill,
                   help="steps all prefill (whole prompts) or all decode; the system "
                        "jpaged-nochunk does the same on the engine built with it on")
    p.add_argument("--long-prefill-token-threshold", type=int,
                   default=d.long_prefill_token_threshold,
                   help="with chunked prefill, tokens of one prompt's chunk in a step, at "
                        "most (0: the budget is the only cap)")
    p.add_argument("--decode-window-between-chunks", type=int,
                   default=d.decode_window_between_chunks,
                   help="with chunked prefill, a decode window of up to this many steps "
                        "(a power of two, at most --max-decode-window) after each step that "
                        "leaves more than the token budget of a prefill to run (0: none, "
                        "vLLM's rule)")


def add_output_args(parser, kind: str) -> None:
    """--no-progress and --out (default benchmarks/results/<kind>-<device>.json)."""
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--out", default=None, help="result JSON path (default "
                        f"benchmarks/results/{kind}-<device>.json)")


def engine_from_args(args, hf_config: dict, freeze: bool = False):
    """The random-weight model and warmed-up engine that the flags of
    add_model_args / add_engine_args / add_output_args ask for.

    freeze: jpaged.engine.freeze_heap() once the engine is warmed up (the
      scripts, run from the command line: main(argv=None)).

    Returns: (model, engine, info); info is the result JSON's "engine" entry:
      warmup_seconds, compiles_at_warmup (from engine.stats; with data
      parallelism, both summed over the replicas, which warm up one after
      another), num_gpu_blocks (per replica), max_num_seqs (per replica),
      max_model_len, tensor_parallel_size, data_parallel_size. Compiles
      after warm-up: engine.stats.compiles_after_warmup.
    """
    import models
    from jpaged.data_parallel import replicas
    from jpaged.engine import enable_compilation_cache
    enable_compilation_cache()  # the model's init compiles too
    t0 = time.perf_counter()
    model = models.random_model(hf_config, dtype=args.dtype, seed=0, fast_init=True)
    print(f"[{time.strftime('%H:%M:%S')}] random weights ready in {time.perf_counter() - t0:.1f} s",
          flush=True)
    engine = build_engine(model, block_size=args.block_size, max_num_seqs=args.max_num_seqs,
                          max_model_len=args.max_model_len,
                          max_num_batched_tokens=args.max_num_batched_tokens,
                          num_gpu_blocks=args.num_gpu_blocks,
                          kv_cache_gib=args.kv_cache_gib or None,
                          gpu_memory_utilization=args.gpu_memory_utilization,
                          swap_space=args.swap_space, progress=not args.no_progress,
                          tensor_parallel_size=args.tensor_parallel_size,
                          data_parallel_size=getattr(args, "data_parallel_size", None),
                          max_decode_window=args.max_decode_window,
                          enable_chunked_prefill=getattr(args, "enable_chunked_prefill", None),
                          long_prefill_token_threshold=getattr(
                              args, "long_prefill_token_threshold", None),
                          decode_window_between_chunks=getattr(
                              args, "decode_window_between_chunks", None))
    if freeze:
        from jpaged.engine import freeze_heap
        freeze_heap()
    runners = [e.runner for e in replicas(engine)]
    st = engine.stats  # (data parallelism: the replicas' counters added up)
    print(f"[{time.strftime('%H:%M:%S')}] engine ready: warm-up {st.warmup_seconds:.1f} s, "
          f"{st.compiles_at_warmup} compiles, {runners[0].num_gpu_blocks} blocks"
          f"{f' x {len(runners)} replicas' if len(runners) > 1 else ''}", flush=True)
    info = dict(warmup_seconds=st.warmup_seconds, compiles_at_warmup=st.compiles_at_warmup,
                num_gpu_blocks=runners[0].num_gpu_blocks, max_num_seqs=args.max_num_seqs,
                max_model_len=engine.config.max_model_len,
                max_decode_window=engine.config.max_decode_window,
                max_num_batched_tokens=engine.config.max_num_batched_tokens,
                enable_chunked_prefill=engine.config.enable_chunked_prefill,
                long_prefill_token_threshold=engine.config.long_prefill_token_threshold,
                decode_window_between_chunks=engine.config.decode_window_between_chunks,
                tensor_parallel_size=args.tensor_parallel_size,
                data_parallel_size=engine.config.data_parallel_size)
    return model, engine, info


def block_manager_factory(system: str, max_model_len: int, enable_prefix_caching=False):
    """A callable with BlockSpaceManager's signature for `system`."""
    if system in SYSTEMS and system.startswith("jpaged"):
        return BlockSpaceManager
    if system.startswith("orca-") and system[5:] in ("max", "pow2", "oracle"):
        if enable_prefix_caching:
            raise ValueError(f"{system} has no prefix caching")
        return functools.partial(ReservationBlockManager, policy=system[5:],
                                 max_model_len=max_model_len)
    raise ValueError(f"unknown system {system!r}; choose from {list(SYSTEMS)}")


def use_system(engine, system: str, enable_prefix_caching: bool = False,
               num_blocks: int | None = None,
               decode_window_between_chunks: int | None = None) -> None:
    """Gives the (idle) engine a fresh block manager and scheduler for
    `system` and zeroes its counters; the model runner and KV pool stay.

    decode_window_between_chunks: the engine's (the scripts' flag; None:
    EngineConfig's default), for every system but jpaged-between<K> (K, at
    most the compiled window), jpaged-window1 and jpaged-nochunk (0).

    num_blocks: hand out only the first num_blocks blocks of the pool (null
    block included), as a smaller pool would, with the compiled steps of
    the full one; default the whole pool.
    """
    from jpaged.data_parallel import replicas
    factory = block_manager_factory(system, engine.config.max_model_len, enable_prefix_caching)
    # "jpaged-sync": jpaged waiting for each step's tokens (no host/device overlap);
    # "jpaged-window1": decode windows off (one decode step per jitted call);
    # "jpaged-nochunk": chunked prefill off (steps all prefill or all decode;
    # needs a budget >= max_model_len); the others: chunked as the engine was built;
    # "jpaged-between<K>": decode windows of K steps between a long prefill's chunks;
    # "jpaged-nooverlap": a ragged step does not leave the step before it in flight
    chunked = engine.config.enable_chunked_prefill and system != "jpaged-nochunk"
    window = 1 if system == "jpaged-window1" else max(replicas(engine)[0].runner.window_sizes)
    if decode_window_between_chunks is None:
        decode_window_between_chunks = EngineConfig.decode_window_between_chunks
    between = min(decode_window_between_chunks, window) if chunked else 0
    if system.startswith("jpaged-between"):
        between = min(int(system[len("jpaged-between"):]), window) if chunked else 0
    engine.use_block_manager(
        factory, num_blocks, enable_prefix_caching=enable_prefix_caching,
        async_scheduling=system != "jpaged-sync", max_decode_window=window,
        enable_chunked_prefill=chunked, decode_window_between_chunks=between,
        overlap_ragged_updates=system != "jpaged-nooverlap")


class Probe:
    """Per-step measurements taken after engine.step(); their own time is
    kept apart (``seconds``) so the caller can leave it out of the run time.

    Tracks peak concurrent sequences, KV waste at the step of peak block use
    (slots allocated but holding no token, % of the pool), and, with
    ``sharing``, block-table entries vs distinct blocks over all steps. With
    data parallelism every figure is over all replicas together (their
    sequences, blocks and pools added up).
    """

    def __init__(self, engine, sharing: bool = False):
        self.engine, self.sharing = engine, sharing
        self.seconds = 0.0
        self.peak_seqs = 0
        self.peak_blocks = -1
        self.at_peak = dict(kv_waste_pct=0.0, kv_filled_pct=0.0, kv_free_pct=100.0)
        self.entries = self.distinct = 0
        self.peak_saved_pct = 0.0

    def after_step(self) -> None:
        from jpaged.data_parallel import replicas
        t0 = time.perf_counter()
        running = [(e.block_manager, [s for g in e.scheduler.running
                                      for s in g.get_seqs(SequenceStatus.RUNNING)])
                   for e in replicas(self.engine)]
        self.peak_seqs = max(self.peak_seqs, sum(len(seqs) for _, seqs in running))
        used = sum(bm.get_num_total_gpu_blocks() - bm.get_num_free_gpu_blocks()
                   for bm, _ in running)
        if used > self.peak_blocks:
            self.peak_blocks = used
            in_use, filled, pool = (sum(x) for x in zip(*(kv_slot_usage(bm, seqs)
                                                           for bm, seqs in running)))
            self.at_peak = dict(kv_waste_pct=100.0 * (in_use - filled) / pool,
                                kv_filled_pct=100.0 * filled / pool,
                                kv_free_pct=100.0 * (pool - in_use) / pool)
        if self.sharing:
            entries, distinct = (sum(x) for x in zip(*(bm.get_block_usage()
                                                       for bm, _ in running)))
            self.entries += entries
            self.distinct += distinct
            if entries:
                self.peak_saved_pct = max(self.peak_saved_pct, 100.0 * (1 - distinct / entries))
        self.seconds += time.perf_counter() - t0

    def summary(self) -> dict:
        out = dict(peak_concurrent_seqs=self.peak_seqs, peak_blocks_used=self.peak_blocks,
                   **{f"{k}_at_peak": v for k, v in self.at_peak.items()})
        if self.sharing:
            out["blocks_saved_pct"] = (100.0 * (self.entries - self.distinct) / self.entries
                                       if self.entries else 0.0)
            out["peak_blocks_saved_pct"] = self.peak_saved_pct
        return out


def engine_counters(engine) -> dict:
    """Step, preemption and timing counters of the engine's current system
    (with data parallelism: summed over the replicas, steps counted per
    replica, plus "replicas": each one's requests, generated tokens and
    steps)."""
    st = engine.stats.snapshot()
    steps = max(1, st["num_steps"])
    per_replica = {}
    if engine.config.data_parallel_size > 1:
        per_replica["replicas"] = [
            dict(num_requests=n, generated_tokens=e.stats.num_generated_tokens,
                 num_steps=e.stats.num_steps)
            for n, e in zip(engine.num_requests, engine.engines)]
    return dict(num_steps=st["num_steps"], decode_steps=st["num_decode_steps"],
                steps_dispatched_ahead=st["num_steps_ahead"],
                steps_dispatched_two_ahead=st["num_steps_two_ahead"],
                preemptions=st["num_preemptions"],
                swaps_out=st["num_swaps_out"], swaps_in=st["num_swaps_in"],
                host_ms_per_step=1e3 * st["host_seconds"] / steps,
                device_ms_per_step=1e3 * st["device_seconds"] / steps,
                dispatch_ms_per_step=1e3 * st["dispatch_seconds"] / steps,
                generated_tokens=st["num_generated_tokens"],
                prefill_tokens=st["num_prefill_tokens"],
                cached_prompt_tokens=st["num_cached_prompt_tokens"], **per_replica)


def run_offline(engine, requests, params, *, sharing=False, progress=True, desc="requests",
                request_ids=None) -> dict:
    """All requests queued at time 0, stepped to completion.

    Args:
      requests: list of workloads.Request.
      params: one SamplingParams per request.
    Returns: throughput, counters and probe figures (no per-request data).
    """
    from tqdm import tqdm
    ids = request_ids or [str(i) for i in range(len(requests))]
    for rid, r, sp in zip(ids, requests, params):
        engine.add_request(rid, None, sp, prompt_token_ids=r.prompt_token_ids)
    engine.clear_arrivals()  # an offline batch
    probe = Probe(engine, sharing)
    outs = []
    bar = tqdm(total=len(requests), desc=desc, disable=not progress, leave=False)
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        done = engine.step()
        probe.after_step()
        outs += done
        bar.update(len(done))
    elapsed = time.perf_counter() - t0 - probe.seconds
    bar.close()
    rejected = [o for o in outs if o.error is not None]
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return dict(num_requests=len(requests), num_rejected=len(rejected),
                rejected_reason=rejected[0].error if rejected else None,
                seconds=elapsed, output_tokens=tokens,
                output_tokens_per_s=tokens / elapsed,
                requests_per_s=(len(requests) - len(rejected)) / elapsed,
                **engine_counters(engine), **probe.summary())


@contextlib.contextmanager
def device_trace(directory, name, into: dict):
    """jax.profiler's trace of the block under directory/name, reduced
    (step_profile.kernel_totals) to device time per jitted function and
    kernel and the device's busy and idle time into into[name]; nothing
    when directory is None."""
    if directory is None:
        yield
        return
    from jpaged.bench.step_profile import kernel_totals, traced
    ran = False
    try:
        with traced(pathlib.Path(directory) / name) as trace:
            yield
            ran = True
    except RuntimeError as e:
        if not ran:  # (the run's own error)
            raise
        into[name] = dict(error=str(e))  # no trace written: recorded, the run goes on
        return
    into[name] = kernel_totals(trace.path)


class HostProfile:
    """cProfile over chosen runs of a benchmark (`with prof:` around each),
    written as two tables, by own time and by cumulative time. Off (a no-op)
    when path is None."""

    def __init__(self, path: str | None, lines: int = 45):
        import cProfile
        self.path, self.lines = path, lines
        self._profile = cProfile.Profile() if path else None

    def __enter__(self):
        if self._profile is not None:
            self._profile.enable()
        return self

    def __exit__(self, *exc):
        if self._profile is not None:
            self._profile.disable()

    def write(self) -> None:
        if self._profile is None:
            return
        import io
        import pstats
        text = io.StringIO()
        stats = pstats.Stats(self._profile, stream=text)
        stats.sort_stats("tottime").print_stats(self.lines)
        stats.sort_stats("cumulative").print_stats(self.lines)
        pathlib.Path(self.path).write_text(text.getvalue())


def run_poisson(engine, requests, arrivals, params, *, deadline=None) -> dict:
    """Requests arrive at `arrivals` (seconds) on a simulated clock that
    advances by each step's measured wall time and jumps over idle gaps.

    Normalized latency of a request = (finish - arrival) / output tokens.
    deadline: wall-clock time.perf_counter() value after which no more
    requests are admitted (the run is then marked truncated).

    Besides the percentiles, per finished request in id order: ttft_ms,
    windows_before_first_token (step() calls between its arrival and its
    first token that dispatched a decode window of more than one step: a
    prompt waits behind such windows), calls_to_first_token (step() calls
    from its arrival to the one that returned its first token), and
    arrived_idle (the engine had nothing to do when it arrived).
    """
    n = len(requests)
    sim, i = 0.0, 0
    finish: dict[int, float] = {}
    first_token: dict[int, float] = {}
    rejected = 0
    truncated = False
    t_start = time.perf_counter()
    # NOTE: first_token_time is time.monotonic(); each step's end maps it to the
    # simulated clock (the first token came back in that step)
    step_ends: list[tuple[float, float]] = []
    windows: list[bool] = []  # per step() call: it dispatched a window of > 1 step
    arrived_idle: dict[int, bool] = {}
    arrived_at_step: dict[int, int] = {}
    while i < n or engine.has_unfinished_requests():
        if deadline is not None and i < n and time.perf_counter() > deadline:
            truncated = True
            engine.abort_request([str(k) for k in range(n)])
            break
        if not engine.has_unfinished_requests() and sim < arrivals[i]:
            sim = float(arrivals[i])
        while i < n and arrivals[i] <= sim:
            arrived_idle[i] = not engine.has_unfinished_requests()
            arrived_at_step[i] = len(step_ends)
            engine.add_request(str(i), None, params[i],
                               prompt_token_ids=requests[i].prompt_token_ids)
            i += 1
        steps0, decode0 = engine.stats.num_steps, engine.stats.num_decode_steps
        t0 = time.perf_counter()
        done = engine.step()
        sim += time.perf_counter() - t0
        step_ends.append((time.monotonic(), sim))
        windows.append(engine.stats.num_decode_steps - decode0 >
                       engine.stats.num_steps - steps0)
        for o in done:
            if o.error is not None:
                rejected += 1
            else:
                finish[int(o.request_id)] = sim
                if o.metrics is not None and o.metrics.first_token_time is not None:
                    first_token[int(o.request_id)] = o.metrics.first_token_time
    wall = time.perf_counter() - t_start
    ok = sorted(finish)
    lat = np.array([finish[k] - arrivals[k] for k in ok])
    norm = lat / np.array([requests[k].output_len for k in ok]) if ok else np.array([math.nan])
    tokens = sum(requests[k].output_len for k in ok)
    monos = [m for m, _ in step_ends]
    ttft, tpot, waited, idle, calls = [], [], [], [], []
    for k in ok:
        if k not in first_token:
            continue
        j = min(np.searchsorted(monos, first_token[k]), len(step_ends) - 1)
        t_first = step_ends[j][1]
        ttft.append(t_first - arrivals[k])
        # (from the call before its arrival: the step that call dispatched still ran)
        waited.append(int(sum(windows[max(0, arrived_at_step[k] - 1):j + 1])))
        idle.append(arrived_idle[k])
        calls.append(int(j + 1 - arrived_at_step[k]))
        if requests[k].output_len > 1:
            tpot.append((finish[k] - t_first) / (requests[k].output_len - 1))

    def pct(xs, q):
        return float(np.percentile(xs, q)) if xs else math.nan
    return dict(num_requests=n, num_finished=len(ok), num_rejected=rejected,
                truncated=truncated, sim_seconds=sim, wall_seconds=wall,
                mean_normalized_latency=float(np.mean(norm)),
                p50_normalized_latency=float(np.percentile(norm, 50)),
                p90_normalized_latency=float(np.percentile(norm, 90)),
                mean_latency=float(np.mean(lat)) if ok else math.nan,
                ttft_p50_ms=1e3 * pct(ttft, 50), ttft_p99_ms=1e3 * pct(ttft, 99),
                tpot_p50_ms=1e3 * pct(tpot, 50), tpot_p99_ms=1e3 * pct(tpot, 99),
                ttft_ms=[round(1e3 * t, 3) for t in ttft], windows_before_first_token=waited,
                arrived_idle=idle, calls_to_first_token=calls,
                behind_window_share=float(np.mean([w > 0 for w in waited])) if waited else math.nan,
                ttft_p50_behind_window_ms=1e3 * pct([t for t, w in zip(ttft, waited) if w], 50),
                ttft_p50_no_window_ms=1e3 * pct([t for t, w in zip(ttft, waited) if not w], 50),
                output_tokens_per_s=tokens / sim if sim else 0.0,
                **engine_counters(engine))


# ------------------------------------------------------------------ results
def git_commit() -> str | None:
    """HEAD's hash, with "-dirty" when tracked files differ from it; the
    JPAGED_COMMIT environment variable wins (a copied tree whose .git is not
    the source's, as on the GPU machine)."""
    import os
    if os.environ.get("JPAGED_COMMIT"):
        return os.environ["JPAGED_COMMIT"]
    try:
        head = subprocess.check_output(["git", "rev-parse", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"],
                               stderr=subprocess.DEVNULL).returncode != 0
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def result_header(script: str, argv) -> dict:
    """Device, commit, exact command and versions for a result JSON."""
    import jax
    argv = sys.argv[1:] if argv is None else list(argv)
    return dict(device=jax.devices()[0].device_kind, platform=jax.default_backend(),
                commit=git_commit(), command=shlex.join(["python", script] + argv),
                jax=jax.__version__, host=platform.node(),
                date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def default_out(kind: str, device: str, tag: str = "") -> str:
    name = f"{kind}-{device.replace(' ', '_')}{'-' + tag if tag else ''}.json"
    return str(pathlib.Path("benchmarks") / "results" / name)


def write_result(result: dict, out: str) -> None:
    path = pathlib.Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=_json_default))


def _json_default(x):
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    raise TypeError(f"{type(x).__name__} is not JSON serializable")


def progress_line(label: str, figures: dict) -> None:
    """One flushed line of a finished run's main figures (logs survive a kill)."""
    keys = ("output_tokens_per_s", "mean_normalized_latency", "throughput_gain",
            "blocks_saved_pct", "peak_concurrent_seqs", "preemptions", "host_ms_per_step",
            "dispatch_ms_per_step", "device_ms_per_step", "seconds", "sim_seconds")
    shown = {k: round(v, 4) if isinstance(v, float) else v
             for k, v in figures.items() if k in keys}
    print(f"[{time.strftime('%H:%M:%S')}] {label}: {json.dumps(shown)}", flush=True)


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Plain-text table; columns: (key, header, format spec)."""
    def cell(row, key, fmt):
        v = row.get(key)
        if v is None:
            return "-"
        if isinstance(v, str):
            return v
        return format(v, fmt)
    table = [[h for _, h, _ in columns]] + [[cell(r, k, f) for k, _, f in columns] for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
