"""DataParallelEngine: data_parallel_size independent engine replicas behind
one request queue (EngineConfig.data_parallel_size; LLM uses it when > 1).

Replica r is a whole LLMEngine on its own devices, group r of
``parallel.replica_devices`` (devices r * tp to (r + 1) * tp - 1 of
jax.devices()): its own params, KV pool of num_gpu_blocks blocks, slot
state, scheduler and block manager. The weights are loaded once (onto the
first device, as for one engine) and each replica places its own copy.
Nothing is shared between replicas at run time: no collective crosses them.

- Assignment: ``add_request`` gives a request to the replica with the
  fewest unfinished requests (added to it and not yet handed back finished
  by ``step``), ties to the lowest index. A batch added at once is dealt
  out in turn (0, 1, ..., 0, 1, ...); a replica whose requests finish
  sooner gets the next ones. A request stays on its replica to its end
  (preemption and swapping are that replica's business).
- Stepping: ``step`` steps each replica that has work once, in index order,
  in the calling thread. A replica's step dispatches its jitted call before
  it waits for its previous step's results (async scheduling), so the
  replicas' devices run at the same time while the host goes round; a step
  that needs its results on the host before the next one (beam search,
  prompt logprobs, async_scheduling off) keeps the others waiting meanwhile.
- Failures: each replica's step is all or nothing, as in LLMEngine: an
  exception fails that replica's requests of the step with an error output;
  a KeyboardInterrupt propagates after its rollback, and the outputs the
  replicas before it returned in this step come back from the next one.
- Request ids are unique across replicas.

Several processes (jax.distributed, one per host): every replica's group
lies within one process (replica_devices), and each process builds only
the replicas on its own devices (``replica_ids``: their global indices).
The request API (add_request, step, ...) stays per process: a request
added in one process runs on that process's replicas only, and ``stats``
and ``num_requests`` count that process's replicas. LLM.generate splits a
batch that every process receives alike with ``own_indices`` (request i to
process i % P, no communication needed) and returns the full list in every
process through ``gather_outputs``, a collective: a process that fails or
stops before it leaves the others waiting there, as a multi-host tensor
parallel step's collectives would.
"""
from __future__ import annotations

import dataclasses
import pickle

import numpy as np

from jpaged import inputs, parallel
from jpaged.config import EngineConfig
from jpaged.engine import LLMEngine, enable_compilation_cache, load_model
from jpaged.outputs import RequestOutput
from jpaged.sampling_params import SamplingParams
from jpaged.stats import EngineStats


class DataParallelEngine:
    """LLMEngine's request API (add_request, step, abort_request, ...) over
    config.data_parallel_size replicas (``engines``: those on this
    process's devices, ``replica_ids`` their indices among all).

    Args:
      config: the EngineConfig of every replica, data_parallel_size > 1
        among its fields; replica r draws the default seeds of its requests
        from the stream of seed + r (r counted over every process's).
      model, warm_up, progress, block_manager_factory: as LLMEngine's, for
        each replica (model: loaded once, placed per replica).
    Raises:
      ValueError when tensor_parallel_size x data_parallel_size exceeds the
      devices jax sees, with several processes when a replica's devices
      span processes (replica_devices) or this process holds no replica.
    """

    def __init__(self, config: EngineConfig, model=None, warm_up: bool = True,
                 progress: bool = True, block_manager_factory=None):
        import jax
        num = config.data_parallel_size
        groups = parallel.replica_devices(config.tensor_parallel_size, num)
        self.process_index, self.num_processes = jax.process_index(), jax.process_count()
        # NOTE: replica_devices keeps each group within one process
        self.replica_ids = [r for r, g in enumerate(groups)
                            if g[0].process_index == self.process_index]
        if not self.replica_ids:
            raise ValueError(
                f"process {self.process_index} holds no replica: tensor_parallel_size="
                f"{config.tensor_parallel_size} x data_parallel_size={num} covers only "
                f"{config.tensor_parallel_size * num} of the {len(jax.devices())} "
                "devices; with several processes give every process at least one replica "
                "(tp x dp = all devices)")
        enable_compilation_cache()
        if model is None:
            model = load_model(config)
        self.model = model
        self.tokenizer = model.tokenizer
        self.engines = [
            LLMEngine(dataclasses.replace(config, data_parallel_size=1, seed=config.seed + r),
                      model=model, warm_up=warm_up, progress=progress,
                      block_manager_factory=block_manager_factory, devices=groups[r])
            for r in self.replica_ids]
        # the resolved config (max_model_len, token budget) of every replica
        self.config = dataclasses.replace(self.engines[0].config, data_parallel_size=num,
                                          seed=config.seed)
        local = len(self.engines)
        self.num_requests = [0] * local   # added to each of engines (since use_block_manager)
        self._owner: dict[str, int] = {}  # request id -> its index in engines, until finished
        self._load = [0] * local          # per replica: the ids _owner gives it
        self._outputs: list[RequestOutput] = []  # for the next step() to return

    # ------------------------------------------------------------ requests
    def prepare_request(self, request_id, prompt, sampling_params: SamplingParams,
                        prompt_token_ids=None) -> list[int]:
        """LLMEngine.prepare_request, the id checked against every replica."""
        inputs.check_request_id(request_id)
        if self.has_request(request_id):
            raise ValueError(f"request {request_id!r} is already in the engine: request ids "
                             "must be unique among unfinished requests")
        return self.engines[0].prepare_request(request_id, prompt, sampling_params,
                                               prompt_token_ids)

    def add_request(self, request_id: str, prompt: str | None, sampling_params: SamplingParams,
                    prompt_token_ids: list[int] | None = None,
                    arrival_time: float | None = None) -> None:
        """Queues one request on the least-loaded replica (module docstring);
        LLMEngine.add_request's checks and errors."""
        prompt_token_ids = self.prepare_request(request_id, prompt, sampling_params,
                                                prompt_token_ids)
        r = min(range(len(self.engines)), key=self._load.__getitem__)  # (ties: the lowest)
        self.engines[r].add_request(request_id, prompt, sampling_params,
                                    prompt_token_ids=prompt_token_ids, arrival_time=arrival_time)
        self._owner[request_id] = r
        self._load[r] += 1
        self.num_requests[r] += 1

    def abort_request(self, request_id) -> None:
        """Drops one request id (or an iterable of ids) from whichever
        replica holds it (LLMEngine.abort_request); unknown ids are ignored."""
        ids = {request_id} if isinstance(request_id, str) else set(request_id)
        self._outputs = [o for o in self._outputs if o.request_id not in ids]
        mine = [[] for _ in self.engines]
        for rid in ids:
            if rid in self._owner:
                mine[self._owner[rid]].append(rid)
                self._release(rid)
        for engine, rids in zip(self.engines, mine):
            if rids:
                engine.abort_request(rids)

    def clear_arrivals(self) -> None:
        """LLMEngine.clear_arrivals on every replica."""
        for engine in self.engines:
            engine.clear_arrivals()

    def has_request(self, request_id: str) -> bool:
        """Whether the id names a request not yet handed back by step()."""
        return request_id in self._owner or any(
            o.request_id == request_id for o in self._outputs)

    def has_unfinished_requests(self) -> bool:
        """Whether step() has more to do or to return."""
        return bool(self._outputs) or any(e.has_unfinished_requests() for e in self.engines)

    def has_unfinished_seqs(self) -> bool:
        """Whether step() has more to do (outputs kept for return aside)."""
        return any(e.has_unfinished_seqs() for e in self.engines)

    def keep_outputs(self, outputs: list[RequestOutput]) -> None:
        """Hands finished outputs back: the next step() returns them again."""
        self._outputs.extend(outputs)

    # ------------------------------------------------------------ processes
    def own_indices(self, num: int) -> range:
        """Which of a batch of num requests, given alike to every process,
        this process serves: i with i % num_processes == process_index (all
        of them with one process). The same everywhere, so no process needs
        to ask another."""
        return range(self.process_index, num, self.num_processes)

    def gather_outputs(self, outputs: list, num: int) -> list:
        """The whole batch's outputs in input order, in every process, from
        each process's ``outputs`` for its ``own_indices(num)`` (in that
        order; RequestOutputs, or any picklable record per request:
        scripts/generate.py gathers its output records). With several
        processes, a collective that every process must call for the same
        batch (it waits for all of them); with one, ``outputs`` itself."""
        assert len(outputs) == len(self.own_indices(num))
        if self.num_processes == 1:
            return outputs
        from jax.experimental import multihost_utils
        data = np.frombuffer(pickle.dumps(outputs), np.uint8)
        sizes = multihost_utils.process_allgather(np.array([data.size], np.int64))  # [P, 1]
        padded = np.zeros(int(sizes.max()), np.uint8)
        padded[:data.size] = data
        everyone = multihost_utils.process_allgather(padded)  # u8[P, max size]
        per_process = [pickle.loads(everyone[p, :int(sizes[p, 0])].tobytes())
                       for p in range(self.num_processes)]
        return [per_process[i % self.num_processes][i // self.num_processes]
                for i in range(num)]

    def _release(self, request_id: str) -> None:
        r = self._owner.pop(request_id, None)
        if r is not None:
            self._load[r] -= 1

    # ------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        """One LLMEngine.step of every replica with work, in index order;
        returns their outputs (and those kept or held back before)."""
        outputs, self._outputs = self._outputs, []
        try:
            for engine in self.engines:
                if engine.has_unfinished_requests():
                    outputs += engine.step()
        except BaseException:
            self._outputs = outputs  # (their requests stay known: has_request, abort)
            raise
        for out in outputs:
            if out.finished:
                self._release(out.request_id)
        return outputs

    # ------------------------------------------------------------ benchmarks
    @property
    def stats(self) -> EngineStats:
        """The replicas' counters added up, a new EngineStats at each read.
        Times add up to the thread's time (the replicas step one after
        another; warmup_seconds too: they warm up one after another);
        peak_blocks_used is the sum of each replica's peak; the compile
        counters add up each replica's own compiles."""
        total = EngineStats()
        for engine in self.engines:
            for f in dataclasses.fields(EngineStats):
                setattr(total, f.name, getattr(total, f.name) + getattr(engine.stats, f.name))
        return total

    def use_block_manager(self, block_manager_factory=None, num_blocks: int | None = None,
                          **config_changes) -> None:
        """LLMEngine.use_block_manager on every (idle) replica; num_requests
        back to zero."""
        if self.has_unfinished_requests():
            raise RuntimeError("use_block_manager() needs an idle engine")
        for engine in self.engines:
            engine.use_block_manager(block_manager_factory, num_blocks, **config_changes)
        self.config = dataclasses.replace(self.config, **config_changes)
        self.num_requests = [0] * len(self.engines)


def replicas(engine) -> list[LLMEngine]:
    """The LLMEngines behind `engine` (a DataParallelEngine's replicas, or
    the LLMEngine itself): where per-replica state (runner, scheduler,
    block manager) is read."""
    return list(engine.engines) if isinstance(engine, DataParallelEngine) else [engine]
