"""Decode windows: K decode steps in one jitted call, stop rules on the device.

Every test runs the same requests with windows of 1, 4 and 8 tokens
(EngineConfig.max_decode_window) and compares what a user sees: the
device's stop rules must end each sequence exactly where the host's do,
seeded sampling must not depend on the window (its randomness is keyed by
seed and token index), and tokens a window computed past a stop string are
dropped with their blocks.
"""
import numpy as np
import pytest

import models
from jpaged import LLM, SamplingParams
from tiny import ENGINE, LLAMA, tiny_tokenizer

WINDOWS = (1, 4, 8)


@pytest.fixture(scope="module")
def llama():
    m = models.random_model(LLAMA, dtype="float32", seed=1)
    m.tokenizer = tiny_tokenizer()
    return m


@pytest.fixture(scope="module")
def engines(llama):
    cache = {}

    def get(window, **kw):
        key = (window, tuple(sorted(kw.items())))
        if key not in cache:
            args = dict(ENGINE, num_gpu_blocks=200, max_decode_window=window)
            args.update(kw)
            cache[key] = LLM(llama, use_tqdm_warmup=False, **args)
        return cache[key]
    return get


def summary(outs):
    rows = []
    for o in outs:
        rows.append((None, o.error, [
            (tuple(c.token_ids), c.text, c.finish_reason, c.stop_reason,
             round(c.cumulative_logprob, 3),
             None if c.logprobs is None else [{t: round(v, 4) for t, v in e.items()}
                                             for e in c.logprobs])
            for c in o.outputs]))
    return rows


def prompts(seed, lengths):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 256, n).tolist() for n in lengths]


def mixed(greedy_tokens):
    """Requests whose stops fall inside windows: stop ids and EOS taken from
    the model's own greedy output, min_tokens over them, max_tokens of every
    residue modulo the window."""
    t = greedy_tokens
    return [
        SamplingParams(temperature=0.0, max_tokens=13, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=[t[5]]),
        SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=[t[2], t[6]], min_tokens=4),
        SamplingParams(temperature=0.9, top_p=0.9, top_k=40, seed=7, max_tokens=11),
        SamplingParams(n=2, best_of=3, temperature=1.1, seed=3, max_tokens=9, logprobs=2),
        SamplingParams(temperature=0.7, seed=5, repetition_penalty=1.4, presence_penalty=0.3,
                       max_tokens=15),
        SamplingParams(temperature=0.0, max_tokens=1),
        SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True),
    ]


def test_every_window_gives_the_same_outputs(engines):
    base = engines(1)
    ps = prompts(0, [5, 9, 17, 12, 7, 30, 4, 21])
    ps[2] = ps[1]  # requests 1 and 2 stop on ids from this prompt's greedy tokens
    greedy = base.generate(prompt_token_ids=[ps[1]], sampling_params=SamplingParams(
        temperature=0.0, max_tokens=20, ignore_eos=True), use_tqdm=False)[0].outputs[0].token_ids
    sps = mixed(greedy)
    want = None
    for k in WINDOWS:
        llm = engines(k)
        steps = llm.engine.stats.snapshot()
        got = summary(llm.generate(prompt_token_ids=ps, sampling_params=sps, use_tqdm=False))
        if want is None:
            want = got
        assert got == want, f"window {k} changed the outputs"
        st = llm.engine.stats.snapshot()
        decode_calls = st["num_steps"] - steps["num_steps"]
        decode_steps = st["num_decode_steps"] - steps["num_decode_steps"]
        if k > 1:  # windows did run
            assert decode_steps > decode_calls
        bm = llm.engine.block_manager
        assert bm.get_num_free_gpu_blocks() == bm.get_num_total_gpu_blocks()
    # each stop where the host rules put it
    by_tokens = [r[2][0][0] for r in want]
    assert by_tokens[1][-1] == greedy[5] and len(by_tokens[1]) == 6
    held = by_tokens[2]  # its stop ids are banned until 4 tokens, then they end it
    assert len(held) >= 4 and not {greedy[2], greedy[6]} & set(held[:3])
    assert held[-1] in (greedy[2], greedy[6]) or len(held) == 20
    assert [len(by_tokens[i]) for i in (0, 6, 7)] == [13, 1, 3]


def test_seeded_sampling_ignores_the_batch_and_the_window(engines):
    sp = SamplingParams(temperature=1.0, seed=11, max_tokens=12, ignore_eos=True)
    alone = engines(1).generate(prompt_token_ids=[[7, 8, 9]], sampling_params=sp,
                                use_tqdm=False)[0].outputs[0].token_ids
    others = prompts(1, [4, 6, 10, 3, 8])
    for k in WINDOWS:
        outs = engines(k).generate(prompt_token_ids=others + [[7, 8, 9]],
                                   sampling_params=[SamplingParams(temperature=0.0, max_tokens=k + 3)
                                                    ] * len(others) + [sp], use_tqdm=False)
        assert outs[-1].outputs[0].token_ids == alone


def test_stop_string_inside_a_window(engines):
    """The host finds a stop string after the device ran on: the tokens
    past it are dropped, the text is cut, the blocks come back."""
    ps = prompts(2, [6, 11])
    sp = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    full = engines(1).generate(prompt_token_ids=ps, sampling_params=sp, use_tqdm=False)
    stops = []
    for o in full:
        visible = [c for c in o.outputs[0].text if c != "\ufffd"]
        stops.append(visible[len(visible) // 3])
    sps = [SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop=[s]) for s in stops]
    want = summary(engines(1).generate(prompt_token_ids=ps, sampling_params=sps, use_tqdm=False))
    for k in WINDOWS[1:]:
        llm = engines(k)
        assert summary(llm.generate(prompt_token_ids=ps, sampling_params=sps,
                                    use_tqdm=False)) == want
        bm = llm.engine.block_manager
        assert bm.get_num_free_gpu_blocks() == bm.get_num_total_gpu_blocks()
    for (_, _, [(toks, text, reason, stop, _, _)]), o, s in zip(want, full, stops):
        assert reason == "stop" and stop == s and len(toks) < 30
        assert text == o.outputs[0].text[:o.outputs[0].text.index(s)]


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption_and_abort_inside_windows(engines, mode):
    ps = prompts(3, [10, 12, 14, 9, 11, 13])
    sp = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    want = summary(engines(1).generate(prompt_token_ids=ps, sampling_params=sp, use_tqdm=False))
    llm = engines(8, num_gpu_blocks=24, swap_space=0.01, preemption_mode=mode)
    eng = llm.engine
    before = eng.stats.num_preemptions
    assert summary(llm.generate(prompt_token_ids=ps, sampling_params=sp, use_tqdm=False)) == want
    assert eng.stats.num_preemptions > before
    # an abort while a window is in flight
    for i, p in enumerate(ps):
        eng.add_request(f"a{i}", None, sp, prompt_token_ids=p)
    while not (eng._inflight and eng.stats.num_decode_steps > 0
               and eng._inflight[-1].step.num_tokens == 0):
        eng.step()
    eng.abort_request("a2")
    done = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            done[o.request_id] = o
    assert sorted(done) == [f"a{i}" for i in range(6) if i != 2]
    assert [summary([done[f"a{i}"]])[0] for i in range(6) if i != 2] == \
        [w for i, w in enumerate(want) if i != 2]
    bm = eng.block_manager
    assert bm.get_num_free_gpu_blocks() == bm.get_num_total_gpu_blocks()


def test_windows_wait_while_requests_arrive_into_room(engines):
    """Requests that just arrived and fit the batch: one step a call (the
    next arrival is prefilled at the next step); a backlog that cannot be
    admitted, or quiet: windows."""
    llm = engines(8, decode_window_idle_s=3600.0)  # an arrival stays recent
    eng = llm.engine
    sp = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    few = prompts(5, [4, 6, 5])
    # an offline batch added to an idle engine: windows at once
    before = eng.stats.snapshot()
    outs = llm.generate(prompt_token_ids=few, sampling_params=sp, use_tqdm=False)
    assert eng.stats.num_steps - before["num_steps"] <= 3  # a prefill, two windows
    # a request arriving into an idle engine counts too (an online stream between
    # quiet spells), unless its caller declares it an offline batch
    for offline in (False, True):
        eng.add_request("alone", None, sp, prompt_token_ids=few[2])
        if offline:
            eng.clear_arrivals()
        before = eng.stats.snapshot()
        alone = []
        while eng.has_unfinished_requests():
            alone += eng.step()
        calls = eng.stats.num_steps - before["num_steps"]
        decode = eng.stats.num_decode_steps - before["num_decode_steps"]
        assert alone[0].outputs[0].token_ids == outs[2].outputs[0].token_ids
        assert (decode > calls - 1) if offline else (decode == calls - 1)
    # requests arriving while others run: single steps until the arrivals stop
    eng.add_request("first", None, sp, prompt_token_ids=few[0])
    eng.step()  # its prefill: it runs now
    before = eng.stats.snapshot()
    eng.add_request("second", None, sp, prompt_token_ids=few[1])
    done = {}
    while eng.has_unfinished_requests():
        done.update((o.request_id, o) for o in eng.step())
    calls = eng.stats.num_steps - before["num_steps"]
    decode = eng.stats.num_decode_steps - before["num_decode_steps"]
    assert decode == calls - 1  # one prefill (the second), then one token a call
    assert [done[r].outputs[0].token_ids for r in ("first", "second")] == \
        [o.outputs[0].token_ids for o in outs[:2]]
    # arrivals that find the batch full (max_num_seqs 8): a backlog waits, windows run
    many = prompts(6, [5] * 20)
    for i, p in enumerate(many[:8]):
        eng.add_request(f"m{i}", None, sp, prompt_token_ids=p)
    eng.step()
    for i, p in enumerate(many[8:], 8):
        eng.add_request(f"m{i}", None, sp, prompt_token_ids=p)
    windows = []
    while eng.has_unfinished_requests():
        steps = eng.stats.num_decode_steps
        eng.step()
        if eng.scheduler.waiting:
            windows.append(eng.stats.num_decode_steps - steps)
    assert max(windows) > 1


def beams(greedy_tokens):
    """Beam searches of several widths whose beams end inside windows: EOS
    and stop ids taken from the model's greedy output, length penalties,
    early stopping both ways, n < best_of."""
    t = greedy_tokens
    return [
        SamplingParams(n=2, use_beam_search=True, temperature=0.0, max_tokens=10, ignore_eos=True),
        SamplingParams(n=2, best_of=4, use_beam_search=True, temperature=0.0, max_tokens=14,
                       stop_token_ids=[t[3], t[4], t[7]]),
        SamplingParams(n=3, use_beam_search=True, temperature=0.0, max_tokens=12,
                       stop_token_ids=[t[2]], length_penalty=0.5, early_stopping=True),
        SamplingParams(n=2, use_beam_search=True, temperature=0.0, max_tokens=9,
                       stop_token_ids=[t[1], t[5]], early_stopping="never", length_penalty=2.0),
        SamplingParams(n=1, best_of=3, use_beam_search=True, temperature=0.0, max_tokens=7,
                       logprobs=1),
        SamplingParams(temperature=0.0, max_tokens=11, ignore_eos=True),  # beside them
    ]


def test_beam_search_in_windows_gives_the_same_outputs(engines):
    """The device decides each beam step, so beam groups run windows and
    run ahead; what a user sees is the same for every window, the block
    tables stay consistent after every step, and every block comes back."""
    ps = prompts(7, [6, 11, 1, 9, 16, 4])
    greedy = engines(1).generate(prompt_token_ids=[ps[1]], sampling_params=SamplingParams(
        temperature=0.0, max_tokens=12, ignore_eos=True), use_tqdm=False)[0].outputs[0].token_ids
    sps = beams(greedy)
    want = None
    for k in WINDOWS:
        eng = engines(k).engine
        before = eng.stats.snapshot()
        for i, (p, sp) in enumerate(zip(ps, sps)):
            eng.add_request(f"b{i}", None, sp, prompt_token_ids=p)
        done = {}
        while eng.has_unfinished_requests():
            done.update((o.request_id, o) for o in eng.step())
            eng.block_manager.check_invariants()
        got = summary([done[f"b{i}"] for i in range(len(ps))])
        if want is None:
            want = got
        assert got == want, f"window {k} changed the beam search outputs"
        st = eng.stats.snapshot()
        if k > 1:  # windows ran, and steps were dispatched ahead of the last one's results
            assert st["num_decode_steps"] - before["num_decode_steps"] > \
                st["num_steps"] - before["num_steps"]
            assert st["num_steps_ahead"] > before["num_steps_ahead"]
        bm = eng.block_manager
        assert bm.get_num_free_gpu_blocks() == bm.get_num_total_gpu_blocks()
        assert not eng._states and not eng.output_processor.finished_beams
    outs = [r[2] for r in want]
    assert [len(o) for o in outs] == [2, 2, 3, 2, 1, 1]
    assert all(len(c[0]) == 10 for c in outs[0])  # ignore_eos: every beam runs to max_tokens
    scores = [c[4] for c in outs[1]]
    assert scores == sorted(scores, reverse=True) or outs[1][0][2] != outs[1][1][2]


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_beam_search_through_preemption(engines, mode):
    """Beam groups preempted between windows (their beams swapped out
    together, or all recomputed) give the tokens of a large pool."""
    ps = prompts(8, [14, 12, 13, 11])
    sp = SamplingParams(n=2, best_of=4, use_beam_search=True, temperature=0.0, max_tokens=30,
                        ignore_eos=True)
    want = summary(engines(1).generate(prompt_token_ids=ps, sampling_params=sp, use_tqdm=False))
    llm = engines(8, num_gpu_blocks=24, swap_space=0.01, preemption_mode=mode)
    eng = llm.engine
    before = eng.stats.num_preemptions
    assert summary(llm.generate(prompt_token_ids=ps, sampling_params=sp, use_tqdm=False)) == want
    assert eng.stats.num_preemptions > before
    bm = eng.block_manager
    assert bm.get_num_free_gpu_blocks() == bm.get_num_total_gpu_blocks()
