"""ModelRunner: the jitted steps of one model over the persistent batch.

It holds the model, the KV pool (jpaged.kv_pool) and the device-resident
slot state (jpaged.device_batch), and runs three kinds of jitted calls, each
taking the pool and the state donated and handing them back:

- ``apply_diff``: the host's changes to the slots of one step, one packed
  int32 buffer (jpaged.slots), one transfer;
- a prefill: the model over the prompt tokens of a step (``num_tokens`` in
  powers of two from 16 up to ``max_num_batched_tokens``, with
  ``min(num_tokens, max_num_seqs)`` sequences), then the sampler for its
  rows, which writes the first tokens into their slots;
- a decode window: ``num_steps`` (a power of two up to max_decode_window)
  decode steps of every slot in one ``lax.fori_loop``, sampling, stop rules
  and K/V writes on the device; no host work between them.

Each step's results are one packed i32[num_steps, rows, C] array (token,
logprob bits, top logprobs in the modes that have them), copied to the host
asynchronously from the moment the step is dispatched. The sampler has four
static modes (SAMPLER_MODES), chosen by the host per step; the
sampling settings themselves are traced per-slot values, so a new mix of
settings compiles nothing. Block tables are always
``ceil(max_model_len / block_size)`` wide. ``warm_up`` compiles every
bucket, window and mode; a run then compiles nothing more. Every trace is
counted in the runner's ``stats`` (EngineStats.num_compiles), the one
EngineStats of the engine it serves.

``Runner`` is the surface LLMEngine uses; ModelRunner is the one there is,
and ``LLMEngine(runner=)`` takes one built apart.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

from jpaged import device_batch, parallel, slots as slots_lib
from jpaged import sampler as sampler_lib
from jpaged.config import CacheConfig, ParallelConfig, SchedulerConfig
from jpaged.kv_pool import KVPool, bucket, pow2_buckets
from jpaged.stats import EngineStats
from kernels_pallas import AttentionMetadata
from models.base import compiler_options

# Sampler rows return this many top logprobs in the modes with them (beam search
# asks for 2 * beam_width of them, so beam widths up to 10 fit).
MAX_LOGPROBS = sampler_lib.MAX_LOGPROBS  # (20)
MIN_PREFILL_BUCKET = 16
NO_STATS_KV_BYTES = 1 << 30  # the KV pool on a device that reports no memory (CPU)
# The sampler's static modes, the host picking the least one that covers
# every row of a step (mode_needs, sampler_mode): greedy only; sampling
# (temperature, top-k / top-p, min-p); greedy with top logprobs (beam
# search, greedy logprobs requests); everything (penalties and top logprobs
# with sampling). Off values are no-ops, so a richer mode never changes a
# result. Beam search runs in the modes with top logprobs.
GREEDY = sampler_lib.SamplerModes(all_greedy=True)
RANDOM = sampler_lib.SamplerModes(all_greedy=False, do_top_k_top_p=True, do_min_p=True)
GREEDY_LOGPROBS = sampler_lib.SamplerModes(all_greedy=True, num_logprobs=MAX_LOGPROBS)
FULL = sampler_lib.SamplerModes(all_greedy=False, do_penalties=True, do_top_k_top_p=True,
                                do_min_p=True, num_logprobs=MAX_LOGPROBS)
SAMPLER_MODES = (GREEDY, RANDOM, GREEDY_LOGPROBS, FULL)
# what a request needs of the sampler (mode_needs: OR-ed over a step's requests)
NEEDS_SAMPLING, NEEDS_LOGPROBS, NEEDS_PENALTIES = 1, 2, 4
NEEDS_ALL = 7


@dataclasses.dataclass
class PrefillSeq:
    """One sequence's part of a prefill step (built by the engine).

    token_ids:   the tokens whose K/V this step computes (the uncached tail).
    start_pos:   position of token_ids[0].
    slot:        the sequence's slot (its block-table row is on the device).
    block_table: its block ids (for the new tokens' slot mapping).
    prompt_len:  tokens before it are the prompt, the others generated
                 (the device's penalty counts).
    rows:        its sampler rows, (target slot, counts_from): (slot, -1)
                 for itself, (child slot, slot) for a parallel sample that
                 starts from its prompt.
    prompt_next_ids: for prompt logprobs, the token after each of
                 token_ids (None: not wanted).
    activate:    its prefill ends with this step: the slot goes active.
    decode:      a decode row of a mixed step (chunked prefill): one token,
                 read from the slot on the device with its position, block
                 table and activity (token_ids and block_table unused).
    """
    token_ids: list[int]
    start_pos: int
    slot: int
    block_table: list[int]
    prompt_len: int
    rows: list[tuple[int, int]]
    prompt_next_ids: list[int] | None = None
    activate: bool = True
    decode: bool = False

    @property
    def num_tokens(self) -> int:
        return 1 if self.decode else len(self.token_ids)


@dataclasses.dataclass(frozen=True)
class PrefillLayout:
    """Sections of a prefill's packed i32 input (T tokens, P sequences, R rows)."""
    num_tokens: int
    num_seqs: int
    num_rows: int
    # NOTE: the rows come first: the sampler reads only them, so it compiles
    # once for every bucket.
    FIELDS = (("row_index", "R"), ("row_slot", "R"), ("row_counts_from", "R"),
              ("input_ids", "T"), ("positions", "T"), ("slot_mapping", "T"),
              ("token_slot", "T"), ("token_is_output", "T"), ("token_decode", "T"),
              ("seq_slots", "P"), ("context_lens", "P"), ("seq_decode", "P"),
              ("seq_activate", "P"), ("query_start_loc", "P1"))

    @property
    def rows_size(self) -> int:
        return 3 * self.num_rows

    @staticmethod
    def split_rows(rows):
        """(row_index, row_slot, row_counts_from) of the rows section."""
        r = rows.shape[0] // 3
        return rows[:r], rows[r:2 * r], rows[2 * r:]

    def _size(self, kind):
        return {"T": self.num_tokens, "P": self.num_seqs, "P1": self.num_seqs + 1,
                "R": self.num_rows}[kind]

    @property
    def size(self) -> int:
        return sum(self._size(k) for _, k in self.FIELDS)

    def split(self, buf) -> dict:
        out, at = {}, 0
        for name, kind in self.FIELDS:
            n = self._size(kind)
            out[name] = buf[at:at + n]
            at += n
        return out


@dataclasses.dataclass
class StepOutput:
    """Host copies of a step's results: [num_steps, rows] (a prefill: one
    step, a row per sampler row; a decode window: a row per slot)."""
    token_ids: np.ndarray                   # i32[K, R]  -1 where the slot was inactive
    logprobs: np.ndarray                    # f32[K, R]
    topk_token_ids: np.ndarray | None = None  # i32[K, R, MAX_LOGPROBS] (modes with them)
    topk_logprobs: np.ndarray | None = None   # f32[K, R, MAX_LOGPROBS]
    # Prompt logprobs, one row per computed token of a prefill, when asked for:
    prompt_logprobs: np.ndarray | None = None        # f32[tokens]
    prompt_topk_token_ids: np.ndarray | None = None  # i32[tokens, MAX_LOGPROBS]
    prompt_topk_logprobs: np.ndarray | None = None   # f32[tokens, MAX_LOGPROBS]
    _columns: tuple | None = None

    def columns(self) -> tuple[list, list]:
        """(tokens, logprobs) as Python lists per row: [R][K] (made once)."""
        if self._columns is None:
            self._columns = (self.token_ids.T.tolist(), self.logprobs.T.tolist())
        return self._columns


@dataclasses.dataclass
class PendingStep:
    """A dispatched step whose results are still on the device (``fetch``
    brings them over; their copy to the host started at dispatch)."""
    out: object            # i32[K, R, C] device array
    plp: object            # sampler_lib.PromptLogprobs or None
    num_rows: int
    num_tokens: int
    num_logprobs: int
    result: StepOutput | None = None


def mode_needs(sp) -> int:
    """What a request needs of the sampler: NEEDS_* flags."""
    needs = 0 if sp.temperature < sampler_lib.SAMPLING_EPS or sp.use_beam_search \
        else NEEDS_SAMPLING
    if sp.logprobs is not None or sp.use_beam_search:
        needs |= NEEDS_LOGPROBS
    if sp.presence_penalty != 0 or sp.frequency_penalty != 0 or sp.repetition_penalty != 1:
        needs |= NEEDS_PENALTIES
    return needs


def sampler_mode(needs: int) -> sampler_lib.SamplerModes:
    """The least of SAMPLER_MODES that covers the NEEDS_* flags."""
    return {0: GREEDY, NEEDS_SAMPLING: RANDOM, NEEDS_LOGPROBS: GREEDY_LOGPROBS}.get(needs, FULL)


class Runner(Protocol):
    """What LLMEngine uses of its runner (ModelRunner's methods say more).
    A runner serves one engine at a time: the engine adopts its ``stats``
    as its own EngineStats and owns its slots."""
    # the shapes it was compiled for (LLMEngine checks them against its config)
    block_size: int
    max_num_seqs: int
    max_model_len: int
    max_num_batched_tokens: int
    window_sizes: list[int]        # decode windows: powers of two up to max_decode_window
    eos_token_ids: tuple[int, ...]  # sorted (a constant of the decode step)
    num_gpu_blocks: int            # the KV pool's device blocks, null block 0 included
    num_cpu_blocks: int            # its host blocks (swap space)
    diff_layouts: tuple[slots_lib.SlotDiffLayout, ...]  # what apply_diff takes (SlotDiff's)
    pool: KVPool                   # after a failure: is_valid(), reset()
    stats: EngineStats             # it counts num_compiles, compiles_at_warmup, warmup_seconds

    def warm_up(self, progress: bool = True) -> float: ...
    def apply_diff(self, diff: slots_lib.SlotDiff) -> None: ...
    def dispatch_prefill(self, seqs: list[PrefillSeq], needs: int) -> PendingStep: ...
    def dispatch_decode(self, num_steps: int, needs: int) -> PendingStep: ...
    def fetch(self, step: PendingStep) -> StepOutput: ...
    def copy_blocks(self, pairs) -> None: ...
    def swap_out(self, pairs) -> None: ...
    def swap_in(self, pairs) -> None: ...
    def reset_slots(self) -> None: ...


class ModelRunner:
    """Owns the KV pool, the slot state and the jitted steps of one model
    (the Runner surface)."""

    def __init__(self, model, cache: CacheConfig, scheduler: SchedulerConfig,
                 parallel_config: ParallelConfig, *, attention_backend: str,
                 max_decode_window: int, eos_token_ids, kv_dtype=None, devices=None):
        """cache, scheduler, parallel_config: the engine's sub-configs, each
        whole (jpaged.config; every default is EngineConfig's).

        devices: the tensor_parallel_size devices this runner's params, KV
          pool and slot state live on (a data-parallel replica's group,
          parallel.replica_devices); None: the first tensor_parallel_size of
          jax.devices(), and at tensor_parallel_size 1 this process's first
          device (each process of a multi-host run then runs an engine of
          its own). At tensor_parallel_size 1 every array is committed to
          that one device, so every jitted step runs there.

        Its ``stats`` is a new EngineStats: the engine that runs it adopts
        it as its own, and the runner counts its compiles there.
        """
        tensor_parallel_size = parallel_config.tensor_parallel_size
        block_size, max_model_len = cache.block_size, scheduler.max_model_len
        max_num_seqs = scheduler.max_num_seqs
        max_num_batched_tokens = scheduler.max_num_batched_tokens
        self.tensor_parallel_size = tensor_parallel_size
        if devices is None:
            devices = (jax.local_devices()[:1] if tensor_parallel_size == 1
                       else parallel.replica_devices(tensor_parallel_size)[0])
        assert len(devices) == tensor_parallel_size, "one device per tensor-parallel shard"
        self.devices = list(devices)
        # the first device this process drives: its memory statistics, host staging
        self.device = next(d for d in self.devices if d.process_index == jax.process_index())
        self.mesh = None
        if tensor_parallel_size > 1:  # params and pool sharded over a "tp" mesh
            self.mesh = parallel.make_mesh(tensor_parallel_size, self.devices)
            model = parallel.shard_model(model, self.mesh)
        else:
            model = parallel.place_model(model, self.device)
        self.model = model
        self.attention_backend = attention_backend
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.max_blocks_per_seq = math.ceil(max_model_len / block_size)
        self.vocab_size = model.config.vocab_size
        if self.vocab_size > device_batch.TOKEN_MASK:
            raise ValueError(f"a vocabulary of {self.vocab_size} tokens does not fit a beam "
                             f"proposal's packed id (at most {device_batch.TOKEN_MASK})")
        self.eos_token_ids = tuple(sorted(eos_token_ids))
        self.bytes_per_block = model.kv_bytes_per_block(block_size)
        self.num_gpu_blocks = cache.num_gpu_blocks or self._profile_num_blocks(
            cache.gpu_memory_utilization)
        if self.num_gpu_blocks < 2:
            raise ValueError(
                f"the KV pool has room for {self.num_gpu_blocks} blocks; it needs "
                "at least 2 (block 0 is the null block): raise num_gpu_blocks or "
                "gpu_memory_utilization")
        self.num_cpu_blocks = int(cache.swap_space * (1 << 30) // self.bytes_per_block)
        self.pool = KVPool(model, self.num_gpu_blocks, block_size, self.num_cpu_blocks,
                           max_copies=max_num_seqs, dtype=jnp.dtype(kv_dtype or model.dtype),
                           mesh=self.mesh, device=self.device, backend=attention_backend)
        self.window_sizes = pow2_buckets(1, max_decode_window)
        self.prefill_buckets = pow2_buckets(
            min(MIN_PREFILL_BUCKET, max_num_batched_tokens), max_num_batched_tokens)
        self.diff_layouts = slots_lib.diff_layouts(max_num_seqs, self.max_blocks_per_seq,
                                                   max_decode_window, block_size)
        # the slot state: replicated over the mesh (and pinned so in the
        # steps), or committed to the one device
        self._state_sharding = None
        self._state_placement = jax.sharding.SingleDeviceSharding(self.device)
        if self.mesh is not None:
            self._state_sharding = self._state_placement = parallel.replicated(self.mesh)
        self.state = self._new_state()
        self.stats = EngineStats()
        self._apply_fns = {lay: jax.jit(self._apply, static_argnames=("layout",),
                                        donate_argnums=(0,)) for lay in self.diff_layouts}
        options = compiler_options() or None  # the model's GEMMs (models.base)
        self._forward_fn = jax.jit(self._prefill_forward, static_argnames=("layout",),
                                   donate_argnums=(1, 2), compiler_options=options)
        self._prefill_sample_fn = jax.jit(self._prefill_sample, static_argnames=("mode",),
                                          donate_argnums=(1, 2))
        self._decode_fn = jax.jit(self._decode, static_argnames=("num_steps", "mode"),
                                  donate_argnums=(1, 2), compiler_options=options)

    @property
    def kv_caches(self):
        return self.pool.arrays

    def _new_state(self):
        with jax.default_device(self.device):  # (built there: no copy on another device)
            return device_batch.init_state(self.max_num_seqs, self.max_blocks_per_seq,
                                           self.vocab_size, self._state_placement)

    # ------------------------------------------------------------ sizing
    def _profile_num_blocks(self, utilization: float) -> int:
        """Blocks that fit in `utilization` of the device memory left after
        the weights, keeping room for the largest step's activations."""
        stats = self.device.memory_stats() or {}
        limit = stats.get("bytes_limit")
        if not limit:  # no memory statistics (CPU): a pool of NO_STATS_KV_BYTES
            return max(2, NO_STATS_KV_BYTES // self.bytes_per_block)
        cfg = self.model.config
        activations = self.max_num_batched_tokens * (
            4 * cfg.hidden_size * 4 + 2 * getattr(cfg, "intermediate_size", 4 * cfg.hidden_size) * 4)
        activations += self.max_num_seqs * self.vocab_size * 4 * 4
        # the prompt-logprobs variant holds every token's logits and logprobs
        activations += self.max_num_batched_tokens * self.vocab_size * 4 * 2
        # the slot state's penalty counts and prompt masks
        activations += self.max_num_seqs * self.vocab_size * 5
        free = limit * utilization - stats.get("bytes_in_use", 0) - activations
        return max(0, int(free // (self.bytes_per_block // self.tensor_parallel_size)))

    # ------------------------------------------------------------ jitted bodies
    def _pin(self, state):
        if self._state_sharding is None:
            return state
        return jax.lax.with_sharding_constraint(state, self._state_sharding)

    def _apply(self, state, buf, layout):
        self.stats.num_compiles += 1  # runs only while tracing: counts compilations
        return self._pin(device_batch.apply_diff(state, buf, layout))

    def _prefill_forward(self, params, kv_caches, state, buf, prompt_next_ids, layout):
        """The model over a ragged step's tokens (prompts, chunks, and decode
        rows that read their token from the slot): its rows' logits (and
        prompt logprobs). The step's prompt tokens enter their slots'
        penalty counts (a slot's counts start at 0 when the prefill's first
        chunk fills it); slots whose prefill ends go active."""
        self.stats.num_compiles += 1
        v = layout.split(buf)
        S, bs = self.max_num_seqs, self.block_size
        seq_slot = jnp.minimum(v["seq_slots"], S - 1)
        tables = state.block_tables[seq_slot]
        # decode rows: token, position, slot and context from the slot state
        tok_slot = jnp.minimum(v["token_slot"], S - 1)
        from_slot = v["token_decode"] != 0
        live = from_slot & state.active[tok_slot]
        positions = jnp.where(from_slot, state.positions[tok_slot], v["positions"])
        input_ids = jnp.where(from_slot, state.tokens[tok_slot], v["input_ids"])
        page = jnp.take_along_axis(state.block_tables[tok_slot],
                                   (positions // bs)[:, None], axis=1)[:, 0]
        slot_mapping = jnp.where(from_slot, jnp.where(live, page * bs + positions % bs,
                                                      self.pool.num_slots), v["slot_mapping"])
        seq_live = state.active[seq_slot] & (v["seq_slots"] < S)
        context_lens = jnp.where(v["seq_decode"] != 0,
                                 jnp.where(seq_live, state.positions[seq_slot] + 1, 0),
                                 v["context_lens"])
        metadata = AttentionMetadata(slot_mapping, tables, context_lens,
                                     v["query_start_loc"], is_decode=False)
        # NOTE: a decode row's token is counted already (when it was sampled)
        counted = jnp.where(from_slot, S, v["token_slot"])
        is_output = v["token_is_output"]
        counts = state.counts.at[counted, input_ids].add(is_output, mode="drop")
        prompt_slot = jnp.where(is_output == 0, counted, S)
        in_prompt = state.in_prompt.at[prompt_slot, input_ids].set(True, mode="drop")
        activate = jnp.where(v["seq_activate"] != 0, v["seq_slots"], S)
        active = state.active.at[activate].set(True, mode="drop")
        state = self._pin(dataclasses.replace(state, counts=counts, in_prompt=in_prompt,
                                              active=active))
        if prompt_next_ids is None:
            logits, kv_caches = self.model.apply(params, input_ids, positions,
                                                 kv_caches, metadata, v["row_index"])
            return kv_caches, state, logits, None
        # NOTE: a None vs array argument is a separate jit entry: prompt
        # logprobs need the logits of every token, the usual step only a few.
        logits, kv_caches = self.model.apply(params, input_ids, positions,
                                             kv_caches, metadata, None)
        plp = sampler_lib.prompt_logprobs(logits, prompt_next_ids, MAX_LOGPROBS)
        return kv_caches, state, logits[v["row_index"]], plp

    def _prefill_sample(self, logits, kv, state, rows, mode):
        """A prefill's sampler: parallel samples copy their penalty counts
        from their prompt's slot, then every row samples into its target
        slot. rows: the layout's rows section (the same for every bucket)."""
        self.stats.num_compiles += 1
        _, row_slot, src = PrefillLayout.split_rows(rows)
        S = self.max_num_seqs
        dst = jnp.where(src >= 0, row_slot, S)
        src = jnp.clip(src, 0, S - 1)
        state = dataclasses.replace(
            state, counts=state.counts.at[dst].set(state.counts[src], mode="drop"),
            in_prompt=state.in_prompt.at[dst].set(state.in_prompt[src], mode="drop"))
        slots = jnp.minimum(row_slot, S - 1)
        # (a decode row's slot may have ended in the step before: it samples nothing)
        live = (row_slot < S) & state.active[slots]
        kv, state, out = self._sample_slots(logits, kv, state, slots, live, mode)
        return kv, self._pin(state), out[None]  # one step

    def _sample_slots(self, logits, kv, state, slots, live, mode):
        """Samples the rows (slots: i32[R], live: bool[R]) and records their
        tokens; in the modes with top logprobs beam groups decide theirs
        (device_batch.beam_step), adopting histories in kv."""
        tensors = device_batch.sampling_tensors(state, slots, self.eos_token_ids,
                                                self.vocab_size)
        counts = in_prompt = None
        if mode.do_penalties:
            counts, in_prompt = state.counts[slots], state.in_prompt[slots]
        res = sampler_lib.sample(logits, tensors, mode, counts, in_prompt)
        ended = device_batch.ends(state, slots, res.sampled_token_ids, self.eos_token_ids) & live
        choice, out_live = None, live
        if mode.num_logprobs == MAX_LOGPROBS:  # beam search
            choice, res, ended, out_live = device_batch.beam_step(state, slots, live, res, ended,
                                                                  self.eos_token_ids)
        state = device_batch.record_tokens(state, slots, res.sampled_token_ids, live, ended)
        if choice is not None:
            kv, state = device_batch.finish_beams(kv, state, choice, self.pool.num_blocks)
        return kv, state, device_batch.pack_outputs(res, out_live, mode.num_logprobs)

    def _decode(self, params, kv_caches, state, num_steps, mode):
        """num_steps decode steps of every slot, no host in between."""
        self.stats.num_compiles += 1
        S = self.max_num_seqs
        slots = jnp.arange(S, dtype=jnp.int32)
        width = 2 + 2 * mode.num_logprobs

        def body(i, carry):
            kv, state, out = carry
            metadata = device_batch.decode_metadata(state, self.block_size, self.pool.num_slots)
            logits, kv = self.model.apply(params, state.tokens, state.positions, kv,
                                          metadata, None)
            kv, state, packed = self._sample_slots(logits, kv, state, slots, state.active, mode)
            return kv, self._pin(state), out.at[i].set(packed)

        out = jnp.zeros((num_steps, S, width), jnp.int32)
        return jax.lax.fori_loop(0, num_steps, body, (kv_caches, state, out))

    # ------------------------------------------------------------ warm-up
    def warm_up(self, progress: bool = True) -> float:
        """Compiles every diff layout, prefill bucket, sampler mode, decode
        window, the block copy and the swap transfers.

        The programs compile ahead of time on a thread pool (XLA compiles
        outside the GIL, so they proceed in parallel); `lower().compile()`
        fills the jit cache, so the first real call compiles nothing.
        Records stats.compiles_at_warmup and stats.warmup_seconds; returns
        the seconds.
        """
        import concurrent.futures
        import os
        from tqdm import tqdm
        t0 = time.perf_counter()
        params, kv, state = self.model.params, self.pool.arrays, self.state
        forwards = []
        for t in self.prefill_buckets:
            lay = self._prefill_layout(t)
            buf = np.zeros(lay.size, np.int32)
            forwards.append((self._forward_fn.lower, (params, kv, state, buf, None),
                             dict(layout=lay)))
            forwards.append((self._forward_fn.lower,
                             (params, kv, state, buf, np.zeros(t, np.int32)), dict(layout=lay)))
        jobs = [(self._apply_fns[lay].lower, (state, np.zeros(lay.size, np.int32)),
                 dict(layout=lay)) for lay in self.diff_layouts]
        jobs += [(self._decode_fn.lower, (params, kv, state), dict(num_steps=k, mode=m))
                 for k in self.window_sizes for m in SAMPLER_MODES]
        num_pool = 1 + len(self.pool.swap_buckets)
        bar = tqdm(total=len(forwards) + len(jobs) + len(SAMPLER_MODES) + num_pool,
                   desc="compiling", disable=not progress)
        # NOTE: one at a time on the CPU backend: there, executables read back
        # from the persistent cache on several threads at once aborted the
        # process twice in our test runs (jax 0.11.2); on accelerators the
        # host compiles in parallel.
        workers = 1 if jax.default_backend() == "cpu" else max(1, os.cpu_count() or 1)
        compile_job = lambda f, a, k: f(*a, **k).compile()  # noqa: E731
        with concurrent.futures.ThreadPoolExecutor(workers) as ex:
            first = ex.submit(compile_job, *forwards[0])
            futures = [ex.submit(compile_job, *job) for job in forwards[1:] + jobs]
            # the prefill sampler takes the forward's logits as they come
            # (shape, dtype, sharding): so its first real call compiles nothing
            info = first.result().out_info[2]
            bar.update(1)
            logits = jax.ShapeDtypeStruct(info.shape, info.dtype, sharding=info.sharding)
            rows = np.zeros(self._prefill_layout(self.prefill_buckets[0]).rows_size, np.int32)
            futures += [ex.submit(compile_job, self._prefill_sample_fn.lower,
                                  (logits, kv, state, rows), dict(mode=m)) for m in SAMPLER_MODES]
            for f in concurrent.futures.as_completed(futures):
                f.result()
                bar.update(1)
        bar.update(self.pool.warm_up())
        bar.close()
        jax.block_until_ready(self.pool.arrays)
        self.stats.warmup_seconds = time.perf_counter() - t0
        self.stats.compiles_at_warmup = self.stats.num_compiles
        return self.stats.warmup_seconds

    def _prefill_layout(self, num_tokens: int) -> PrefillLayout:
        return PrefillLayout(num_tokens, min(num_tokens, self.max_num_seqs), self.max_num_seqs)

    # ------------------------------------------------------------ a step
    def apply_diff(self, diff: slots_lib.SlotDiff) -> None:
        """Sends one step's slot changes (one transfer, one launch)."""
        if diff:
            layout, buf = diff.pack()
            self.state = self._apply_fns[layout](self.state, buf, layout=layout)

    def dispatch_decode(self, num_steps: int, needs: int) -> PendingStep:
        """Starts a decode window of num_steps (one of window_sizes) over
        every slot (the sampler mode that covers `needs`, NEEDS_* flags);
        returns without waiting."""
        mode = sampler_mode(needs)
        kv, self.state, out = self._decode_fn(self.model.params, self.pool.arrays, self.state,
                                              num_steps=num_steps, mode=mode)
        self.pool.arrays = kv
        out.copy_to_host_async()
        return PendingStep(out, None, self.max_num_seqs, 0, mode.num_logprobs)

    def dispatch_prefill(self, seqs: list[PrefillSeq], needs: int) -> PendingStep:
        """Starts one prefill step and returns without waiting for it. The
        scheduler keeps every step within max_num_batched_tokens (an
        oversized recomputed group's prefill runs over several steps), so it
        fits the largest bucket."""
        want_prompt = any(s.prompt_next_ids is not None for s in seqs)
        needs = NEEDS_ALL if want_prompt else needs
        assert sum(s.num_tokens for s in seqs) <= self.max_num_batched_tokens, \
            "a prefill step over the token budget: the scheduler splits those"
        return self._prefill(seqs, needs, want_prompt)

    def _prefill(self, seqs, needs, want_prompt) -> PendingStep:
        total = sum(s.num_tokens for s in seqs)
        layout = self._prefill_layout(bucket(self.prefill_buckets, total))
        buf, prompt_next = self._pack_prefill(seqs, layout, want_prompt)
        mode = sampler_mode(needs)
        rows = buf[:layout.rows_size]
        kv, self.state, logits, plp = self._forward_fn(self.model.params, self.pool.arrays,
                                                       self.state, buf, prompt_next,
                                                       layout=layout)
        self.pool.arrays, self.state, out = self._prefill_sample_fn(logits, kv, self.state, rows,
                                                                    mode=mode)
        out.copy_to_host_async()
        return PendingStep(out, plp, sum(len(s.rows) for s in seqs), total, mode.num_logprobs)

    def _pack_prefill(self, seqs, layout, want_prompt):
        S, bs = self.max_num_seqs, self.block_size
        buf = np.zeros(layout.size, np.int32)
        v = layout.split(buf)
        v["slot_mapping"][:] = self.pool.num_slots
        v["token_slot"][:] = S
        v["seq_slots"][:] = S
        v["row_slot"][:] = S
        v["row_counts_from"][:] = -1
        prompt_next = (np.full(layout.num_tokens, self.vocab_size, np.int32)
                       if want_prompt else None)
        t = row = 0
        for i, s in enumerate(seqs):
            v["seq_slots"][i] = s.slot
            if s.decode:
                v["token_slot"][t] = s.slot
                v["token_decode"][t] = v["seq_decode"][i] = 1
                t += 1
            else:
                n = s.num_tokens
                pos = np.arange(s.start_pos, s.start_pos + n, dtype=np.int32)
                table = np.asarray(s.block_table, np.int32)
                v["input_ids"][t:t + n] = s.token_ids
                v["positions"][t:t + n] = pos
                v["slot_mapping"][t:t + n] = table[pos // bs] * bs + pos % bs
                v["token_slot"][t:t + n] = s.slot
                v["token_is_output"][t:t + n] = pos >= s.prompt_len
                v["context_lens"][i] = s.start_pos + n
                v["seq_activate"][i] = s.activate
                if prompt_next is not None and s.prompt_next_ids is not None:
                    prompt_next[t:t + n] = s.prompt_next_ids
                t += n
            for target, counts_from in s.rows:
                v["row_index"][row] = t - 1
                v["row_slot"][row] = target
                v["row_counts_from"][row] = counts_from
                row += 1
            v["query_start_loc"][i + 1] = t
        v["query_start_loc"][len(seqs) + 1:] = t
        return buf, prompt_next

    def fetch(self, step: PendingStep) -> StepOutput:
        """Waits for a dispatched step and brings its results to the host."""
        if step.result is None:
            out = np.asarray(step.out)  # the step's device->host sync
            rows, k = step.num_rows, step.num_logprobs
            out = out[:, :rows]
            topk = (None, None)
            if k:
                topk = (out[:, :, 2:2 + k], out[:, :, 2 + k:2 + 2 * k].view(np.float32))
            prompt = (None, None, None)
            if step.plp is not None:
                plp, t = jax.device_get(step.plp), step.num_tokens
                prompt = (plp.token_logprobs[:t], plp.topk_token_ids[:t], plp.topk_logprobs[:t])
            step.result = StepOutput(out[:, :, 0], out[:, :, 1].view(np.float32), *topk, *prompt)
            step.out = step.plp = None
        return step.result

    # ------------------------------------------------------------ failures
    def reset_slots(self) -> None:
        """Every slot empty (after a failure the host no longer knows what
        the device's slots hold: a failed call may have consumed them)."""
        for x in jax.tree.leaves(self.state):
            try:
                if not x.is_deleted():
                    x.delete()
            except Exception:  # a buffer that holds an error
                pass
        self.state = self._new_state()

    # ------------------------------------------------------------ block moves
    def copy_blocks(self, pairs) -> None:
        self.pool.copy_blocks(pairs)

    def swap_out(self, pairs) -> None:
        self.pool.swap_out(pairs)

    def swap_in(self, pairs) -> None:
        self.pool.swap_in(pairs)
