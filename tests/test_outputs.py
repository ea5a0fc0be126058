"""What comes back: every SamplingParams field has an effect, streamed
outputs add up to the final one, stop strings, special tokens, several EOS
ids (tiny random Llama with a byte-level tokenizer, CPU)."""
import dataclasses

import numpy as np
import pytest

import models
from jpaged import LLM, SamplingParams
from jpaged.engine import _eos_ids
from jpaged.sampling_params import RequestOutputKind
from tiny import ENGINE, LLAMA, tiny_tokenizer

PROMPT = [5, 9, 13, 2, 77, 31, 8]


@pytest.fixture(scope="module")
def llm():
    model = models.random_model(LLAMA, dtype="float32", seed=1)
    model.tokenizer = tiny_tokenizer()
    return LLM(model, use_tqdm_warmup=False, **dict(ENGINE, num_gpu_blocks=200))


def run(llm, **kw):
    kw.setdefault("max_tokens", 12)
    return llm.generate([PROMPT], SamplingParams(**kw), use_tqdm=False)[0]


def tokens(out):
    return [c.token_ids for c in out.outputs]


# field -> (base settings, changed settings, what to compare); each pair
# must differ in what a user sees.
SEEDED = dict(temperature=1.5, seed=3)
BEAMS = dict(use_beam_search=True, temperature=0.0, n=2, best_of=3, max_tokens=6)
LONG = dict(temperature=0.0, max_tokens=50, ignore_eos=True)
EFFECTS = {
    "n": (dict(SEEDED), dict(SEEDED, n=2), lambda o: len(o.outputs)),
    "best_of": (dict(SEEDED, seed=2), dict(SEEDED, seed=2, best_of=4), tokens),
    # 50 greedy tokens of this model repeat some: the penalties bite there
    "presence_penalty": (dict(LONG), dict(LONG, presence_penalty=2.0), tokens),
    "frequency_penalty": (dict(LONG), dict(LONG, frequency_penalty=2.0), tokens),
    "repetition_penalty": (dict(LONG), dict(LONG, repetition_penalty=2.0), tokens),
    "temperature": (dict(temperature=0.0), dict(SEEDED), tokens),
    "top_p": (dict(SEEDED), dict(SEEDED, top_p=0.05), tokens),
    "top_k": (dict(SEEDED), dict(SEEDED, top_k=1), tokens),
    "min_p": (dict(SEEDED), dict(SEEDED, min_p=0.9), tokens),
    "seed": (dict(SEEDED), dict(SEEDED, seed=4), tokens),
    "use_beam_search": (dict(temperature=0.0, max_tokens=6), dict(BEAMS, n=1),
                        lambda o: o.outputs[0].cumulative_logprob),
    "length_penalty": (dict(BEAMS, max_tokens=12), dict(BEAMS, max_tokens=12, length_penalty=-3.0),
                       tokens),
    # beams that end on token 79 fill the finished pool early (found by search)
    "early_stopping": (dict(BEAMS, best_of=4, max_tokens=20, stop_token_ids=[79]),
                       dict(BEAMS, best_of=4, max_tokens=20, stop_token_ids=[79],
                            early_stopping=True), tokens),
    "stop": (dict(temperature=0.0), None, lambda o: o.outputs[0].text),
    "stop_token_ids": (dict(temperature=0.0), None, tokens),
    "include_stop_str_in_output": (None, None, lambda o: o.outputs[0].text),
    "ignore_eos": (dict(temperature=0.0), None, tokens),
    "max_tokens": (dict(temperature=0.0), dict(temperature=0.0, max_tokens=3), tokens),
    "min_tokens": (None, None, tokens),
    "logprobs": (dict(temperature=0.0), dict(temperature=0.0, logprobs=3),
                 lambda o: o.outputs[0].logprobs),
    "prompt_logprobs": (dict(temperature=0.0), dict(temperature=0.0, prompt_logprobs=2),
                        lambda o: o.prompt_logprobs),
    "skip_special_tokens": (dict(temperature=0.0, ignore_eos=True),
                            dict(temperature=0.0, ignore_eos=True, skip_special_tokens=False),
                            lambda o: o.outputs[0].text),
    "output_kind": (None, None, None),  # streaming: test_streamed_outputs_add_up
}


def test_every_field_is_listed():
    assert set(EFFECTS) == {f.name for f in dataclasses.fields(SamplingParams)}


def _greedy(llm, **kw):
    return run(llm, temperature=0.0, ignore_eos=True, **kw).outputs[0]


def _fill_data_driven(llm):
    """Settings whose effect needs a token the model actually emits."""
    g = _greedy(llm)
    toks, text = g.token_ids, g.text
    stop_tok = toks[4]
    effects = dict(EFFECTS)
    effects["stop_token_ids"] = (dict(temperature=0.0, ignore_eos=True),
                                 dict(temperature=0.0, ignore_eos=True, stop_token_ids=[stop_tok]),
                                 tokens)
    effects["min_tokens"] = (dict(temperature=0.0, ignore_eos=True, stop_token_ids=[toks[0]]),
                             dict(temperature=0.0, ignore_eos=True, stop_token_ids=[toks[0]],
                                  min_tokens=3), tokens)
    visible = [c for c in text if c.isprintable() and c != "\ufffd"]
    assert visible, f"no printable character in {text!r}"
    stop = visible[len(visible) // 2]
    effects["stop"] = (dict(temperature=0.0, ignore_eos=True),
                       dict(temperature=0.0, ignore_eos=True, stop=[stop]),
                       lambda o: o.outputs[0].text)
    effects["include_stop_str_in_output"] = (
        dict(temperature=0.0, ignore_eos=True, stop=[stop]),
        dict(temperature=0.0, ignore_eos=True, stop=[stop], include_stop_str_in_output=True),
        lambda o: o.outputs[0].text)
    return effects, toks


@pytest.mark.parametrize("field", sorted(f for f in EFFECTS if f != "output_kind"))
def test_each_field_changes_the_result(llm, field):
    effects, toks = _fill_data_driven(llm)
    if field == "ignore_eos":  # make the model's own third token its EOS
        eng = llm.engine
        saved = eng.eos_token_ids
        eng.eos_token_ids = frozenset({toks[2]})
        try:
            stopped = tokens(run(llm, temperature=0.0))
            free = tokens(run(llm, temperature=0.0, ignore_eos=True))
        finally:
            eng.eos_token_ids = saved
        assert stopped == [toks[:3]] and free == [toks]
        return
    base, changed, see = effects[field]
    a, b = see(run(llm, **base)), see(run(llm, **changed))
    assert a != b, f"{field} changed nothing: {a!r}"


def test_stop_strings_and_special_tokens(llm):
    effects, toks = _fill_data_driven(llm)
    stop = effects["stop"][1]["stop"][0]
    full = _greedy(llm).text
    cut = _greedy(llm, stop=[stop])
    kept = _greedy(llm, stop=[stop], include_stop_str_in_output=True)
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == full[:full.index(stop)]
    assert kept.text == full[:full.index(stop) + len(stop)]
    raw = _greedy(llm, skip_special_tokens=False).text
    tok = llm.get_tokenizer()
    assert raw == tok.decode(toks, skip_special_tokens=False)
    assert full == tok.decode(toks, skip_special_tokens=True)


def test_several_eos_ids(llm):
    cfg = dataclasses.replace(llm.engine.model.config, eos_token_ids=(250, 7))
    assert _eos_ids(dataclasses.replace(llm.engine.model, config=cfg)) == {250, 7}
    toks = _greedy(llm).token_ids
    eng = llm.engine
    saved = eng.eos_token_ids
    eng.eos_token_ids = frozenset({toks[5], toks[2]})  # whichever comes first ends it
    try:
        out = run(llm, temperature=0.0).outputs[0]
        held = run(llm, temperature=0.0, min_tokens=4).outputs[0]
    finally:
        eng.eos_token_ids = saved
    assert out.token_ids == toks[:3] and out.finish_reason == "stop"
    assert len(held.token_ids) >= 4 and not {toks[5], toks[2]} & set(held.token_ids[:3])


@pytest.mark.parametrize("kind", [RequestOutputKind.DELTA, RequestOutputKind.CUMULATIVE])
def test_streamed_outputs_add_up(llm, kind):
    effects, _ = _fill_data_driven(llm)
    stop = effects["stop"][1]["stop"][0]
    params = [dict(temperature=0.0, ignore_eos=True, stop=[stop], max_tokens=12),
              dict(n=2, temperature=1.0, seed=9, ignore_eos=True, logprobs=2, max_tokens=9),
              dict(temperature=0.0, max_tokens=10)]
    eng = llm.engine
    final = {}
    for i, p in enumerate(params):
        eng.add_request(f"final{i}", None, SamplingParams(**p), prompt_token_ids=PROMPT)
        eng.add_request(f"stream{i}", None, SamplingParams(**p, output_kind=kind),
                        prompt_token_ids=PROMPT)
    streams = {i: [] for i in range(len(params))}
    while eng.has_unfinished_requests():
        for o in eng.step():
            i = int(o.request_id[-1])
            if o.request_id.startswith("final"):
                assert o.finished and o.request_id not in final
                final[o.request_id] = o
            else:
                assert not streams[i] or not streams[i][-1].finished, "output after the last"
                streams[i].append(o)
    for i in range(len(params)):
        want, got = final[f"final{i}"], streams[i]
        assert got[-1].finished and not any(o.finished for o in got[:-1])
        assert len(got) > 2  # it did stream
        for c in want.outputs:
            parts = [o.outputs[c.index] for o in got]
            if kind == RequestOutputKind.DELTA:
                text = "".join(p.text for p in parts)
                ids = [t for p in parts for t in p.token_ids]
                lps = None if c.logprobs is None else [e for p in parts for e in p.logprobs]
            else:
                text, ids, lps = parts[-1].text, parts[-1].token_ids, parts[-1].logprobs
                assert all(len(a.token_ids) <= len(b.token_ids) for a, b in zip(parts, parts[1:]))
            assert (text, ids, lps) == (c.text, c.token_ids, c.logprobs)
            assert parts[-1].finish_reason == c.finish_reason
    # generate() returns final outputs whatever output_kind says
    out = llm.generate([PROMPT], SamplingParams(**params[0], output_kind=kind), use_tqdm=False)
    assert out[0].outputs[0].text == final["final0"].outputs[0].text
    with pytest.raises(ValueError, match="best_of == n"):
        SamplingParams(n=1, best_of=2, temperature=1.0, output_kind=kind)
    assert not eng.has_unfinished_requests() and not eng._states
