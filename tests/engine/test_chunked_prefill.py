"""Chunked prefill end to end: every step holds the decoding sequences'
next tokens and prompt chunks up to the token budget, in one ragged step.

What a user sees must not change with chunking: the same tokens (greedy,
seeded sampling, n > 1, beams, penalties, logprobs, prompt logprobs) with
chunking off and with chunks of 16, 24 (which divides no prompt here) and 64
tokens, for Llama (GQA) and OPT; through preemption in the middle of a
chunked prompt (swap and recompute) and prefix caching; with nothing
compiled after warm-up, and every block free at the end.
"""
import numpy as np
import pytest

import models
from jpaged import LLM, SamplingParams
from jpaged import scheduler as scheduler_lib
from tiny import ENGINE, LLAMA

OPT = {"architectures": ["OPTForCausalLM"], "hidden_size": 64, "ffn_dim": 128,
       "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 320,
       "max_position_embeddings": 256, "word_embed_proj_dim": 64,
       "do_layer_norm_before": True, "eos_token_id": 2}

PARAMS = [
    SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
    SamplingParams(temperature=0.9, top_p=0.9, top_k=40, seed=7, max_tokens=11),
    SamplingParams(n=2, best_of=3, temperature=1.1, seed=3, max_tokens=9, logprobs=2),
    SamplingParams(temperature=0.7, seed=5, repetition_penalty=1.4, presence_penalty=0.3,
                   max_tokens=15),
    SamplingParams(temperature=0.0, max_tokens=5, prompt_logprobs=2),
    SamplingParams(n=2, use_beam_search=True, temperature=0.0, max_tokens=6),
]
LENGTHS = [5, 9, 17, 12, 7, 30, 4, 21, 40, 3, 50, 33]


@pytest.fixture(scope="module")
def llms():
    """LLM(arch, **changes to ENGINE with a 200-block pool), built once per module."""
    archs = {"llama": models.random_model(LLAMA, dtype="float32", seed=1),
             "opt": models.random_model(OPT, dtype="float32", seed=2)}
    cache = {}

    def get(arch="llama", **changes):
        key = (arch, tuple(sorted(changes.items())))
        if key not in cache:
            cache[key] = LLM(archs[arch], use_tqdm_warmup=False,
                             **dict(ENGINE, num_gpu_blocks=200, **changes))
        return cache[key]
    yield get
    cache.clear()


def _prompts(seed, lengths):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 256, n).tolist() for n in lengths]


def _run(llm, prompts, params):
    """Per request: each completion's (token ids, cumulative logprob, finish
    reason, sampled logprobs' token ids) and the prompt logprobs (token ids
    and values; compare results with _same)."""
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    assert all(o.error is None for o in outs)
    bm = llm.engine.block_manager
    assert bm.get_num_free_gpu_blocks() == bm.get_num_total_gpu_blocks()
    return [([(tuple(c.token_ids), c.cumulative_logprob, c.finish_reason,
               None if c.logprobs is None else [sorted(e) for e in c.logprobs])
              for c in o.outputs],
             None if o.prompt_logprobs is None else
             [None if e is None else sorted(e.items()) for e in o.prompt_logprobs])
            for o in outs]


def _same(got, want, tol=1e-3) -> bool:
    """Equal token ids, finish reasons and top-k sets, logprobs within tol
    (chunks change the order of float sums: a value may move in its 5th
    digit, so a rounded comparison can flip at a rounding edge)."""
    if isinstance(want, float):
        return isinstance(got, float) and abs(got - want) <= tol
    if isinstance(want, (list, tuple)):
        return (isinstance(got, (list, tuple)) and len(got) == len(want)
                and all(_same(g, w, tol) for g, w in zip(got, want)))
    return got == want


@pytest.fixture
def step_kinds(monkeypatch):
    """Counts the scheduled steps by kind: (ragged?, decode rows?, prompt chunks?)."""
    kinds = {}
    schedule = scheduler_lib.Scheduler.schedule

    def counting(self, *args, **kwargs):
        out = schedule(self, *args, **kwargs)
        key = (out.is_prefill, any(s.decode for s in out.scheduled_seq_groups),
               any(not s.decode for s in out.scheduled_seq_groups))
        kinds[key] = kinds.get(key, 0) + 1
        return out
    monkeypatch.setattr(scheduler_lib.Scheduler, "schedule", counting)
    return kinds


@pytest.mark.parametrize("arch", ["llama"])
def test_chunked_gives_the_same_outputs_as_whole_prompts(arch, llms, step_kinds):
    """(The other test modules, OPT's included, run ENGINE's budget of 64
    with chunking on.)"""
    ps = _prompts(0, LENGTHS)
    params = [PARAMS[i % len(PARAMS)] for i in range(len(ps))]
    off = llms(arch)  # ENGINE's budget holds max_model_len: chunking can go off
    off.engine.use_block_manager(enable_chunked_prefill=False)
    want = _run(off, ps, params)
    off.engine.use_block_manager(enable_chunked_prefill=True)
    budgets = (16, 24) if arch == "llama" else (16,)
    for budget in budgets:
        on = llms(arch, max_num_batched_tokens=budget)
        step_kinds.clear()
        traces = on.engine.stats.num_compiles
        assert _same(_run(on, ps, params), want), budget
        assert on.engine.stats.num_compiles == traces  # nothing compiled after warm-up
        assert step_kinds.get((True, True, True), 0) > 0  # decodes beside chunks
        assert max(on.engine.runner.prefill_buckets) == budget


def _same_as_whole_prompts(llms, monkeypatch, record, **changes):
    """Runs every kind of request on the budget-24 engine with `changes`
    (use_block_manager's; restored afterwards) and checks it gives what
    whole prompts give, with nothing compiled after warm-up; record(scheduler,
    out) sees each schedule."""
    ps = _prompts(0, LENGTHS)
    params = [PARAMS[i % len(PARAMS)] for i in range(len(ps))]
    off = llms()
    off.engine.use_block_manager(enable_chunked_prefill=False)
    want = _run(off, ps, params)
    off.engine.use_block_manager(enable_chunked_prefill=True)
    schedule = scheduler_lib.Scheduler.schedule

    def recording(self, *args, **kwargs):
        out = schedule(self, *args, **kwargs)
        record(self, out)
        return out
    monkeypatch.setattr(scheduler_lib.Scheduler, "schedule", recording)
    on = llms(max_num_batched_tokens=24)
    before = {k: getattr(on.engine.config, k) for k in changes}
    on.engine.use_block_manager(**changes)
    traces = on.engine.stats.num_compiles
    assert _same(_run(on, ps, params), want)
    assert on.engine.stats.num_compiles == traces
    on.engine.use_block_manager(**before)


def test_long_prefill_token_threshold_gives_the_same_outputs(llms, monkeypatch):
    """Chunks capped at 5 tokens a prompt (the budget of 24 holds several
    prompts' chunks and the decodes): every kind of request gives what
    whole prompts give, with nothing compiled after warm-up."""
    chunks = []
    _same_as_whole_prompts(llms, monkeypatch, lambda sched, out: chunks.extend(
        s.token_chunk_size for s in out.scheduled_seq_groups if not s.decode),
        long_prefill_token_threshold=5)
    assert max(chunks) == 5  # (24 without the cap: the 30-, 40- and 50-token prompts)


def test_decode_window_between_chunks_gives_the_same_outputs(llms, monkeypatch):
    """Decode windows of up to 4 steps between a prefill's chunks (of at
    most 5 tokens, so prompts run over many steps): every kind of request
    gives what whole prompts give, windows did run while a prefill was
    under way, and nothing compiles after warm-up."""
    between = []

    def record(sched, out):
        if not out.is_prefill and any(sched._prefilling(g) for g in sched.running):
            between.append(out.num_steps)
    _same_as_whole_prompts(llms, monkeypatch, record, long_prefill_token_threshold=5,
                           decode_window_between_chunks=4)
    assert between and max(between) == 4


def test_a_prompt_longer_than_the_budget(llms):
    """Without chunking a budget below max_model_len is refused; with it a
    60-token prompt runs in chunks of 16 through 16-token buckets."""
    with pytest.raises(ValueError, match="must be >= max_model_len"):
        llms(max_num_batched_tokens=16, enable_chunked_prefill=False)
    ps = _prompts(3, [60, 2, 45])
    sp = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    small = llms(max_num_batched_tokens=16)
    assert small.engine.runner.prefill_buckets == [16]
    small.engine.stats.reset()
    whole = llms()
    whole.engine.use_block_manager(enable_chunked_prefill=False)
    assert _same(_run(small, ps, sp), _run(whole, ps, sp))
    assert small.engine.stats.num_prefill_tokens == 60 + 2 + 45
    whole.engine.use_block_manager(enable_chunked_prefill=True)


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption_in_the_middle_of_chunked_prompts(llms, mode, step_kinds):
    ps = _prompts(1, LENGTHS)
    params = [PARAMS[i % len(PARAMS)] for i in range(len(ps))]
    want = _run(llms(max_num_batched_tokens=16), ps, params)
    small = llms(max_num_batched_tokens=16)
    # a pool too small for the batch
    small.engine.use_block_manager(num_blocks=32, preemption_mode=mode)
    step_kinds.clear()
    assert _same(_run(small, ps, params), want)
    assert small.engine.stats.num_preemptions > 0
    if mode == "recompute":
        assert small.engine.stats.num_swaps_out == 0
    assert step_kinds.get((True, True, True), 0) > 0
    small.engine.use_block_manager(preemption_mode=None)


def test_prefix_caching_with_chunks(llms):
    shared = _prompts(4, [37])[0]
    ps = [shared + p for p in _prompts(5, [5, 9, 3, 12, 7, 1])]
    sp = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    off = llms()
    off.engine.use_block_manager(enable_chunked_prefill=False)
    want = _run(off, ps, sp)
    cached = llms(max_num_batched_tokens=16)
    cached.engine.use_block_manager(enable_prefix_caching=True)
    assert _same(_run(cached, ps, sp), want)
    assert cached.engine.stats.num_prefill_tokens < off.engine.stats.num_prefill_tokens
    cached.engine.use_block_manager(enable_prefix_caching=False)
    off.engine.use_block_manager(enable_chunked_prefill=True)


def test_arrivals_into_a_running_batch_join_its_steps(llms):
    """Requests added while others decode are prefilled in chunks beside
    them (no step stalls the running sequences), compiling nothing new."""
    engine = llms(max_num_batched_tokens=16).engine
    sp = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    ps = _prompts(6, [6, 40, 25, 33])
    traces = engine.stats.num_compiles
    engine.add_request("0", None, sp, prompt_token_ids=ps[0])
    done, tokens_per_step = {}, []
    for step in range(200):
        if step in (2, 3, 4):
            engine.add_request(str(step - 1), None, sp, prompt_token_ids=ps[step - 1])
        before = len(engine._requests.get("0").get_seqs()[0].output_token_ids) \
            if "0" in engine._requests else None
        for o in engine.step():
            done[o.request_id] = o
        if before is not None and "0" in engine._requests:
            tokens_per_step.append(
                len(engine._requests["0"].get_seqs()[0].output_token_ids) - before)
        if not engine.has_unfinished_requests():
            break
    assert sorted(done) == ["0", "1", "2", "3"]
    # request 0 got a token (or a placeholder for one) in every step while
    # the later prompts were prefilled in chunks
    assert all(n >= 1 for n in tokens_per_step[:8])
    assert engine.stats.num_compiles == traces
    whole = llms()
    whole.engine.use_block_manager(enable_chunked_prefill=False)
    want = whole.generate(prompt_token_ids=ps, sampling_params=sp, use_tqdm=False)
    whole.engine.use_block_manager(enable_chunked_prefill=True)
    assert [done[str(i)].outputs[0].token_ids for i in range(4)] == \
        [o.outputs[0].token_ids for o in want]
