"""Async scheduling: the next step is dispatched before the previous step's
tokens reach the host (jpaged.engine). It must change nothing but timing:
every test runs the same requests with async_scheduling on and off and
compares the outputs, and checks that steps really ran ahead. Both modes
run on one engine per pool size (LLMEngine.use_block_manager switches the
mode of an idle engine, nothing recompiled: a warm-up per engine is seconds
of tracing and cache loads)."""
import numpy as np
import pytest

import models
from jpaged import LLM, SamplingParams
from jpaged.sequence import PLACEHOLDER_TOKEN_ID
from tiny import ENGINE, LLAMA


@pytest.fixture(scope="module")
def llama():
    return models.random_model(LLAMA, dtype="float32", seed=1)


@pytest.fixture(scope="module")
def llm(llama):
    """The module's engine (ENGINE, a 200-block pool), warmed up once."""
    return LLM(llama, use_tqdm_warmup=False, **dict(ENGINE, num_gpu_blocks=200))


@pytest.fixture(scope="module")
def tiny_pool(llama):
    """A pool too small for the preemption test's batch (24 blocks, the size
    test_engine, test_windows and test_failsafe compile too)."""
    return LLM(llama, use_tqdm_warmup=False, **dict(ENGINE, num_gpu_blocks=24, swap_space=0.01))


def _mode(llm, on, **changes):
    """The idle engine in async mode `on` (and `changes`): a fresh block
    manager and scheduler, zeroed stats."""
    eng = llm.engine
    assert not eng.has_unfinished_requests() and not eng._inflight
    changes.setdefault("overlap_ragged_updates", True)
    eng.use_block_manager(async_scheduling=on, **changes)
    return llm


def _prompts(seed, lengths):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 320, n).tolist() for n in lengths]


def _summary(outs):
    """Everything a user sees, logprobs rounded (float sums differ in order);
    each request by its place in the batch (one LLM numbers the requests of
    all its runs)."""
    rows = []
    for i, o in enumerate(outs):
        for c in o.outputs:
            lps = None if c.logprobs is None else [
                {t: round(v, 4) for t, v in e.items()} for e in c.logprobs]
            rows.append((i, o.error, c.index, tuple(c.token_ids), c.finish_reason,
                         c.stop_reason, round(c.cumulative_logprob, 3), lps))
        if not o.outputs:
            rows.append((i, o.error))
    return rows


def _prompt_logprobs(outs):
    return [None if o.prompt_logprobs is None else [
        None if e is None else {t: round(v, 4) for t, v in e.items()} for e in o.prompt_logprobs]
        for o in outs]


def _assert_all_freed(llm):
    bm = llm.engine.block_manager
    assert bm.get_num_free_gpu_blocks() == bm.get_num_total_gpu_blocks()
    assert not llm.engine._inflight


def _generate(llm, prompts, params, on, **changes):
    _mode(llm, on, **changes)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    return outs, llm.engine.stats.snapshot()


MIXED = [
    SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
    SamplingParams(temperature=0.9, top_p=0.8, top_k=20, seed=1, max_tokens=10, logprobs=2),
    SamplingParams(n=2, best_of=3, temperature=1.2, min_p=0.05, seed=4, max_tokens=9),
    SamplingParams(temperature=0.7, repetition_penalty=1.3, presence_penalty=0.5, seed=5,
                   frequency_penalty=0.2, max_tokens=11),
    SamplingParams(n=2, use_beam_search=True, temperature=0.0, max_tokens=7),
    SamplingParams(temperature=0.0, stop_token_ids=[5, 6, 7, 8, 9, 10, 11, 12], max_tokens=30),
    SamplingParams(temperature=1.0, seed=9, min_tokens=4, stop_token_ids=[20, 21, 22],
                   max_tokens=14),
    SamplingParams(temperature=0.0, prompt_logprobs=2, max_tokens=5),
    SamplingParams(n=3, temperature=0.8, seed=11, max_tokens=16),
    SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True),  # runs into max_model_len
]


def test_mixed_requests_same_outputs_and_steps_run_ahead(llm):
    ps = _prompts(0, [5, 17, 30, 3, 44, 21, 9, 12, 6, 40])
    params = MIXED + [SamplingParams(temperature=0.0, max_tokens=k, ignore_eos=True)
                      for k in (1, 2, 3)]
    ps += _prompts(1, [7, 8, 9])
    on, on_stats = _generate(llm, ps, params, True)
    _assert_all_freed(llm)
    off, off_stats = _generate(llm, ps, params, False)
    _assert_all_freed(llm)
    assert all(o.error is None for o in on)
    assert _summary(on) == _summary(off)
    # (the two runs may batch a prompt with different others: float sums
    # in another order)
    assert _prompt_logprobs(on) == _prompt_logprobs(off)
    assert off_stats["num_steps_ahead"] == 0
    assert on_stats["num_steps_ahead"] > on_stats["num_steps"] // 3
    # the capped request ends at max_model_len, whatever ran ahead of it
    assert len(on[9].outputs[0].token_ids) == 64 - 40


def test_ragged_steps_overlap_the_update_before_them(llm):
    """overlap_ragged_updates: a ragged step leaves the step before it in
    flight, and both are updated after the next dispatch. More requests
    than max_num_seqs, so prompts are admitted between decode windows: the
    outputs equal those with it off, and steps ran two ahead."""
    ps = _prompts(5, [5 + (7 * i) % 37 for i in range(24)])
    params = [MIXED[i % len(MIXED)] for i in range(24)]
    on, on_stats = _generate(llm, ps, params, True)
    _assert_all_freed(llm)
    off, off_stats = _generate(llm, ps, params, True, overlap_ragged_updates=False)
    _assert_all_freed(llm)
    assert all(o.error is None for o in on)
    assert _summary(on) == _summary(off)
    assert _prompt_logprobs(on) == _prompt_logprobs(off)
    assert on_stats["num_steps_two_ahead"] > 0
    assert off_stats["num_steps_two_ahead"] == 0
    assert off_stats["num_steps_ahead"] > 0  # (async scheduling stayed on)


def test_abort_with_two_steps_in_flight(llm):
    """An abort of a request in the older of two in-flight steps, and of one
    still waiting: the others give the tokens of a run without the abort,
    and every block comes back."""
    ps = _prompts(6, [6, 9, 12, 7, 10, 8, 11, 5, 13, 9, 6, 7, 8, 12])
    # (lengths that end at different steps: a prompt is admitted while
    # others still decode, not after all of them ended)
    sps = [SamplingParams(temperature=0.0, max_tokens=6 + (11 * i) % 37, ignore_eos=True)
           for i in range(len(ps))]
    want = [o.outputs[0].token_ids for o in _generate(llm, ps, sps, True)[0]]
    eng = _mode(llm, True).engine
    for i, p in enumerate(ps):
        eng.add_request(str(i), None, sps[i], prompt_token_ids=p)
    done = {}
    while len(eng._inflight) < 2:
        assert eng.has_unfinished_requests(), "no step left two in flight"
        done.update((o.request_id, o) for o in eng.step())
    older = next(s.seq_group.request_id for s in eng._inflight[0].scheduled
                 if not s.seq_group.is_finished())
    waiting = eng.scheduler.waiting[-1].request_id
    eng.abort_request([older, waiting])
    while eng.has_unfinished_requests():
        for o in eng.step():
            assert o.request_id not in done
            done[o.request_id] = o
    assert older not in done and waiting not in done
    assert len(done) == len(ps) - 2
    for rid, o in done.items():
        assert o.outputs[0].token_ids == want[int(rid)], rid
    _assert_all_freed(llm)


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_tiny_pool_preempts_and_gives_the_same_tokens(tiny_pool, mode):
    """A pool too small for the batch: the engine must finish the in-flight
    step before a schedule that preempts, in either preemption mode."""
    ps = _prompts(2, [10, 12, 14, 9, 11, 13])
    sp = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    runs = {}
    for on in (True, False):
        outs, stats = _generate(tiny_pool, ps, sp, on, preemption_mode=mode)
        runs[on] = ([o.outputs[0].token_ids for o in outs], stats,
                    tiny_pool.engine.stats.num_preemptions)
        _assert_all_freed(tiny_pool)
    assert runs[True][0] == runs[False][0]
    assert runs[True][2] > 0 and runs[False][2] > 0
    assert runs[True][1]["num_steps_ahead"] > 0


def test_abort_while_a_step_is_in_flight(llm):
    eng = _mode(llm, True).engine
    ps = _prompts(3, [6, 9, 12])
    sp = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    for i, p in enumerate(ps):
        eng.add_request(str(i), None, sp, prompt_token_ids=p)
    eng.step()  # prefill, left in flight
    eng.step()  # first decode, dispatched before the prefill's tokens came back
    assert eng._inflight and eng._inflight[-1].ahead
    seq = eng.scheduler.running[0].get_seqs()[0]
    assert seq.output_token_ids[-1] == PLACEHOLDER_TOKEN_ID
    eng.abort_request("1")
    done = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            done[o.request_id] = o
    assert sorted(done) == ["0", "2"]
    _assert_all_freed(llm)
    ref, _ = _generate(llm, [ps[0], ps[2]], sp, False)
    assert [done["0"].outputs[0].token_ids, done["2"].outputs[0].token_ids] == \
        [o.outputs[0].token_ids for o in ref]
    assert all(PLACEHOLDER_TOKEN_ID not in o.outputs[0].token_ids for o in done.values())


def test_nothing_compiles_after_warm_up(llm, monkeypatch):
    """The previous step's tokens are a device array of one fixed shape and
    placement, so running ahead reuses the warmed-up executables: counted at
    XLA compile requests (cache loads included), not only at traces."""
    from jax._src import compiler
    calls = []
    real = compiler.compile_or_get_cached

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(compiler, "compile_or_get_cached", spy)
    ps = _prompts(4, [5, 30, 17, 44, 3, 21, 9, 60])
    sps = [SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
           SamplingParams(temperature=0.9, seed=3, max_tokens=12)] * 3
    # penalties send their token arrays from the host: the same executables
    sps += [SamplingParams(temperature=0.7, seed=4, repetition_penalty=1.2, max_tokens=10),
            SamplingParams(temperature=0.0, presence_penalty=0.5, max_tokens=10)]
    outs, stats = _generate(llm, ps, sps, True)
    assert all(o.error is None for o in outs)
    assert stats["num_steps_ahead"] > 0
    assert calls == []
