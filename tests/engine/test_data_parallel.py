"""Data parallelism (jpaged.data_parallel) on 4 virtual CPU devices.

As for tensor parallelism (test_tensor_parallel.py), jax fixes its CPU
device count when its backend starts, so the multi-device runs happen in a
subprocess: this file run as a script with
XLA_FLAGS=--xla_force_host_platform_device_count=4, queued in
tests/background.py's lane (`start_early`). It returns what it saw as JSON;
the tests below assert on it. Its engines compile each step on first use
(warm_up=False): a warm-up would compile every bucket once per replica.
Checks that need no devices run in this process. The multi-host run (two
processes of 2 CPU devices each, jax.distributed on one machine, as in
test_tensor_parallel.py) is this file run with --multihost, twice.
"""
import functools
import json
import os
import sys
import types
from unittest import mock

import numpy as np
import pytest

NUM_DEVICES = 4
# 8 query / 4 KV heads: splits 2 ways for dp 2 x tp 2.
LLAMA = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 4,
         "vocab_size": 128, "max_position_embeddings": 256, "eos_token_id": 2}
# A pool of 12 blocks (of 4 tokens): each replica swaps groups out and back in.
ENGINE = dict(block_size=4, max_num_seqs=4, max_model_len=32, max_num_batched_tokens=16,
              max_decode_window=2, num_gpu_blocks=12, preemption_mode="swap",
              swap_space=16 * 1024 / (1 << 30))
PROMPT_LENS = (3, 9, 5, 14, 7, 11, 4, 12)
TOO_LONG = 40  # > max_model_len: comes back with an error
MAX_TOKENS = 6


# ---------------------------------------------------------------- the worker


def _prompts(lens=PROMPT_LENS, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, LLAMA["vocab_size"], n).tolist() for n in lens]


def _greedy():
    from jpaged import SamplingParams
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


def _run(engine, prompts) -> list:
    """Greedy tokens of the prompts through the engine's request API."""
    for i, p in enumerate(prompts):
        engine.add_request(str(i), None, _greedy(), prompt_token_ids=p)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            done[out.request_id] = out
    return [done[str(i)].outputs[0].token_ids for i in range(len(prompts))]


def _device_ids(tree) -> list:
    import jax
    return sorted({d.id for x in jax.tree.leaves(tree) for d in x.devices()})


def _placement(engine) -> list:
    """Per replica: the device ids its params, KV pool and slot state are on."""
    return [dict(params=_device_ids(e.runner.model.params), pool=_device_ids(e.runner.kv_caches),
                 state=_device_ids(e.runner.state),
                 committed=all(x.committed for x in (e.runner.kv_caches[0],
                                                     e.runner.state.tokens)))
            for e in engine.engines]


def _idle(engine) -> dict:
    """What is left on the front and on every replica."""
    return dict(front=engine.has_unfinished_requests(),
                replicas=[e.has_unfinished_requests() or bool(e._requests)
                          for e in engine.engines],
                free=[e.block_manager.get_num_free_gpu_blocks()
                      == e.block_manager.get_num_total_gpu_blocks() for e in engine.engines])


def _interrupted_run(llm, replica: int, exc: BaseException, prompts) -> dict:
    """llm.generate with replica's second step call raising exc (before it
    runs: the replicas before it have stepped); then what is left, and the
    tokens of the same batch run again."""
    engine = llm.engine.engines[replica]
    real, calls = engine.step, []

    def failing_step():
        calls.append(1)
        if len(calls) == 2:
            raise exc
        return real()
    engine.step = failing_step
    raised = None
    try:
        llm.generate(prompt_token_ids=prompts, sampling_params=_greedy(), use_tqdm=False)
    except BaseException as e:  # (KeyboardInterrupt too)
        raised = type(e).__name__
    finally:
        del engine.step  # the instance attribute: the class's step again
    left = _idle(llm.engine)
    again = llm.generate(prompt_token_ids=prompts, sampling_params=_greedy(), use_tqdm=False)
    return dict(raised=raised, **left, tokens=[o.outputs[0].token_ids for o in again])


def _assignment(engine) -> dict:
    """Where requests go: dealt out in turn, then to the least loaded (ties:
    the lowest index); ids unique across the replicas."""
    def where(rid):
        return [i for i, e in enumerate(engine.engines) if e.has_request(rid)]
    for rid, n in zip(("a0", "a1", "a2"), (3, 4, 5)):
        engine.add_request(rid, None, _greedy(), prompt_token_ids=list(range(3, 3 + n)))
    dealt = [where(r) for r in ("a0", "a1", "a2")]
    engine.abort_request(["a0", "a2"])  # replica 0 idle, replica 1 holds a1
    engine.add_request("b", None, _greedy(), prompt_token_ids=[3, 4])
    engine.add_request("c", None, _greedy(), prompt_token_ids=[3, 4])  # a tie: replica 0
    duplicates = []
    for rid in ("a1", "b"):  # on replica 1, on replica 0
        try:
            engine.add_request(rid, None, _greedy(), prompt_token_ids=[3])
        except ValueError as e:
            duplicates.append(str(e))
    out = dict(dealt=dealt, b=where("b"), c=where("c"), duplicates=duplicates)
    engine.abort_request(["a1", "b", "c"])
    out.update(_idle(engine))
    return out


def _bench(engine, prompts) -> dict:
    """The benchmark harness's offline run (bench_throughput's loop) on the
    front, as the reservation baseline orca-max and back as jpaged."""
    from jpaged.bench import harness
    requests = [types.SimpleNamespace(prompt_token_ids=p) for p in prompts]
    out = {}
    for system in ("orca-max", "jpaged"):
        harness.use_system(engine, system)
        out[system] = harness.run_offline(engine, requests, [_greedy()] * len(prompts),
                                          progress=False)
    return out


def _worker() -> dict:
    import jax
    import models
    import jpaged.llm
    from jpaged import LLM, EngineConfig
    from jpaged.data_parallel import DataParallelEngine
    from jpaged.engine import LLMEngine
    model = models.random_model(LLAMA, seed=1)
    prompts = _prompts()
    out = {"num_devices": len(jax.devices())}
    one = LLMEngine(EngineConfig(model="tiny", **ENGINE), model=model, warm_up=False,
                    progress=False)
    out["dp1"] = _run(one, prompts)
    lazy = functools.partial(DataParallelEngine, warm_up=False)
    with mock.patch.object(jpaged.llm, "DataParallelEngine", lazy):
        llm = LLM(model, use_tqdm_warmup=False, data_parallel_size=2, **ENGINE)
    # a prompt too long for max_model_len in the middle: an error output, in its place
    batch = prompts[:4] + _prompts((TOO_LONG,), seed=1) + prompts[4:]
    outs = llm.generate(prompt_token_ids=batch, sampling_params=_greedy(), use_tqdm=False)
    out["llm_dp2"] = dict(
        tokens=[o.outputs[0].token_ids if o.error is None else None for o in outs],
        errors=[o.error for o in outs], prompts=[o.prompt_token_ids for o in outs],
        num_requests=list(llm.engine.num_requests), placement=_placement(llm.engine),
        num_swaps_in=[e.stats.num_swaps_in for e in llm.engine.engines],
        unique_ids=len({o.request_id for o in outs}), **_idle(llm.engine))
    out["keyboard_interrupt"] = _interrupted_run(llm, 1, KeyboardInterrupt(), prompts)
    out["exception"] = _interrupted_run(llm, 0, RuntimeError("a bug"), prompts)
    out["assignment"] = _assignment(llm.engine)
    out["bench"] = _bench(llm.engine, prompts)
    dp_tp = DataParallelEngine(EngineConfig(model="tiny", tensor_parallel_size=2,
                                            data_parallel_size=2, **ENGINE),
                               model=model, warm_up=False, progress=False)
    out["dp2_tp2"] = dict(tokens=_run(dp_tp, prompts), num_requests=dp_tp.num_requests,
                          placement=_placement(dp_tp))
    try:
        DataParallelEngine(EngineConfig(model="tiny", tensor_parallel_size=2,
                                        data_parallel_size=3, **ENGINE), model=model)
    except ValueError as e:
        out["too_many"] = str(e)
    return out


def _multihost_worker() -> dict:
    """One of two processes with 2 CPU devices each: LLM.generate at dp 4 x
    tp 1 (two replicas in each process) and dp 2 x tp 2 (one in each), the
    batch with a too-long prompt in the middle; then dp 2 x tp 1, whose two
    replicas both lie in process 0."""
    import jax
    import models
    import jpaged.llm
    from jpaged import LLM, EngineConfig
    from jpaged.data_parallel import DataParallelEngine
    model = models.random_model(LLAMA, seed=1)
    prompts = _prompts()
    batch = prompts[:4] + _prompts((TOO_LONG,), seed=1) + prompts[4:]
    lazy = functools.partial(DataParallelEngine, warm_up=False)
    out = dict(process=jax.process_index(), local=[d.id for d in jax.local_devices()])
    for name, tp, dp in (("dp4", 1, 4), ("dp2_tp2", 2, 2)):
        with mock.patch.object(jpaged.llm, "DataParallelEngine", lazy):
            llm = LLM(model, use_tqdm_warmup=False, tensor_parallel_size=tp,
                      data_parallel_size=dp, **ENGINE)
        outs = llm.generate(prompt_token_ids=batch, sampling_params=_greedy(), use_tqdm=False)
        out[name] = dict(
            tokens=[o.outputs[0].token_ids if o.error is None else None for o in outs],
            errors=[o.error for o in outs], prompts=[o.prompt_token_ids for o in outs],
            replica_ids=llm.engine.replica_ids, num_requests=llm.engine.num_requests,
            pools=[p["pool"] for p in _placement(llm.engine)], **_idle(llm.engine))
    try:
        DataParallelEngine(EngineConfig(model="tiny", data_parallel_size=2, **ENGINE),
                           model=model, warm_up=False, progress=False)
        out["no_replica"] = None
    except ValueError as e:
        out["no_replica"] = str(e)
    return out


# ---------------------------------------------------------------- the tests


_JOBS = {}


def _worker_job():
    """The worker's run in the background lane (queued once), its compiled
    steps in a cache directory of its own."""
    import background  # (tests/: not on the path of this file run as a script)
    if "worker" not in _JOBS:
        env = background.cpu_env(NUM_DEVICES)
        if env.get("JPAGED_XLA_CACHE", "off").lower() not in ("off", "0", ""):
            env["JPAGED_XLA_CACHE"] = os.path.join(env["JPAGED_XLA_CACHE"], "dp-worker")
        _JOBS["worker"] = background.run([sys.executable, __file__], env=env, timeout=300)
    return _JOBS["worker"]


def _multihost_job():
    """The two processes of test_two_processes_split_one_batch in the lane."""
    import background
    if "multihost" not in _JOBS:
        _JOBS["multihost"] = background.submit(
            lambda: background.run_processes(background.distributed_commands(
                [sys.executable, __file__, "--multihost"], 2, 2), timeout=300))
    return _JOBS["multihost"]


def start_early(items):
    """Queues the subprocess runs that the selected tests assert on."""
    if any("dp_run" in item.fixturenames for item in items):
        _worker_job()
    if any(item.originalname == "test_two_processes_split_one_batch" for item in items):
        _multihost_job()


@pytest.fixture(scope="module")
def dp_run():
    proc = _worker_job().result()
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_worker_sees_four_devices(dp_run):
    assert dp_run["num_devices"] == NUM_DEVICES


def test_llm_dp2_gives_dp1_tokens_in_input_order(dp_run):
    run = dp_run["llm_dp2"]
    too_long = len(PROMPT_LENS) // 2
    assert run["tokens"][:too_long] + run["tokens"][too_long + 1:] == dp_run["dp1"]
    assert all(len(t) == MAX_TOKENS for t in dp_run["dp1"])
    assert [len(p) for p in run["prompts"]] == [*PROMPT_LENS[:too_long], TOO_LONG,
                                                *PROMPT_LENS[too_long:]]
    assert run["tokens"][too_long] is None and "max_model_len" in run["errors"][too_long]
    assert [e is None for e in run["errors"]].count(False) == 1
    assert run["num_requests"] == [5, 4]  # dealt out in turn: both replicas served
    assert all(n > 0 for n in run["num_swaps_in"])  # blocks came back to each one's device
    assert run["unique_ids"] == len(PROMPT_LENS) + 1
    assert not run["front"] and run["replicas"] == [False, False] and run["free"] == [True, True]


def test_each_replica_lives_on_its_own_device(dp_run):
    for r, where in enumerate(dp_run["llm_dp2"]["placement"]):
        assert where == dict(params=[r], pool=[r], state=[r], committed=True)


def test_dp2_tp2_on_four_devices(dp_run):
    run = dp_run["dp2_tp2"]
    assert run["tokens"] == dp_run["dp1"]
    assert run["num_requests"] == [4, 4]
    assert [p["pool"] for p in run["placement"]] == [[0, 1], [2, 3]]
    assert [p["params"] for p in run["placement"]] == [[0, 1], [2, 3]]
    assert [p["state"] for p in run["placement"]] == [[0, 1], [2, 3]]


@pytest.mark.parametrize("case,raised", [("keyboard_interrupt", "KeyboardInterrupt"),
                                         ("exception", "RuntimeError")])
def test_a_failed_call_leaves_no_request_on_any_replica(dp_run, case, raised):
    run = dp_run[case]
    assert run["raised"] == raised
    assert not run["front"] and run["replicas"] == [False, False]
    assert run["free"] == [True, True]
    assert run["tokens"] == dp_run["dp1"]  # and the engine serves the batch as before


def test_least_loaded_assignment_and_unique_ids(dp_run):
    run = dp_run["assignment"]
    assert run["dealt"] == [[0], [1], [0]]
    assert run["b"] == [0]  # replica 1 still holds a1
    assert run["c"] == [0]  # 1 and 1: the lowest index
    assert len(run["duplicates"]) == 2
    assert all("is already in the engine" in e for e in run["duplicates"])
    assert not run["front"] and run["replicas"] == [False, False] and run["free"] == [True, True]


def test_bench_harness_runs_on_the_replicas(dp_run):
    for system, res in dp_run["bench"].items():
        assert res["num_rejected"] == 0 and res["output_tokens"] == len(PROMPT_LENS) * MAX_TOKENS
        assert [r["num_requests"] for r in res["replicas"]] == [4, 4], system
        assert sum(r["generated_tokens"] for r in res["replicas"]) == res["output_tokens"]
        assert sum(r["num_steps"] for r in res["replicas"]) == res["num_steps"] > 0
        assert 1 <= res["peak_concurrent_seqs"] <= 2 * ENGINE["max_num_seqs"]
        assert res["kv_waste_pct_at_peak"] + res["kv_filled_pct_at_peak"] \
            + res["kv_free_pct_at_peak"] == pytest.approx(100)
    # Orca-Max reserves max_model_len tokens per request; jpaged does not
    assert dp_run["bench"]["orca-max"]["kv_waste_pct_at_peak"] > \
        dp_run["bench"]["jpaged"]["kv_waste_pct_at_peak"]


def test_more_replicas_than_devices_names_both_sizes(dp_run):
    assert dp_run["too_many"] == (
        "tensor_parallel_size=2 x data_parallel_size=3 needs 6 devices, but jax sees 4; on "
        "CPU, set XLA_FLAGS=--xla_force_host_platform_device_count=6 before jax starts")


def test_two_processes_split_one_batch(dp_run):
    """The README's multi-host start-up with data parallelism, on one
    machine: every process gets the same batch, runs request i when i % 2 is
    its index and returns every output, in input order; a replica spanning
    no device of process 1 leaves it none, which is an error there."""
    results = []
    for proc in _multihost_job().result():
        assert proc.returncode == 0, proc.stderr[-4000:]
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert [r["process"] for r in results] == [0, 1]
    too_long = len(PROMPT_LENS) // 2
    for case, replica_ids, num_requests in (("dp4", ([0, 1], [2, 3]), ([3, 2], [2, 2])),
                                            ("dp2_tp2", ([0], [1]), ([5], [4]))):
        for r, ids, counts in zip(results, replica_ids, num_requests):
            run = r[case]
            assert run["tokens"][:too_long] + run["tokens"][too_long + 1:] == dp_run["dp1"]
            assert [len(p) for p in run["prompts"]] == [*PROMPT_LENS[:too_long], TOO_LONG,
                                                        *PROMPT_LENS[too_long:]]
            assert "max_model_len" in run["errors"][too_long]
            assert run["replica_ids"] == ids
            assert run["num_requests"] == counts  # its share: requests 0, 2, ... or 1, 3, ...
            local = r["local"]
            assert run["pools"] == ([[d] for d in local] if case == "dp4" else [local])
            assert not run["front"] and not any(run["replicas"]) and all(run["free"])
        assert results[0][case]["errors"] == results[1][case]["errors"]
    assert results[0]["no_replica"] is None
    assert results[1]["no_replica"] == (
        "process 1 holds no replica: tensor_parallel_size=1 x data_parallel_size=2 covers "
        "only 2 of the 4 devices; with several processes give every process at least one "
        "replica (tp x dp = all devices)")


# Checks that need no extra devices run in this process.


def test_too_few_devices_in_this_process():
    import jax
    import models
    from jpaged import LLM
    n = len(jax.devices())
    with pytest.raises(ValueError, match=rf"tensor_parallel_size=1 x data_parallel_size={n + 1} "
                                         rf"needs {n + 1} devices, but jax sees {n}; on CPU, set "
                                         rf"XLA_FLAGS=--xla_force_host_platform_device_count="
                                         rf"{n + 1}"):
        LLM(models.random_model(LLAMA, seed=1), data_parallel_size=n + 1, **ENGINE)


def test_replica_device_groups_and_multi_host_rule():
    import jax
    from jpaged import parallel
    # 2 processes of 3 devices each: a, b, c on process 0; d, e, f on process 1
    devices = [types.SimpleNamespace(name=c, process_index=i // 3)
               for i, c in enumerate("abcdef")]

    def names(groups):
        return ["".join(d.name for d in g) for g in groups]
    assert names(parallel.replica_devices(2, 3, devices)) == ["ab", "cd", "ef"]
    assert names(parallel.replica_devices(1, 2, devices)) == ["a", "b"]
    with mock.patch.object(jax, "process_count", return_value=2):
        with pytest.raises(ValueError, match=r"replica 1's devices span processes 0, 1 "
                                             r"\(tensor_parallel_size=2, data_parallel_size=3\): "
                                             r"with several processes each replica must fit one "
                                             r"host's devices"):
            parallel.replica_devices(2, 3, devices)
        assert names(parallel.replica_devices(3, 2, devices)) == ["abc", "def"]
        assert names(parallel.replica_devices(1, 6, devices)) == list("abcdef")
        # both on process 0: process 1 holds none, which DataParallelEngine refuses
        assert names(parallel.replica_devices(1, 2, devices)) == ["a", "b"]
        with pytest.raises(ValueError, match=r"tensor_parallel_size must be the number of "
                                             r"devices of all of them \(6\), got 3"):
            parallel.replica_devices(3, 1, devices)
        assert names(parallel.replica_devices(6, 1, devices)) == ["abcdef"]
    with pytest.raises(ValueError, match="data_parallel_size must be an int >= 1, got 0"):
        parallel.replica_devices(1, 0, devices)


def test_stats_add_up_each_replicas_compiles():
    from jpaged.data_parallel import DataParallelEngine
    from jpaged.stats import EngineStats
    dp = DataParallelEngine.__new__(DataParallelEngine)  # (only its replicas' stats read)
    dp.engines = [types.SimpleNamespace(stats=EngineStats(
        num_steps=s, num_compiles=c, compiles_at_warmup=w, warmup_seconds=t))
        for s, c, w, t in ((3, 30, 28, 1.5), (2, 28, 28, 2.0))]
    st = dp.stats
    assert (st.num_steps, st.num_compiles, st.compiles_at_warmup) == (5, 58, 56)
    assert st.compiles_after_warmup == 2 and st.warmup_seconds == 3.5


def test_one_engine_is_one_replica():
    from jpaged import EngineConfig
    from jpaged.engine import LLMEngine
    with pytest.raises(ValueError, match="LLMEngine runs one replica, got data_parallel_size=2"):
        LLMEngine(EngineConfig(data_parallel_size=2), model=object())


if __name__ == "__main__":
    if "--multihost" in sys.argv:
        from jpaged.parallel import initialize_distributed
        initialize_distributed()  # from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID
        print(json.dumps(_multihost_worker()))
    else:
        print(json.dumps(_worker()))
