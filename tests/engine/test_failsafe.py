"""A step that fails loses nothing and poisons nothing (jpaged.engine).

Failures (an exception or a KeyboardInterrupt) are injected at every point
of a step, with async scheduling on and off and prefix caching on and off.
Every request must end exactly once, the requests a failure does not
concern must give the tokens of a clean run, every block must be free at
the end, and the engine must then serve the same batch exactly as before
(a prefix-cache entry for a block whose K/V were never written would
change those tokens).
"""
import signal

import numpy as np
import pytest

import models
from jpaged import LLM, SamplingParams
from jpaged.sequence import PLACEHOLDER_TOKEN_ID
from tiny import ENGINE, LLAMA

MODES = [(a, p) for a in (True, False) for p in (False, True)]
MODE_IDS = [f"{'async' if a else 'sync'}-{'prefix' if p else 'noprefix'}" for a, p in MODES]


@pytest.fixture(scope="module")
def llama():
    return models.random_model(LLAMA, dtype="float32", seed=1)


@pytest.fixture(scope="module")
def engines(llama):
    """One LLM per pool (kw), built on first use, switched to the asked
    (async_scheduling, enable_prefix_caching) by LLMEngine.use_block_manager
    (a fresh block manager and scheduler; no recompile): each engine costs a
    warm-up of ~8 s on CI even from the compilation cache."""
    cache = {}

    def get(async_scheduling, prefix_caching, **kw):
        key = tuple(sorted(kw.items()))
        if key not in cache:
            args = dict(ENGINE, num_gpu_blocks=200)
            args.update(kw)
            cache[key] = LLM(llama, use_tqdm_warmup=False, async_scheduling=async_scheduling,
                             enable_prefix_caching=prefix_caching, **args)
        llm = cache[key]
        assert_idle(llm.engine)
        eng = llm.engine
        if (eng.config.async_scheduling, eng.config.enable_prefix_caching) != \
                (async_scheduling, prefix_caching):
            eng.use_block_manager(async_scheduling=async_scheduling,
                                  enable_prefix_caching=prefix_caching)
        return llm
    return get


def assert_idle(eng):
    assert not eng.has_unfinished_requests() and not eng._inflight
    bm = eng.block_manager
    bm.check_invariants()
    assert bm.get_num_free_gpu_blocks() == bm.get_num_total_gpu_blocks()
    assert bm.get_num_free_cpu_blocks() == bm.cpu_allocator.num_usable_blocks
    assert eng.runner.pool.is_valid()
    assert not eng._requests and not eng._states and not eng.output_processor.finished_beams


def batch(seed=0, num=12):
    """Requests sharing a 9-token prefix (full blocks of 4: cache hits), of
    every kind the step loop treats apart: greedy, seeded sampling, n > 1
    (a fork and copy-on-write), beam search, stop ids, penalties."""
    rng = np.random.default_rng(seed)
    base = rng.integers(3, 320, 9).tolist()
    kinds = [SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
             SamplingParams(temperature=0.8, seed=11, max_tokens=7, ignore_eos=True),
             SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=6, ignore_eos=True),
             SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True, logprobs=2),
             SamplingParams(n=2, use_beam_search=True, temperature=0.0, max_tokens=5),
             SamplingParams(temperature=0.7, seed=3, repetition_penalty=1.2, max_tokens=6,
                            ignore_eos=True)]
    return [(f"r{i}", base + rng.integers(3, 320, 2 + i % 5).tolist(), kinds[i % len(kinds)])
            for i in range(num)]


def summary(out):
    if out.error is not None:
        return ("error",)
    return tuple((tuple(c.token_ids), c.finish_reason, round(c.cumulative_logprob, 3))
                 for c in out.outputs)


def add_all(eng, reqs):
    for rid, ids, sp in reqs:
        eng.add_request(rid, None, sp, prompt_token_ids=ids)


def drain(eng, done):
    """Steps until idle; every request may end once only."""
    while eng.has_unfinished_requests():
        for o in eng.step():
            assert o.request_id not in done, f"request {o.request_id} ended twice"
            done[o.request_id] = o
    return done


def run_past_one_interrupt(eng, reqs):
    """Adds reqs and steps until idle; an interrupt (one) is caught and the
    engine stepped on. Returns {request_id: output}."""
    add_all(eng, reqs)
    done = {}
    try:
        drain(eng, done)
    except KeyboardInterrupt:
        drain(eng, done)
    return done


def run_clean(eng, reqs):
    add_all(eng, reqs)
    return {rid: summary(o) for rid, o in drain(eng, {}).items()}


class Inject:
    """Makes obj.name raise `exc` on its k-th call (before or after the real
    call); every other call goes through."""

    def __init__(self, monkeypatch, obj, name, k, exc, after=False):
        self.real, self.k, self.exc, self.after, self.calls = getattr(obj, name), k, exc, after, 0
        monkeypatch.setattr(obj, name, self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.k and not self.after:
            raise self.exc
        out = self.real(*args, **kwargs)
        if self.calls == self.k and self.after:
            raise self.exc
        return out

    @property
    def fired(self):
        return self.calls >= self.k


class LosePool(Inject):
    """The model call consumes the donated KV pool, then its result is lost."""

    def __call__(self, params, kv_caches, *rest, **kw):
        self.calls += 1
        out = self.real(params, kv_caches, *rest, **kw)
        if self.calls == self.k:
            for c in kv_caches:
                if not c.is_deleted():
                    c.delete()
            raise self.exc
        return out


# (where, object, attribute, call number, after the real call)
POINTS = {
    "in-schedule": ("block_manager", "append_slots", 3, False),
    "after-schedule": ("scheduler", "schedule", 3, True),
    "copy-on-write": ("runner", "copy_blocks", 1, False),
    "slot-diff": ("runner", "apply_diff", 3, False),
    "before-prefill": ("runner", "dispatch_prefill", 2, False),
    "after-prefill": ("runner", "dispatch_prefill", 2, True),
    "before-decode": ("runner", "dispatch_decode", 2, False),
    "after-decode": ("runner", "dispatch_decode", 2, True),
    "during-fetch": ("runner", "fetch", 3, False),
    "after-fetch": ("runner", "fetch", 3, True),
    "during-update": ("output_processor", "update", 4, False),
    "mid-group-update": ("output_processor", "_check_stop", 9, False),
}


def inject(monkeypatch, eng, point, exc):
    where, name, k, after = POINTS[point]
    return Inject(monkeypatch, _target(eng, where), name, k, exc, after)


def _target(eng, where):
    return {"engine": eng, "runner": eng.runner, "scheduler": eng.scheduler,
            "block_manager": eng.block_manager, "output_processor": eng.output_processor}[where]


def check_outcome(eng, reqs, ref, done, point, fail_exc, num_failed_steps=1):
    assert sorted(done) == sorted(ref), "a request was lost"
    errors = [rid for rid, o in done.items() if o.error is not None]
    for rid, o in done.items():
        if o.error is None:
            assert summary(o) == ref[rid], f"request {rid} changed by a failure it was not in"
        else:
            assert "the engine step failed" in o.error
            assert [c.finish_reason for c in o.outputs] == ["abort"] * len(o.outputs)
    if fail_exc:
        assert errors, "an exception must fail the requests of its step"
        assert len(errors) < len(reqs), "the requests waiting outside the step must go on"
    else:  # an interrupt rolls back; only a group caught mid-update is failed
        assert len(errors) <= (1 if point in ("during-update", "mid-group-update") else 0)
    assert eng.stats.num_failed_steps == num_failed_steps
    assert_idle(eng)
    assert run_clean(eng, reqs) == ref, "the engine serves the batch differently after a failure"


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("point", sorted(POINTS))
def test_interrupt_at_each_point_rolls_back(engines, monkeypatch, point, mode):
    eng = engines(*mode).engine
    reqs = batch()
    ref = run_clean(eng, reqs)
    eng.stats.num_failed_steps = 0
    hook = inject(monkeypatch, eng, point, KeyboardInterrupt())
    add_all(eng, reqs)
    done = {}
    with pytest.raises(KeyboardInterrupt):
        drain(eng, done)
    assert hook.fired
    assert not any(s.output_token_ids[-1:] == [PLACEHOLDER_TOKEN_ID]
                   for g in eng._requests.values()
                   for s in g.get_seqs()), "a placeholder outlived its step"
    drain(eng, done)
    check_outcome(eng, reqs, ref, done, point, fail_exc=False)


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("point", sorted(POINTS))
def test_exception_at_each_point_fails_only_its_step(engines, monkeypatch, point, mode):
    eng = engines(*mode).engine
    reqs = batch(1)
    ref = run_clean(eng, reqs)
    eng.stats.num_failed_steps = 0
    hook = inject(monkeypatch, eng, point, RuntimeError("injected"))
    add_all(eng, reqs)
    done = drain(eng, {})  # no raise: the failure comes back as error outputs
    assert hook.fired
    check_outcome(eng, reqs, ref, done, point, fail_exc=True)


@pytest.mark.parametrize("call", ["_forward_fn", "_decode_fn"])
# NOTE: exception classes, never instances: a parametrized instance lives as
# long as the session's items, and once raised its traceback holds the test's
# frame, and through it every engine of the module (each ~5,000 memory
# mappings on CPU: a dozen crash LLVM).
@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError], ids=["interrupt", "exception"])
@pytest.mark.parametrize("async_scheduling", [True, False])
def test_lost_kv_pool_is_rebuilt(engines, monkeypatch, exc, async_scheduling, call):
    """A model call that consumed the donated pool and failed: a fresh pool,
    every request with device blocks recomputed or failed, none lost."""
    eng = engines(async_scheduling, True).engine
    reqs = batch(2)
    ref = run_clean(eng, reqs)
    eng.stats.num_failed_steps = 0
    hook = LosePool(monkeypatch, eng.runner, call, 2, exc("injected"))
    done = run_past_one_interrupt(eng, reqs)
    assert hook.fired
    check_outcome(eng, reqs, ref, done, "model-call", fail_exc=issubclass(exc, Exception))


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError], ids=["interrupt", "exception"])
@pytest.mark.parametrize("point", ["during-fetch", "during-update"])
def test_failure_with_two_steps_in_flight(engines, monkeypatch, exc, point):
    """A failure while a ragged step has left the step before it in flight
    (overlap_ragged_updates): both steps are undone like one."""
    eng = engines(True, False).engine
    # (lengths that end at different steps: prompts are admitted while
    # others decode; no beam group, whose steps run one deep)
    reqs = [(f"t{i}", ids, SamplingParams(temperature=0.8 * (i % 2), seed=i, ignore_eos=True,
                                          max_tokens=6 + (11 * i) % 37))
            for i, (_, ids, _) in enumerate(batch(4, num=18))]
    ref = run_clean(eng, reqs)
    eng.stats.num_failed_steps = 0
    target, name = ((eng.runner, "fetch") if point == "during-fetch"
                    else (eng.output_processor, "update"))
    real, fired = getattr(target, name), []

    def hook(*args, **kwargs):
        if not fired and len(eng._inflight) == 2:
            fired.append(True)
            raise exc("injected")
        return real(*args, **kwargs)
    monkeypatch.setattr(target, name, hook)
    done = run_past_one_interrupt(eng, reqs)
    assert fired, "no step left two in flight"
    check_outcome(eng, reqs, ref, done, point, fail_exc=issubclass(exc, Exception))


def test_preemption_with_failures_in_swaps(engines, monkeypatch):
    """A pool that forces swapping: a failure in the swap-out, then one in
    the swap-in, are rolled back like any other."""
    llm = engines(True, False, num_gpu_blocks=24, swap_space=0.01, preemption_mode="swap")
    eng = llm.engine
    rng = np.random.default_rng(3)
    sp = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    reqs = [(f"s{i}", rng.integers(3, 320, 9 + i).tolist(), sp) for i in range(6)]
    ref = run_clean(eng, reqs)
    assert eng.stats.num_swaps_out > 0
    for name in ("swap_out", "swap_in"):
        eng.stats.num_failed_steps = 0
        Inject(monkeypatch, eng.runner, name, 1, KeyboardInterrupt())
        add_all(eng, reqs)
        done = {}
        with pytest.raises(KeyboardInterrupt):
            drain(eng, done)
        drain(eng, done)
        check_outcome(eng, reqs, ref, done, name, fail_exc=False)
        monkeypatch.undo()


@pytest.mark.parametrize("where", ["schedule", "fetch"])
def test_real_sigint(engines, monkeypatch, where):
    """A real Ctrl-C (SIGINT) in host work is held until the step is whole
    (nothing to undo); while waiting for the device it acts at once."""
    eng = engines(True, False).engine
    reqs = batch(4)
    ref = run_clean(eng, reqs)
    eng.stats.num_failed_steps = 0
    obj, name = (eng.block_manager, "append_slots") if where == "schedule" else \
        (eng.runner, "fetch")
    real, calls = getattr(obj, name), []

    def sigint_then_real(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(obj, name, sigint_then_real)
    add_all(eng, reqs)
    done = {}
    with pytest.raises(KeyboardInterrupt):
        drain(eng, done)
    drain(eng, done)
    assert {rid: summary(o) for rid, o in done.items()} == ref
    check_outcome(eng, reqs, ref, done, where, fail_exc=False,
                  num_failed_steps=0 if where == "schedule" else 1)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
@pytest.mark.parametrize("async_scheduling", [True, False])
def test_generate_cleans_up_after_any_exception(engines, monkeypatch, exc, async_scheduling):
    llm = engines(async_scheduling, True)
    eng = llm.engine
    reqs = batch(5)
    prompts = [ids for _, ids, _ in reqs]
    sps = [sp for _, _, sp in reqs]
    ref = [summary(o) for o in llm.generate(prompt_token_ids=prompts, sampling_params=sps,
                                            use_tqdm=False)]
    calls = []
    real = eng.output_processor._check_stop

    def failing(*a):  # an exception in the caller's own code path, mid-run
        calls.append(1)
        if len(calls) == 10:
            raise exc("injected")
        return real(*a)

    monkeypatch.setattr(eng.output_processor, "_check_stop", failing)
    if exc is KeyboardInterrupt:
        with pytest.raises(KeyboardInterrupt):
            llm.generate(prompt_token_ids=prompts, sampling_params=sps, use_tqdm=False)
    else:
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=sps, use_tqdm=False)
        assert any(o.error is not None for o in outs)
        assert all(summary(o) == r for o, r in zip(outs, ref) if o.error is None)
    assert_idle(eng)  # the call's requests are gone, blocks and all
    steps = eng.stats.num_steps
    again = llm.generate(prompt_token_ids=prompts, sampling_params=sps, use_tqdm=False)
    assert [summary(o) for o in again] == ref
    clean_steps = eng.stats.num_steps - steps
    steps = eng.stats.num_steps
    llm.generate(prompt_token_ids=prompts, sampling_params=sps, use_tqdm=False)
    assert eng.stats.num_steps - steps == clean_steps  # no leftover work rode along


# ---------------------------------------------------------------- engine API
def test_request_ids_are_unique_strings(engines):
    llm = engines(True, False)
    eng = llm.engine
    sp = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    for bad in (7, None, b"x", ""):
        with pytest.raises(ValueError, match="request_id must be a non-empty string"):
            eng.add_request(bad, None, sp, prompt_token_ids=[5, 6])
    eng.add_request("0", None, sp, prompt_token_ids=[5, 6, 7])
    with pytest.raises(ValueError, match="already in the engine"):
        eng.add_request("0", None, sp, prompt_token_ids=[5, 6])
    # generate() makes ids of its own: never "0" while that one is live
    outs = llm.generate(prompt_token_ids=[[8, 9, 10], [11, 12]], sampling_params=sp,
                        use_tqdm=False)
    assert "0" not in {o.request_id for o in outs} and all(o.error is None for o in outs)
    assert eng.has_request("0")  # its output waits for its owner
    done = drain(eng, {})
    assert list(done) == ["0"] and len(done["0"].outputs[0].token_ids) == 3
    eng.add_request("1", None, sp, prompt_token_ids=[5, 6, 7])
    eng.abort_request("1")
    eng.abort_request("never-added")
    assert_idle(eng)


def test_prompt_of_exactly_max_model_len_beside_a_running_request(engines):
    """With async scheduling, a sequence that fills max_model_len with its
    in-flight token has no slot for a step run ahead of it."""
    for async_scheduling in (True, False):
        llm = engines(async_scheduling, False)
        rng = np.random.default_rng(6)
        sp = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
        long = rng.integers(3, 320, 64).tolist()    # max_model_len is 64
        edge = rng.integers(3, 320, 60).tolist()    # 60 + 4 tokens = 64 exactly
        short = rng.integers(3, 320, 5).tolist()
        sps = [sp, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), sp, sp]
        outs = llm.generate(prompt_token_ids=[short, edge, long, short], sampling_params=sps,
                            use_tqdm=False)
        assert [len(o.outputs[0].token_ids) for o in outs] == [20, 4, 1, 20]
        assert [o.outputs[0].finish_reason for o in outs] == ["length"] * 4
        alone = llm.generate(prompt_token_ids=[short], sampling_params=sp, use_tqdm=False)
        assert outs[0].outputs[0].token_ids == alone[0].outputs[0].token_ids
        assert_idle(llm.engine)


@pytest.mark.parametrize("prompt, message", [
    (b"hello", "got bytes"),
    (7, "got int"),
    (None, "got NoneType"),
    ({"text": "x"}, "dict prompt"),
    (["a", "b"], "token ids must be ints, got str"),
    ([5, 6.0], "token ids must be ints, got float"),
    ([5, True], "token ids must be ints, got bool"),
    ([5, "6"], "token ids must be ints, got str"),
    ([5, 10_000], "outside the vocabulary"),
    ([5, -1], "outside the vocabulary"),
    ([], "the prompt is empty"),
    (np.array([[5, 6]]), "flat list"),
])
def test_bad_prompts_name_the_request(engines, prompt, message):
    llm = engines(True, False)
    good = [5, 6, 7]
    sp = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    with pytest.raises(ValueError, match=message) as err:
        llm.generate([good, prompt], sp, use_tqdm=False)
    assert "prompt 1" in str(err.value)
    assert_idle(llm.engine)
    with pytest.raises(ValueError, match="request 'x'"):
        llm.engine.add_request("x", None, sp, prompt_token_ids=prompt)
    assert_idle(llm.engine)
    # what is accepted: numpy ids and vLLM's dict prompts, the same tokens as a list
    outs = llm.generate([np.array(good, np.int64), {"prompt_token_ids": good}, good], sp,
                        use_tqdm=False)
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) == 1


def test_stop_token_ids_outside_the_vocabulary(engines):
    llm = engines(True, False)
    sp = SamplingParams(temperature=0.0, max_tokens=3, min_tokens=1, stop_token_ids=[400])
    with pytest.raises(ValueError, match=r"stop_token_ids: token ids \[400\] are outside"):
        llm.generate([[5, 6, 7]], sp, use_tqdm=False)
    assert_idle(llm.engine)


# ---------------------------------------------------------------- fuzz
@pytest.mark.parametrize("mode", MODES + [(True, False, "tight")],
                         ids=MODE_IDS + ["async-tight-pool"])
def test_fuzz_bad_values_and_failures(engines, monkeypatch, mode):
    """Random good and bad requests through LLMEngine and LLM.generate,
    with random failures of random kinds at random points: every request
    that was accepted ends exactly once, with an output or an error; the
    good ones a failure did not touch give their clean tokens; every block
    is free at the end."""
    rng = np.random.default_rng(len(mode) + 2 * mode[0] + mode[1])
    # (24 blocks: the swap test's pool size, compiled once)
    tight = dict(num_gpu_blocks=24, swap_space=0.01) if len(mode) == 3 else {}
    llm = engines(mode[0], mode[1], **tight)
    eng = llm.engine
    good = batch(7, num=6)
    ref = run_clean(eng, good)
    bad_prompts = [b"ab", 3, None, {"x": 1}, ["a"], [1.5], [True], [10**6], [], [-3]]
    bad_params = [None, {"temperature": 0}, "greedy", 0.5]
    points = sorted(POINTS)
    failed_before = eng.stats.num_failed_steps
    for round_ in range(20):
        monkeypatch.undo()
        accepted, done = {}, {}
        for i in range(int(rng.integers(4, 12))):
            rid = f"f{round_}-{i}"
            kind = rng.random()
            if kind < 0.5:
                ref_id, ids, sp = good[int(rng.integers(len(good)))]
                accepted[rid] = ref[ref_id]
            elif kind < 0.7:
                ids, sp = bad_prompts[int(rng.integers(len(bad_prompts)))], good[0][2]
            elif kind < 0.85:
                ids, sp = good[0][1], bad_params[int(rng.integers(len(bad_params)))]
            else:  # too long for the model: accepted, ends with an error output
                ids, sp = rng.integers(3, 320, 70).tolist(), good[0][2]
                accepted[rid] = ("error",)
            if kind >= 0.5 and kind < 0.85:
                with pytest.raises(ValueError):
                    eng.add_request(rid, None, sp, prompt_token_ids=ids)
            else:
                eng.add_request(rid, None, sp, prompt_token_ids=ids)
        if rng.random() < 0.7:
            exc = KeyboardInterrupt() if rng.random() < 0.5 else RuntimeError("injected")
            where, name, _, after = POINTS[points[int(rng.integers(len(points)))]]
            Inject(monkeypatch, _target(eng, where), name, int(rng.integers(1, 4)), exc, after)
        while True:
            try:
                drain(eng, done)
                break
            except KeyboardInterrupt:
                continue
        assert sorted(done) == sorted(accepted)
        for rid, o in done.items():
            if o.error is None or accepted[rid] == ("error",):
                assert summary(o) == accepted[rid], rid
            else:
                assert "the engine step failed" in o.error
        assert_idle(eng)
        # LLM.generate with one bad prompt: a ValueError, nothing queued
        with pytest.raises(ValueError):
            llm.generate([good[0][1], bad_prompts[round_ % len(bad_prompts)]], good[0][2],
                         use_tqdm=False)
        assert_idle(eng)
    monkeypatch.undo()
    assert eng.stats.num_failed_steps - failed_before >= 5  # the failures did happen
    assert run_clean(eng, good) == ref
    assert PLACEHOLDER_TOKEN_ID not in {t for o in llm.generate(
        prompt_token_ids=[g[1] for g in good], sampling_params=[g[2] for g in good],
        use_tqdm=False) for c in o.outputs for t in c.token_ids}
