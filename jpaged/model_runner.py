"""ModelRunner: the one bridge from host bookkeeping to device arrays.

It owns the KV pool (one donated array per layer, layout in
``kernels_pallas``), the host swap pool, and a fixed set of jitted step
functions, one per bucket:

- decode buckets: ``num_seqs`` in powers of two up to ``max_num_seqs``
  (one new token per sequence);
- prefill buckets: ``num_tokens`` in powers of two from 16 up to
  ``max_num_batched_tokens``, with ``min(num_tokens, max_num_seqs)``
  sequence slots.

Block tables are always ``ceil(max_model_len / block_size)`` wide. Every
bucket (and the swap / copy helpers) is compiled by ``warm_up``; a run then
compiles nothing more. A step is two jitted calls: the model, then the
sampler (one of SAMPLER_MODES per row count, chosen on the host). The
sampling settings are traced arrays, so a new mix of settings compiles nothing.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import operator
import time

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas import AttentionMetadata, copy_blocks
from jpaged import sampler as sampler_lib

# Sampler rows return this many top logprobs (beam search asks for
# 2 * beam_width of them, so beam widths up to 10 fit).
MAX_LOGPROBS = 20
# The sampler's static modes: (greedy or sampling) x (penalties or not), the
# host picking one per step (sampler.SamplerModes.coarsen); all four are
# compiled at warm-up for every row count, so a new mix of settings never
# compiles. The sampler is its own jitted call after the model's: modes chosen
# on the device (lax.cond) would make the host wait there for the whole
# forward pass before launching the rest of the step.
SAMPLER_MODES = tuple(m for m in sampler_lib.all_modes(coarse=True)
                      if m.num_logprobs == MAX_LOGPROBS)
MIN_PREFILL_BUCKET = 16
MAX_SWAP_CHUNK = 256  # blocks moved per device<->host transfer at most


def _pow2_buckets(lo: int, hi: int) -> list[int]:
    out, b = [], lo
    while b < hi:
        out.append(b)
        b *= 2
    out.append(hi)
    return sorted(set(out))


def _bucket(buckets: list[int], n: int) -> int:
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


@dataclasses.dataclass
class SeqInput:
    """One sequence's work in a step (built by the engine).

    token_ids:   tokens whose K/V this step computes (prefill: the uncached
                 tail of the sequence; decode: its last token).
    start_pos:   position of token_ids[0].
    block_table: the sequence's physical block ids.
    num_samples: sampler rows that read this sequence's last logits (1, or
                 best_of when a prompt forks into parallel samples).
    prompt_next_ids: for prompt logprobs, the token that follows each of
                 token_ids (None: not wanted); the step then returns the
                 logprob of each and the top MAX_LOGPROBS at every position.
    prev_row:    decode only: >= 0 when the input token is not known on the
                 host yet; the step then reads it from row ``prev_row`` of
                 the previous step's sampled tokens, on the device
                 (token_ids[0] is ignored).
    """
    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    num_samples: int = 1
    prompt_next_ids: list[int] | None = None
    prev_row: int = -1


@dataclasses.dataclass
class StepOutput:
    """Host copies of the sampler's results, one row per sampler row."""
    token_ids: np.ndarray       # i32[rows]
    logprobs: np.ndarray        # f32[rows]
    topk_token_ids: np.ndarray  # i32[rows, MAX_LOGPROBS]
    topk_logprobs: np.ndarray   # f32[rows, MAX_LOGPROBS]
    # Prompt logprobs, one row per computed token of the step, when asked for:
    prompt_logprobs: np.ndarray | None = None        # f32[tokens]
    prompt_topk_token_ids: np.ndarray | None = None  # i32[tokens, MAX_LOGPROBS]
    prompt_topk_logprobs: np.ndarray | None = None   # f32[tokens, MAX_LOGPROBS]


@dataclasses.dataclass
class PendingStep:
    """A dispatched step whose results are still on the device.

    next_tokens feeds the following step's inputs without a host round trip
    (SeqInput.prev_row); ``ModelRunner.fetch`` brings the rest to the host.
    """
    out: object                # sampler_lib.SamplerOutput of device arrays
    plp: object                # sampler_lib.PromptLogprobs or None
    num_rows: int
    num_tokens: int
    next_tokens: jax.Array     # i32[max_num_seqs] sampled tokens, zero padded
    result: StepOutput | None = None  # set once fetched


class ModelRunner:
    """Owns the KV pool and the jitted steps for one model."""

    def __init__(self, model, *, block_size: int, max_num_seqs: int,
                 max_num_batched_tokens: int, max_model_len: int,
                 num_gpu_blocks: int | None = None,
                 gpu_memory_utilization: float = 0.9,
                 swap_space_gib: float = 0.0, kv_dtype=None,
                 attention_backend: str = "auto", tensor_parallel_size: int = 1):
        self.tensor_parallel_size = tensor_parallel_size
        self.mesh = None
        if tensor_parallel_size > 1:  # params and pool sharded over a "tp" mesh
            from jpaged import parallel
            self.mesh = parallel.make_mesh(tensor_parallel_size)
            model = parallel.shard_model(model, self.mesh)
        self.model = model
        self.attention_backend = attention_backend
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.max_blocks_per_seq = math.ceil(max_model_len / block_size)
        self.kv_dtype = jnp.dtype(kv_dtype or model.dtype)
        self.vocab_size = model.config.vocab_size
        self.bytes_per_block = model.kv_bytes_per_block(block_size)
        self.num_gpu_blocks = num_gpu_blocks or self._profile_num_blocks(
            gpu_memory_utilization)
        if self.num_gpu_blocks < 2:
            raise ValueError(
                f"the KV pool has room for {self.num_gpu_blocks} blocks; it needs "
                "at least 2 (block 0 is the null block): raise num_gpu_blocks or "
                "gpu_memory_utilization")
        self.num_cpu_blocks = int(swap_space_gib * (1 << 30) // self.bytes_per_block)
        self.num_slots = self.num_gpu_blocks * block_size
        self.kv_caches = model.init_kv_caches(self.num_gpu_blocks, block_size,
                                              dtype=self.kv_dtype)
        self.cpu_cache = None  # host swap pool, allocated on first swap-out
        # Device<->host transfers go through page-locked memory where the
        # platform offers it (on an H100: ~52 GB/s against ~7 GB/s pageable).
        self._device = jax.local_devices()[0]
        self._pinned = any(m.kind == "pinned_host" for m in self._device.addressable_memories())
        self.decode_buckets = _pow2_buckets(1, max_num_seqs)
        self.prefill_buckets = _pow2_buckets(
            min(MIN_PREFILL_BUCKET, max_num_batched_tokens), max_num_batched_tokens)
        self.swap_buckets = (_pow2_buckets(1, min(MAX_SWAP_CHUNK, self.num_cpu_blocks))
                             if self.num_cpu_blocks else [])
        self.num_traces = 0
        self.warmup_seconds = None
        self._forward_fn = jax.jit(self._forward, donate_argnums=(1,))
        self._sample_fn = jax.jit(self._sample, static_argnames=("modes",))
        # The sampled tokens that feed the next step stay on the device; a
        # step with nothing to read gets zeros of the same shape and sharding.
        self._token_sharding = (parallel.replicated(self.mesh) if self.mesh is not None
                                else jax.sharding.SingleDeviceSharding(self._device))
        self._no_prev = jax.device_put(np.zeros(max_num_seqs, np.int32), self._token_sharding)
        self._pad_tokens: dict[tuple, jax.Array] = {}  # see _place_penalty_tokens
        self._copy_fn = jax.jit(self._copy, donate_argnums=(0,))
        self._gather_fn = jax.jit(self._gather)
        self._scatter_fn = jax.jit(self._scatter, donate_argnums=(0,))
        if self.mesh is not None:
            # NOTE: the step keeps the pool's sharding by itself (the attention
            # shard_map returns it); these pin it so no call ever recompiles.
            pool = parallel.kv_cache_shardings(self.mesh, len(self.kv_caches))
            self._copy_fn = jax.jit(parallel.per_shard(self._copy, self.mesh, len(pool), 2),
                                    donate_argnums=(0,), out_shardings=pool)
            self._scatter_fn = jax.jit(self._scatter, donate_argnums=(0,), out_shardings=pool)
            if not pool[0].is_fully_addressable:  # several hosts: each needs every swapped block
                self._gather_fn = jax.jit(self._gather,
                                          out_shardings=parallel.replicated(self.mesh))

    # ------------------------------------------------------------ sizing
    def _profile_num_blocks(self, utilization: float) -> int:
        """Blocks that fit in `utilization` of the device memory left after
        the weights, keeping room for the largest step's activations."""
        stats = jax.local_devices()[0].memory_stats() or {}
        limit = stats.get("bytes_limit")
        if not limit:  # CPU: no memory statistics; size for the workload instead
            return 1 + self.max_num_seqs * self.max_blocks_per_seq
        cfg = self.model.config
        activations = self.max_num_batched_tokens * (
            4 * cfg.hidden_size * 4 + 2 * getattr(cfg, "intermediate_size", 4 * cfg.hidden_size) * 4)
        activations += self.max_num_seqs * self.vocab_size * 4 * 4
        # the prompt-logprobs variant holds every token's logits and logprobs
        activations += self.max_num_batched_tokens * self.vocab_size * 4 * 2
        free = limit * utilization - stats.get("bytes_in_use", 0) - activations
        return max(0, int(free // (self.bytes_per_block // self.tensor_parallel_size)))

    # ------------------------------------------------------------ jitted bodies
    def _forward(self, params, kv_caches, input_ids, positions, metadata,
                 logits_indices, prompt_next_ids, prev_tokens, prev_rows):
        """The model: the sampler rows' logits (and prompt logprobs).

        prev_tokens: i32[max_num_seqs], the previous step's next_tokens;
        prev_rows: i32[num_tokens], where >= 0 the input token is
        prev_tokens[prev_rows] instead of input_ids (async scheduling)."""
        self.num_traces += 1  # runs only while tracing: counts compilations
        input_ids = jnp.where(prev_rows >= 0, prev_tokens[jnp.maximum(prev_rows, 0)], input_ids)
        if prompt_next_ids is None:
            logits, kv_caches = self.model.apply(params, input_ids, positions,
                                                 kv_caches, metadata, logits_indices)
            return kv_caches, logits, None
        # NOTE: a None vs array argument is a separate jit entry: prompt
        # logprobs need the logits of every token, the usual step only a few.
        logits, kv_caches = self.model.apply(params, input_ids, positions,
                                             kv_caches, metadata, None)
        plp = sampler_lib.prompt_logprobs(logits, prompt_next_ids, MAX_LOGPROBS)
        return kv_caches, logits[logits_indices], plp

    def _sample(self, logits, sampling, modes):
        """One token per sampler row, and the same tokens zero-padded to
        max_num_seqs (the next step's prev_tokens)."""
        self.num_traces += 1
        out = sampler_lib.sample(logits, sampling, modes)
        ids = out.sampled_token_ids
        next_tokens = jnp.zeros(self.max_num_seqs, jnp.int32).at[:ids.shape[0]].set(ids)
        if self.mesh is not None:  # the same sharding as _no_prev: no recompile
            next_tokens = jax.lax.with_sharding_constraint(next_tokens, self._token_sharding)
        return out, next_tokens

    def _copy(self, kv_caches, src, dst):
        return tuple(copy_blocks(c, src, dst, backend=self.attention_backend)
                     for c in kv_caches)

    @staticmethod
    def _gather(kv_caches, block_ids):
        return jnp.stack([c[:, block_ids] for c in kv_caches])

    @staticmethod
    def _scatter(kv_caches, data, block_ids):
        return tuple(c.at[:, block_ids].set(data[i], mode="drop")
                     for i, c in enumerate(kv_caches))

    # ------------------------------------------------------------ warm-up
    def warm_up(self, progress: bool = True) -> float:
        """Compiles every bucket, the block copy and the swap transfers.

        The step buckets compile ahead of time on a thread pool (XLA compiles
        outside the GIL, so they proceed in parallel); `lower().compile()`
        fills the jit cache, so the first real call of a bucket compiles nothing.
        """
        import concurrent.futures
        import os
        from tqdm import tqdm
        t0 = time.perf_counter()
        steps = [(True, b) for b in self.decode_buckets]
        steps += [(False, b) for b in self.prefill_buckets]
        # NOTE: the sampler compiles once per distinct row count of the steps'
        # logits (a decode bucket's size; a prefill step has max_num_seqs rows).
        num_row_counts = len(set(self.decode_buckets) | {self.max_num_seqs})
        bar = tqdm(total=len(steps) + num_row_counts * len(SAMPLER_MODES) + 1
                   + len(self.swap_buckets), desc="compiling buckets", disable=not progress)
        workers = max(1, min(len(steps), os.cpu_count() or 1))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            futures = [pool.submit(self._run, [], decode=d, pad_to=b, compile_only=True)
                       for d, b in steps]
            logits = {}  # row count -> the forward's logits (shape, dtype, sharding)
            for f in concurrent.futures.as_completed(futures):
                info = f.result()
                logits[info.shape[0]] = jax.ShapeDtypeStruct(info.shape, info.dtype,
                                                             sharding=info.sharding)
                bar.update(1)
            assert len(logits) == num_row_counts, "the warm-up's count of sampler compiles is off"
            futures = [pool.submit(self._compile_sampler, x, m)
                       for x in logits.values() for m in SAMPLER_MODES]
            for f in concurrent.futures.as_completed(futures):
                f.result()
                bar.update(1)
        self.copy_blocks([])
        bar.update(1)
        for b in self.swap_buckets:
            data = self._gather_fn(self.kv_caches, np.zeros(b, np.int32))
            self.kv_caches = self._scatter_fn(self.kv_caches, data,
                                              np.full(b, self.num_gpu_blocks, np.int32))
            bar.update(1)
        bar.close()
        jax.block_until_ready(self.kv_caches)
        self.warmup_seconds = time.perf_counter() - t0
        return self.warmup_seconds

    def _compile_sampler(self, logits, modes):
        sampling, _ = self._sampling_inputs([], logits.shape[0])
        self._sample_fn.lower(logits, sampling, modes=modes).compile()

    def _sampling_inputs(self, rows, num_rows):
        """The sampler's tensors for one step, and its modes (SAMPLER_MODES)."""
        sampling, modes = sampler_lib.build_sampling_tensors(
            list(rows), self.vocab_size, num_rows, pad_prompt_to=self.max_model_len,
            pad_output_to=self.max_model_len, fixed_shapes=True, coarse_modes=True)
        modes = dataclasses.replace(modes, num_logprobs=MAX_LOGPROBS)
        return self._place_penalty_tokens(sampling), modes

    # ------------------------------------------------------------ a step
    def dispatch(self, seqs: list[SeqInput], sampling_rows: list[dict], is_prefill: bool,
                 prev: PendingStep | None = None) -> PendingStep:
        """Starts one step on the device and returns without waiting for it.

        sampling_rows: one dict per sampler row (sampler.build_sampling_tensors
        format), in the order of `seqs` (num_samples rows per sequence).
        prev: the step dispatched just before, whose sampled tokens the
        sequences with ``prev_row >= 0`` read.
        A prefill larger than the largest bucket (a recomputed group of many
        sequences) runs as several calls, each within the bucket, and is
        waited for: its PendingStep comes back with ``result`` set.
        """
        if not is_prefill:
            return self._run(seqs, decode=True, sampling_rows=sampling_rows, prev=prev)
        want_prompt = any(s.prompt_next_ids is not None for s in seqs)
        parts, part, tokens = [], [], 0
        for s in seqs:
            if part and tokens + len(s.token_ids) > self.max_num_batched_tokens:
                parts.append(part)
                part, tokens = [], 0
            part.append(s)
            tokens += len(s.token_ids)
        parts.append(part)
        if len(parts) == 1:
            return self._run(seqs, decode=False, sampling_rows=sampling_rows,
                             prompt_logprobs=want_prompt)
        outs, row = [], 0
        for part in parts:
            n = sum(s.num_samples for s in part)
            outs.append(self.fetch(self._run(part, decode=False,
                                             sampling_rows=sampling_rows[row:row + n],
                                             prompt_logprobs=want_prompt)))
            row += n
        result = StepOutput(*(None if x[0] is None else np.concatenate(x)
                              for x in zip(*(dataclasses.astuple(o) for o in outs))))
        return PendingStep(None, None, row, sum(len(s.token_ids) for s in seqs),
                           self._no_prev, result)

    def fetch(self, step: PendingStep) -> StepOutput:
        """Waits for a dispatched step and copies its results to the host."""
        if step.result is None:
            out, plp = jax.device_get((step.out, step.plp))  # the step's device->host sync
            rows, t = step.num_rows, step.num_tokens
            prompt = ((None, None, None) if plp is None else
                      (plp.token_logprobs[:t], plp.topk_token_ids[:t], plp.topk_logprobs[:t]))
            step.result = StepOutput(np.asarray(out.sampled_token_ids)[:rows],
                                     np.asarray(out.sampled_logprobs)[:rows],
                                     np.asarray(out.topk_token_ids)[:rows],
                                     np.asarray(out.topk_logprobs)[:rows], *prompt)
            step.out = step.plp = None
        return step.result

    def _run(self, seqs, *, decode, sampling_rows=(), pad_to=None, prompt_logprobs=False,
             compile_only=False, prev=None):
        bs = self.block_size
        if decode:
            num_seqs_pad = pad_to or _bucket(self.decode_buckets, len(seqs))
            num_tokens_pad = num_seqs_pad
            num_rows_pad = num_seqs_pad
        else:
            total = sum(len(s.token_ids) for s in seqs)
            num_tokens_pad = pad_to or _bucket(self.prefill_buckets, total)
            num_seqs_pad = min(num_tokens_pad, self.max_num_seqs)
            num_rows_pad = self.max_num_seqs
        input_ids = np.zeros(num_tokens_pad, np.int32)
        positions = np.zeros(num_tokens_pad, np.int32)
        slot_mapping = np.full(num_tokens_pad, self.num_slots, np.int32)
        block_tables = np.zeros((num_seqs_pad, self.max_blocks_per_seq), np.int32)
        context_lens = np.zeros(num_seqs_pad, np.int32)
        query_start_loc = np.zeros(num_seqs_pad + 1, np.int32)
        logits_indices = np.zeros(num_rows_pad, np.int32)
        prev_rows = np.full(num_tokens_pad, -1, np.int32)
        prompt_next = (np.full(num_tokens_pad, self.vocab_size, np.int32)
                       if prompt_logprobs else None)
        if decode:
            t = self._fill_decode(seqs, input_ids, positions, slot_mapping, block_tables,
                                  context_lens, query_start_loc, logits_indices, prev_rows)
        else:
            t = row = 0
            for i, s in enumerate(seqs):
                n = len(s.token_ids)
                if s.prev_row >= 0:
                    raise ValueError("a prefill's tokens must all be known on the host")
                pos = np.arange(s.start_pos, s.start_pos + n, dtype=np.int32)
                table = np.asarray(s.block_table, np.int32)
                input_ids[t:t + n] = s.token_ids
                positions[t:t + n] = pos
                slot_mapping[t:t + n] = table[pos // bs] * bs + pos % bs
                block_tables[i, :len(table)] = table
                context_lens[i] = s.start_pos + n
                query_start_loc[i + 1] = t + n
                logits_indices[row:row + s.num_samples] = t + n - 1
                if prompt_next is not None and s.prompt_next_ids is not None:
                    prompt_next[t:t + n] = s.prompt_next_ids
                t += n
                row += s.num_samples
            query_start_loc[len(seqs) + 1:] = t
        if prev is None and (prev_rows >= 0).any():
            raise ValueError("a sequence reads the previous step's token, but no step was given")
        metadata = AttentionMetadata(slot_mapping, block_tables, context_lens,
                                     query_start_loc, is_decode=decode)
        prev_tokens = self._no_prev if prev is None else prev.next_tokens
        args = (self.model.params, self.kv_caches, input_ids, positions, metadata,
                logits_indices, prompt_next, prev_tokens, prev_rows)
        if compile_only:  # warm-up: compile this bucket, run nothing
            return self._forward_fn.lower(*args).compile().out_info[1]
        sampling, modes = self._sampling_inputs(sampling_rows, num_rows_pad)
        self.kv_caches, logits, plp = self._forward_fn(*args)
        out, next_tokens = self._sample_fn(logits, sampling, modes=modes)
        return PendingStep(out, plp, len(sampling_rows), t, next_tokens)

    def _place_penalty_tokens(self, sampling):
        """The penalty stage's [rows, max_model_len] token arrays go to the
        device only when some row has a penalty; otherwise a device-resident
        padding array of that shape stands in (a few MB less to copy per
        step). Both are placed alike, so they share one compiled step."""
        s = sampling
        if np.any((s.repetition_penalties != 1) | (s.presence_penalties != 0)
                  | (s.frequency_penalties != 0)):
            return dataclasses.replace(
                s, output_token_ids=jax.device_put(s.output_token_ids, self._token_sharding),
                prompt_token_ids=jax.device_put(s.prompt_token_ids, self._token_sharding))
        shape = s.output_token_ids.shape
        pad = self._pad_tokens.get(shape)
        if pad is None:
            pad = self._pad_tokens[shape] = jax.device_put(
                np.full(shape, self.vocab_size, np.int32), self._token_sharding)
        return dataclasses.replace(s, output_token_ids=pad, prompt_token_ids=pad)

    def _fill_decode(self, seqs, input_ids, positions, slot_mapping, block_tables,
                     context_lens, query_start_loc, logits_indices, prev_rows) -> int:
        """The decode step's arrays, vectorised: one token per sequence."""
        n, bs = len(seqs), self.block_size
        pos = np.fromiter(map(operator.attrgetter("start_pos"), seqs), np.int32, n)
        prev_rows[:n] = list(map(operator.attrgetter("prev_row"), seqs))
        # a placeholder (-1) input is replaced on the device (prev_rows)
        input_ids[:n] = np.maximum(np.fromiter((s.token_ids[0] for s in seqs), np.int32, n), 0)
        positions[:n] = pos
        tables = list(map(operator.attrgetter("block_table"), seqs))
        num_blocks = np.fromiter(map(len, tables), np.int64, n)
        # NOTE: a boolean mask assigns in row-major order, so row i gets its
        # table in its first num_blocks[i] columns: one pass over all tables.
        block_tables[:n][np.arange(block_tables.shape[1]) < num_blocks[:, None]] = np.fromiter(
            itertools.chain.from_iterable(tables), np.int32)
        assert (pos // bs < num_blocks).all(), "a block table misses its last position's block"
        slot_mapping[:n] = block_tables[np.arange(n), pos // bs] * bs + pos % bs
        context_lens[:n] = pos + 1
        query_start_loc[1:n + 1] = np.arange(1, n + 1)
        query_start_loc[n + 1:] = n
        logits_indices[:n] = np.arange(n)
        return n

    # ------------------------------------------------------------ failures
    def kv_pool_is_valid(self) -> bool:
        """Whether the KV pool's buffers are intact: a jitted call that
        consumed the donated pool and then failed (or was interrupted before
        its result was kept) leaves them deleted or holding an error."""
        try:
            return not any(c.is_deleted() for c in self.kv_caches) and \
                jax.block_until_ready(self.kv_caches) is not None
        except Exception:  # an error the device raised into the buffers
            return False

    def reset_kv_pool(self) -> None:
        """A fresh, zeroed KV pool of the same shape (every block's K/V lost)."""
        for c in self.kv_caches:  # free the old buffers first: two pools may not fit
            if not c.is_deleted():
                c.delete()
        self.kv_caches = self.model.init_kv_caches(self.num_gpu_blocks, self.block_size,
                                                   dtype=self.kv_dtype)

    # ------------------------------------------------------------ block moves
    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write copies of one step, all layers, one launch."""
        n = self.max_num_seqs
        assert len(pairs) <= n, "more copies than sequences in a step"
        src = np.zeros(n, np.int32)
        dst = np.zeros(n, np.int32)  # dst 0: padding, skipped
        for i, (s, d) in enumerate(pairs):
            src[i], dst[i] = s, d
        self.kv_caches = self._copy_fn(self.kv_caches, src, dst)

    def _ensure_cpu_cache(self):
        if self.cpu_cache is None:
            c = self.kv_caches[0]
            self.cpu_cache = np.zeros((len(self.kv_caches), 2, self.num_cpu_blocks)
                                      + c.shape[2:], dtype=c.dtype)

    def swap_out(self, pairs: list[tuple[int, int]]) -> None:
        """Moves (gpu block -> cpu block) pairs to the host pool, gathering
        the blocks on the device so each chunk is one transfer."""
        self._ensure_cpu_cache()
        for lo in range(0, len(pairs), MAX_SWAP_CHUNK):
            chunk = pairs[lo:lo + MAX_SWAP_CHUNK]
            b = _bucket(self.swap_buckets, len(chunk))
            gpu = np.zeros(b, np.int32)
            gpu[:len(chunk)] = [g for g, _ in chunk]
            data = self._gather_fn(self.kv_caches, gpu)
            if self._pinned:
                data = jax.device_put(data, data.sharding.with_memory_kind("pinned_host"))
            self.cpu_cache[:, :, [c for _, c in chunk]] = np.asarray(data)[:, :, :len(chunk)]

    def swap_in(self, pairs: list[tuple[int, int]]) -> None:
        """Moves (cpu block -> gpu block) pairs back, one transfer a chunk."""
        self._ensure_cpu_cache()
        for lo in range(0, len(pairs), MAX_SWAP_CHUNK):
            chunk = pairs[lo:lo + MAX_SWAP_CHUNK]
            b = _bucket(self.swap_buckets, len(chunk))
            data = np.zeros((self.cpu_cache.shape[0], 2, b) + self.cpu_cache.shape[3:],
                            self.cpu_cache.dtype)
            data[:, :, :len(chunk)] = self.cpu_cache[:, :, [c for c, _ in chunk]]
            gpu = np.full(b, self.num_gpu_blocks, np.int32)  # padding: dropped
            gpu[:len(chunk)] = [g for _, g in chunk]
            self.kv_caches = self._scatter_fn(self.kv_caches, self._to_device(data), gpu)

    def _to_device(self, data: np.ndarray):
        if self.mesh is not None:  # jit spreads host data over the mesh (every host's too)
            return data
        if not self._pinned:
            return jnp.asarray(data)
        staged = jax.device_put(data, jax.sharding.SingleDeviceSharding(
            self._device, memory_kind="pinned_host"))
        return jax.device_put(staged, jax.sharding.SingleDeviceSharding(self._device))
