"""End-to-end engine tests on tiny random models (CPU, reference kernels)."""
import gc
import math
import sys

import jax
import numpy as np
import pytest

import models
from jpaged import LLM, SamplingParams
from jpaged.model_runner import SAMPLER_MODES
from kernels_pallas import AttentionMetadata
from tiny import ENGINE, LLAMA, lazy_llm

OPT = {"architectures": ["OPTForCausalLM"], "hidden_size": 64, "ffn_dim": 128,
       "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 320,
       "max_position_embeddings": 256, "word_embed_proj_dim": 64,
       "do_layer_norm_before": True, "eos_token_id": 2}


@pytest.fixture(scope="module")
def llama():
    return models.random_model(LLAMA, dtype="float32", seed=1)


@pytest.fixture(scope="module")
def opt():
    return models.random_model(OPT, dtype="float32", seed=2)


def make_llm(model, **kw):
    args = dict(ENGINE, num_gpu_blocks=200)
    args.update(kw)
    return LLM(model, use_tqdm_warmup=False, **args)


# The small pool of the preemption tests: 24 blocks, the size test_async_scheduling,
# test_windows and test_failsafe use too, so its steps compile once a session
# (a pool size is a shape of every compiled step).
SMALL_POOL = 24
# EngineConfig fields an idle engine changes without a recompile
# (LLMEngine.use_block_manager).
RECONFIGURABLE = ("async_scheduling", "enable_prefix_caching", "enable_chunked_prefill",
                  "preemption_mode", "max_decode_window")


def reconfigure(llm, **changes):
    """The idle shared engine `llm` with a fresh block manager and scheduler
    (an empty prefix cache), zeroed stats, and RECONFIGURABLE at its build
    values except `changes`: a test sees what a new engine of that config
    would give it, without a warm-up (seconds of tracing and cache loads)."""
    eng = llm.engine
    assert not eng.has_unfinished_requests() and not eng._states and not eng._inflight
    bm = eng.block_manager
    assert bm.get_num_free_gpu_blocks() == bm.get_num_total_gpu_blocks()
    eng.use_block_manager(**{**llm.built_with, **changes})
    return llm


def shared_llm(model, **kw):
    """make_llm(model, **kw) that remembers its RECONFIGURABLE values."""
    llm = make_llm(model, **kw)
    llm.built_with = {k: getattr(llm.engine.config, k) for k in RECONFIGURABLE}
    return llm


@pytest.fixture(scope="module")
def llama_llm(llama):
    """One make_llm(llama) (ENGINE, a 200-block pool) for the tests that need
    only an idle engine of that config: each takes it through `default_llm`
    (`reconfigure`d to that config)."""
    return shared_llm(llama)


@pytest.fixture
def default_llm(llama_llm):
    return reconfigure(llama_llm)


@pytest.fixture(scope="module")
def small_pool_llm(llama):
    """One make_llm(llama, num_gpu_blocks=SMALL_POOL) for the preemption
    tests, each taking it through `small_llm`."""
    return shared_llm(llama, num_gpu_blocks=SMALL_POOL)


@pytest.fixture
def small_llm(small_pool_llm):
    """small_llm(**changes): the small-pool engine `reconfigure`d."""
    return lambda **changes: reconfigure(small_pool_llm, **changes)


_DENSE = {}


def dense_last_logits(model, ids, pad=64, block_size=4):
    """Logits of the last token from one prefill of the whole sequence into a
    fresh contiguous cache (blocks 1, 2, 3 ... in order), padded to `pad`
    tokens so every length shares one compiled function."""
    fn = _DENSE.setdefault(id(model), jax.jit(model.apply))
    num_blocks = pad // block_size + 1
    n = len(ids)
    x = np.zeros(pad, np.int32)
    x[:n] = ids
    pos = np.arange(pad, dtype=np.int32)
    slots = np.where(pos < n, pos + block_size, num_blocks * block_size).astype(np.int32)
    md = AttentionMetadata(slots, np.arange(1, num_blocks, dtype=np.int32)[None],
                           np.array([n], np.int32), np.array([0, n], np.int32),
                           is_decode=False)
    logits, _ = fn(model.params, x, pos, model.init_kv_caches(num_blocks, block_size), md,
                   np.array([n - 1], np.int32))
    return np.asarray(logits[0], np.float64)


def dense_greedy(model, prompt, max_tokens):
    """Greedy by full recompute each token: no decode steps, no batching,
    no preemption, no block table other than the contiguous one."""
    ids = list(prompt)
    for _ in range(max_tokens):
        ids.append(int(np.argmax(dense_last_logits(model, ids))))
    return ids[len(prompt):]


def prompts(rng, lengths, vocab=320):
    return [rng.integers(3, vocab, n).tolist() for n in lengths]


GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.mark.parametrize("which", ["llama", "opt"])
def test_paged_greedy_equals_dense_loop(which, request):
    model = request.getfixturevalue(which)
    # (OPT: no other test runs an engine of it; it compiles only the steps it runs)
    llm = request.getfixturevalue("default_llm") if which == "llama" else lazy_llm(
        model, **dict(ENGINE, num_gpu_blocks=200))
    ps = prompts(np.random.default_rng(0), [3, 9, 17, 30])
    outs = llm.generate(prompt_token_ids=ps, sampling_params=GREEDY, use_tqdm=False)
    for p, o in zip(ps, outs):
        assert o.error is None
        assert o.outputs[0].token_ids == dense_greedy(model, p, 8)
        assert o.outputs[0].finish_reason == "length"
        m = o.metrics
        assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_tiny_pool_preempts_and_gives_same_tokens(default_llm, small_llm, mode):
    ps = prompts(np.random.default_rng(1), [10, 12, 14, 9, 11, 13])
    sp = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    big = default_llm.generate(prompt_token_ids=ps, sampling_params=sp, use_tqdm=False)
    llm = small_llm(preemption_mode=mode)
    small = llm.generate(prompt_token_ids=ps, sampling_params=sp, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in small] == [o.outputs[0].token_ids for o in big]
    sched = llm.engine.scheduler
    assert sched.stats.num_preemptions > 0
    # Each request's metrics: its own preemptions, in order times.
    assert sum(o.metrics.num_preemptions for o in small) == sched.stats.num_preemptions
    for o in small:
        m = o.metrics
        assert m.time_in_queue == m.first_scheduled_time - m.arrival_time >= 0
        assert m.first_scheduled_time <= m.first_token_time <= m.last_token_time <= m.finished_time
    if mode == "swap":
        assert sched.stats.num_swaps_out > 0 and sched.stats.num_swaps_in > 0
    bm = llm.engine.block_manager
    assert bm.get_num_free_gpu_blocks() == bm.get_num_total_gpu_blocks()


def test_an_oversized_recomputed_group_prefills_over_steps(default_llm, small_llm, monkeypatch):
    """Chunked prefill off, recompute preemption, a 24-block pool: groups of 4
    sampled sequences (up to 4 x 26 tokens, more than the 64-token step) are
    preempted and recomputed; the scheduler splits their prefills over steps
    (the runner would refuse a step over the budget) and the tokens equal
    those of a pool large enough that nothing is preempted (the default
    engine, chunking on: seeded sampling depends on seed and position
    only)."""
    from jpaged.scheduler import Scheduler
    ps = prompts(np.random.default_rng(4), [14, 12, 13])
    sp = SamplingParams(n=4, temperature=0.8, seed=5, max_tokens=12, ignore_eos=True)
    big = default_llm.generate(prompt_token_ids=ps, sampling_params=sp, use_tqdm=False)
    splits = []
    real = Scheduler._continue_prefills

    def spy(self, out, budget):
        left = real(self, out, budget)
        splits.append(sum(sg.token_chunk_size for sg in out.scheduled_seq_groups))
        return left

    monkeypatch.setattr(Scheduler, "_continue_prefills", spy)
    llm = small_llm(enable_chunked_prefill=False, preemption_mode="recompute")
    small = llm.generate(prompt_token_ids=ps, sampling_params=sp, use_tqdm=False)
    assert llm.engine.scheduler.stats.num_preemptions > 0
    assert splits and all(0 < n <= 64 for n in splits)
    assert [[c.token_ids for c in o.outputs] for o in small] == \
        [[c.token_ids for c in o.outputs] for o in big]
    assert all(len(c.token_ids) == 12 for o in small for c in o.outputs)


def test_invariants_checked_after_every_schedule_when_asked(small_llm, monkeypatch):
    """JPAGED_CHECK_INVARIANTS=1: the block manager's refcounts and tables
    are checked after every schedule, through preemption and swapping."""
    from jpaged.block_manager import BlockSpaceManager
    calls = []
    real = BlockSpaceManager.check_invariants
    monkeypatch.setattr(BlockSpaceManager, "check_invariants",
                        lambda self: (calls.append(1), real(self))[1])
    monkeypatch.setenv("JPAGED_CHECK_INVARIANTS", "1")
    llm = small_llm(preemption_mode="swap")  # (the scheduler reads the variable)
    ps = prompts(np.random.default_rng(1), [10, 12, 14, 9, 11, 13])
    sps = [SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
           SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=20, ignore_eos=True)] * 3
    outs = llm.generate(prompt_token_ids=ps, sampling_params=sps, use_tqdm=False)
    assert all(o.error is None for o in outs) and llm.engine.stats.num_swaps_out > 0
    assert len(calls) >= llm.engine.stats.num_steps > 0


def reference_beam_search(model, prompt, width, max_tokens):
    """Plain beam search on full-recompute logits (no EOS in play)."""
    beams = [(0.0, [])]
    for _ in range(max_tokens):
        cands = []
        for cum, out in beams:
            logits = dense_last_logits(model, list(prompt) + out)
            lp = logits - logits.max()
            lp = lp - math.log(np.exp(lp).sum())
            for t in np.argsort(-lp)[:width]:
                cands.append((cum + lp[t], out + [int(t)]))
        cands.sort(key=lambda c: -c[0])
        beams = cands[:width]
    return beams


def test_beam_search_equals_reference(llama, default_llm):
    p = prompts(np.random.default_rng(2), [7])[0]
    sp = SamplingParams(n=2, best_of=3, use_beam_search=True, temperature=0.0,
                        max_tokens=5, ignore_eos=True)
    out = default_llm.generate(prompt_token_ids=[p], sampling_params=sp, use_tqdm=False)[0]
    ref = reference_beam_search(llama, p, 3, 5)[:2]
    assert [c.token_ids for c in out.outputs] == [r[1] for r in ref]
    for c, r in zip(out.outputs, ref):
        assert c.cumulative_logprob == pytest.approx(r[0], abs=1e-3)


def test_beams_that_lose_leave_the_group(llama, default_llm):
    """A beam group holds at most its width of sequences at every step (the
    beams that lost are dropped, with their state), runs its steps in decode
    windows (fewer engine steps than tokens), and gives the tokens of the
    reference."""
    p = prompts(np.random.default_rng(2), [7])[0]
    sp = SamplingParams(n=2, best_of=3, use_beam_search=True, temperature=0.0,
                        max_tokens=12, ignore_eos=True)
    eng = default_llm.engine
    eng.add_request("beams", None, sp, prompt_token_ids=p)
    sizes, outs = [], []
    while eng.has_unfinished_requests():
        outs += eng.step()
        if "beams" in eng._requests:
            sizes.append(len(eng._requests["beams"].seqs_dict))
    assert max(sizes) <= 3 and 2 <= len(sizes) < 12
    assert not eng._states
    ref = reference_beam_search(llama, p, 3, 12)[:2]
    assert [c.token_ids for c in outs[-1].outputs] == [r[1] for r in ref]


def test_parallel_sampling_is_reproducible_and_batch_invariant(default_llm):
    p = prompts(np.random.default_rng(3), [6])[0]
    others = prompts(np.random.default_rng(4), [5, 11])
    sp = SamplingParams(n=3, temperature=1.0, seed=123, max_tokens=8, ignore_eos=True)
    llm = default_llm
    a = llm.generate(prompt_token_ids=[p], sampling_params=sp, use_tqdm=False)[0]
    b = llm.generate(prompt_token_ids=others + [p],
                     sampling_params=[SamplingParams(temperature=0.7, max_tokens=5)] * 2 + [sp],
                     use_tqdm=False)[2]
    toks = [c.token_ids for c in a.outputs]
    assert toks == [c.token_ids for c in b.outputs]
    assert len(toks) == 3 and len({tuple(t) for t in toks}) > 1


def test_prefix_caching_same_tokens_and_fewer_prefill_tokens(default_llm):
    rng = np.random.default_rng(5)
    prefix = rng.integers(3, 320, 24).tolist()
    ps = [prefix + rng.integers(3, 320, n).tolist() for n in (3, 5, 7)]
    results = {}
    for caching in (False, True):
        # (the shared engine, its stats zeroed; caching on: a fresh, empty cache)
        llm = reconfigure(default_llm, enable_prefix_caching=caching)
        first = llm.generate(prompt_token_ids=ps[:1], sampling_params=GREEDY, use_tqdm=False)
        rest = llm.generate(prompt_token_ids=ps[1:], sampling_params=GREEDY, use_tqdm=False)
        results[caching] = ([o.outputs[0].token_ids for o in first + rest],
                            llm.engine.stats.num_prefill_tokens)
    assert results[True][0] == results[False][0]
    assert results[False][1] == sum(len(p) for p in ps)
    # the two later prompts each reuse the 24-token prefix (6 full blocks of 4)
    assert results[True][1] == results[False][1] - 2 * 24


@pytest.mark.parametrize("kind", ["parallel", "beam"])
def test_sharing_uses_fewer_blocks(default_llm, kind):
    p = prompts(np.random.default_rng(6), [30])[0]
    if kind == "parallel":
        shared = SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=6, ignore_eos=True)
    else:
        shared = SamplingParams(n=4, use_beam_search=True, temperature=0.0, max_tokens=6,
                                ignore_eos=True)
    single = SamplingParams(temperature=1.0, seed=7, max_tokens=6, ignore_eos=True)
    # one engine, its stats zeroed before each run (each peak is that run's)
    llm, stats = default_llm, default_llm.engine.stats
    llm.generate(prompt_token_ids=[p], sampling_params=shared, use_tqdm=False)
    peak_shared = stats.peak_blocks_used
    stats.reset()
    llm.generate(prompt_token_ids=[p] * 4, sampling_params=single, use_tqdm=False)
    # unshared: 4 x (8 prompt blocks + 1-2 output blocks); shared: one prompt copy
    assert peak_shared < stats.peak_blocks_used - 15


def test_no_compilation_after_warm_up(small_llm):
    llm = small_llm(enable_prefix_caching=True)
    runner, stats = llm.engine.runner, llm.engine.stats
    traces = stats.num_compiles
    # per prefill bucket two forwards (prompt logprobs or not), the prefill
    # sampler's modes, a decode window per size and mode, the diff layouts
    # (the shared engine's other runs, before this one, traced nothing
    # either; the compile counters survived their stats resets)
    assert traces == stats.compiles_at_warmup == (
        2 * len(runner.prefill_buckets) + len(SAMPLER_MODES)
        + len(runner.window_sizes) * len(SAMPLER_MODES) + len(runner.diff_layouts))
    assert stats.warmup_seconds > 0 and stats.num_steps == 0
    rng = np.random.default_rng(8)
    sps = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
           SamplingParams(temperature=0.9, top_p=0.8, top_k=20, seed=1, max_tokens=10),
           SamplingParams(n=2, best_of=3, temperature=1.2, min_p=0.05, max_tokens=9),
           SamplingParams(temperature=0.5, repetition_penalty=1.3, presence_penalty=0.5,
                          frequency_penalty=0.2, max_tokens=11, logprobs=3),
           SamplingParams(n=2, use_beam_search=True, temperature=0.0, max_tokens=7),
           SamplingParams(temperature=0.0, stop_token_ids=[5, 6, 7], max_tokens=15)]
    ps = prompts(rng, [5, 17, 30, 3, 44, 21])
    outs = llm.generate(prompt_token_ids=ps, sampling_params=sps, use_tqdm=False)
    assert all(o.error is None and o.outputs for o in outs)
    assert llm.engine.stats.num_preemptions > 0  # the small pool forced some
    assert stats.num_compiles == traces and stats.compiles_after_warmup == 0


def test_bad_requests_get_errors_and_others_finish(llama, default_llm):
    llm = default_llm
    good = prompts(np.random.default_rng(9), [5, 6])
    too_long = list(range(3, 3 + 70))  # max_model_len is 64
    outs = llm.generate(prompt_token_ids=[good[0], too_long, good[1]],
                        sampling_params=GREEDY, use_tqdm=False)
    assert outs[1].error is not None and "64" in outs[1].error
    assert [(c.token_ids, c.finish_reason) for c in outs[1].outputs] == [([], "abort")]
    assert [o.outputs[0].token_ids for o in (outs[0], outs[2])] == \
        [dense_greedy(llama, p, 8) for p in good]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate(prompt_token_ids=[good[0], [1, 2, 10_000]], sampling_params=GREEDY)
    assert not llm.engine.has_unfinished_requests()  # nothing half-queued
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.generate(["a text prompt"], GREEDY)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)
    with pytest.raises(ValueError, match="empty"):
        llm.generate(prompt_token_ids=[[]], sampling_params=GREEDY)


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_soak_thousand_requests(small_llm, mode):
    rng = np.random.default_rng(10 if mode == "swap" else 11)
    llm = small_llm(preemption_mode=mode)  # (ENGINE's max_num_seqs: 8)
    eng = llm.engine

    def batch(k):
        ps, sps = [], []
        for _ in range(k):
            ps.append(rng.integers(3, 320, int(rng.integers(1, 40))).tolist())
            r = rng.random()
            if r < 0.15:
                sps.append(SamplingParams(n=2, use_beam_search=True, temperature=0.0,
                                          max_tokens=int(rng.integers(1, 6))))
            elif r < 0.35:
                sps.append(SamplingParams(n=int(rng.integers(1, 4)), temperature=1.0,
                                          seed=int(rng.integers(0, 99)),
                                          max_tokens=int(rng.integers(1, 8))))
            else:
                sps.append(SamplingParams(temperature=float(rng.choice([0.0, 0.8])),
                                          stop_token_ids=[int(rng.integers(3, 320))],
                                          max_tokens=int(rng.integers(1, 10))))
        return ps, sps

    # NOTE: not tracemalloc: stopping it races with numpy's untracking from
    # XLA's threads and crashed CPython 3.12.1 (seen in CI). Live pymalloc
    # blocks show a leak of per-request Python state just as well.
    seen = set()
    sizes = []
    for round_ in range(4):
        ps, sps = batch(250)
        outs = llm.generate(prompt_token_ids=ps, sampling_params=sps, use_tqdm=False)
        for o, sp in zip(outs, sps):
            assert o.request_id not in seen
            seen.add(o.request_id)
            assert o.finished and o.error is None and len(o.outputs) == sp.n
            assert all(1 <= len(c.token_ids) <= sp.max_tokens for c in o.outputs)
        bm = eng.block_manager
        assert bm.get_num_free_gpu_blocks() == bm.get_num_total_gpu_blocks()
        assert not eng._states and not eng.output_processor.finished_beams
        gc.collect()
        sizes.append(sys.getallocatedblocks())
    assert len(seen) == 1000
    assert eng.stats.num_preemptions > 0
    # Host memory stays flat: a request that left anything behind (its state,
    # its tokens, its output) would add 10+ blocks; 500 of them add <1,000.
    assert sizes[-1] - sizes[1] < 5 * 500


def test_prompt_logprobs_and_min_tokens(llama, default_llm):
    p = prompts(np.random.default_rng(12), [9])[0]
    llm = default_llm
    sp = SamplingParams(temperature=0.0, max_tokens=3, prompt_logprobs=4, logprobs=2,
                        ignore_eos=True)
    out = llm.generate(prompt_token_ids=[p], sampling_params=sp, use_tqdm=False)[0]
    logits = llama.logits(p).astype(np.float64)
    ref = logits - logits.max(-1, keepdims=True)
    ref = ref - np.log(np.exp(ref).sum(-1, keepdims=True))
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(p)
    for i in range(1, len(p)):
        entry = out.prompt_logprobs[i]
        assert entry[p[i]] == pytest.approx(ref[i - 1, p[i]], abs=1e-4)
        top = np.argsort(-ref[i - 1])[:4]
        assert set(int(t) for t in top) <= set(entry)
    assert all(len(e) <= 3 for e in out.outputs[0].logprobs)  # top 2 + the sampled one
    # min_tokens: a stop id that greedy decoding would emit first cannot end it early.
    first = out.outputs[0].token_ids[0]
    stop = SamplingParams(temperature=0.0, max_tokens=6, stop_token_ids=[first])
    early = llm.generate(prompt_token_ids=[p], sampling_params=stop, use_tqdm=False)[0]
    assert early.outputs[0].token_ids == [first] and early.outputs[0].finish_reason == "stop"
    held = SamplingParams(temperature=0.0, max_tokens=6, stop_token_ids=[first], min_tokens=3)
    late = llm.generate(prompt_token_ids=[p], sampling_params=held, use_tqdm=False)[0]
    toks = late.outputs[0].token_ids
    assert len(toks) >= 3 and first not in toks[:3]


@pytest.fixture(scope="module")
def chatty():
    """A tiny random model wearing SmolLM2's real tokenizer and chat template."""
    from models.gguf import find_default_model
    from models.tokenizer import tokenizer_from_gguf
    tok = tokenizer_from_gguf(find_default_model("smollm2-135m"))
    cfg = dict(LLAMA, vocab_size=len(tok), eos_token_id=tok.eos_token_id)
    m = models.random_model(cfg, dtype="float32", seed=3)
    m.tokenizer = tok
    return m


def test_text_prompts_stop_strings_and_chat(chatty):
    llm = lazy_llm(chatty, **dict(ENGINE, num_gpu_blocks=200))  # (its vocabulary: no other test's)
    tok = chatty.tokenizer
    base = llm.generate(["Once upon a time"], SamplingParams(temperature=0.0, max_tokens=12,
                                                           ignore_eos=True), use_tqdm=False)[0]
    assert base.prompt_token_ids == tok.encode("Once upon a time")
    text = base.outputs[0].text
    assert text == tok.decode(base.outputs[0].token_ids, skip_special_tokens=True)
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert stop.strip(), f"pick a visible stop string from {text!r}"
    cut = llm.generate(["Once upon a time"], SamplingParams(temperature=0.0, max_tokens=12,
                                                          ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == text[:text.index(stop)]
    msgs = [{"role": "user", "content": "Name a prime number."}]
    chat = llm.chat(msgs, SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)[0]
    expected = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    assert chat.prompt_token_ids == list(expected["input_ids"])
    assert "<|im_start|>assistant" in chat.prompt


def test_abort_frees_everything(default_llm):
    llm = default_llm
    eng = llm.engine
    ps = prompts(np.random.default_rng(13), [5, 8, 6])
    sps = [SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True),
           SamplingParams(n=2, use_beam_search=True, temperature=0.0, max_tokens=30),
           SamplingParams(n=2, temperature=1.0, max_tokens=30, ignore_eos=True)]
    for i, (p, sp) in enumerate(zip(ps, sps)):
        eng.add_request(f"r{i}", None, sp, prompt_token_ids=p)
    finished = []
    for _ in range(4):
        finished += eng.step()
    for i in range(3):
        eng.abort_request(f"r{i}")
    assert not finished and not eng.has_unfinished_requests()
    bm = eng.block_manager
    assert bm.get_num_free_gpu_blocks() == bm.get_num_total_gpu_blocks()
    assert not eng._states and not eng.output_processor.finished_beams


def test_freeze_heap_moves_the_live_heap_out_of_the_collector():
    """jpaged.engine.freeze_heap (the scripts, from the command line): in a
    process of its own, since a frozen object is never collected."""
    import subprocess
    code = ("import gc; from jpaged.engine import freeze_heap; before = gc.get_freeze_count(); "
            "junk = [[] for _ in range(5000)]; freeze_heap(); print(before, gc.get_freeze_count())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    before, after = map(int, out.stdout.split()[-2:])
    assert after >= before + 5000  # every live object, the 5,000 lists among them
