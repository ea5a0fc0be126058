"""What comes back: every SamplingParams field has an effect, streamed
outputs add up to the final one, stop strings, special tokens, several EOS
ids (tiny random Llama with a byte-level tokenizer, CPU)."""
import dataclasses

import pytest

import models
from jpaged import LLM, SamplingParams
from jpaged.engine import _eos_ids
from jpaged.sampling_params import RequestOutputKind
from tiny import ENGINE, LLAMA, lazy_llm, tiny_tokenizer

PROMPT = [5, 9, 13, 2, 77, 31, 8]


@pytest.fixture(scope="module")
def llm():
    model = models.random_model(LLAMA, dtype="float32", seed=1)
    model.tokenizer = tiny_tokenizer()
    return LLM(model, use_tqdm_warmup=False, **dict(ENGINE, num_gpu_blocks=200))


@pytest.fixture(scope="module")
def eos_llm(llm):
    """The same model declaring two EOS ids: its own greedy tokens 3 and 6
    (a Llama 3 style config, eos_token_id: [a, b]). The EOS ids are
    constants of the decode steps, so its engine compiles only the (greedy)
    steps its tests run."""
    toks = _greedy(llm).token_ids
    model = llm.engine.model
    cfg = dataclasses.replace(model.config, eos_token_ids=(toks[5], toks[2]))
    return lazy_llm(dataclasses.replace(model, config=cfg),
                    **dict(ENGINE, num_gpu_blocks=200)), toks


def run(llm, **kw):
    kw.setdefault("max_tokens", 12)
    return llm.generate([PROMPT], SamplingParams(**kw), use_tqdm=False)[0]


def tokens(out):
    return [c.token_ids for c in out.outputs]


# field -> settings pairs (base, changed) to try, given the model's greedy
# tokens; the field has an effect when one pair differs in what a user sees.
# Pairs vary a seed or a stop id so the check does not hang on what one
# random model happens to emit.
SEEDS = range(1, 9)


def _sampled(**kw):
    return [(dict(temperature=1.5, seed=s), dict(temperature=1.5, seed=s, **kw)) for s in SEEDS]


def _penalized(**kw):
    """Long greedy runs repeat tokens (the penalties bite there), then sampling."""
    long = dict(temperature=0.0, max_tokens=50, ignore_eos=True)
    return [(long, dict(long, **kw))] + _sampled(**kw)


def _beams(toks, **kw):
    base = dict(use_beam_search=True, temperature=0.0, n=2, best_of=4, max_tokens=12)
    return [(dict(base, stop_token_ids=[t]), dict(base, stop_token_ids=[t], **kw))
            for t in dict.fromkeys(toks)]


def _effects(toks, text):
    greedy = dict(temperature=0.0, ignore_eos=True)
    chars = [c for c in dict.fromkeys(text) if c != "\ufffd"]
    return {
        "n": [(dict(temperature=1.5, seed=3), dict(temperature=1.5, seed=3, n=2))],
        "best_of": _sampled(best_of=4),
        "presence_penalty": _penalized(presence_penalty=2.0),
        "frequency_penalty": _penalized(frequency_penalty=2.0),
        "repetition_penalty": _penalized(repetition_penalty=2.0),
        "temperature": [(greedy, dict(greedy, temperature=1.5, seed=s)) for s in SEEDS],
        "top_p": _sampled(top_p=0.05),
        "top_k": _sampled(top_k=1),
        "min_p": _sampled(min_p=0.9),
        "seed": [(dict(temperature=1.5, seed=s), dict(temperature=1.5, seed=s + 100))
                 for s in SEEDS],
        "use_beam_search": [(dict(greedy, max_tokens=m),
                             dict(use_beam_search=True, temperature=0.0, n=1, best_of=w,
                                  max_tokens=m, ignore_eos=True))
                            for m in (6, 12, 24) for w in (2, 4)],
        "length_penalty": _beams(toks, length_penalty=-3.0),
        "early_stopping": _beams(toks, early_stopping=True),
        "stop": [(greedy, dict(greedy, stop=[c])) for c in chars],
        "stop_token_ids": [(greedy, dict(greedy, stop_token_ids=[toks[4]]))],
        "include_stop_str_in_output": [(dict(greedy, stop=[c]),
                                        dict(greedy, stop=[c], include_stop_str_in_output=True))
                                       for c in chars],
        "ignore_eos": [],  # test_each_field_changes_the_result: the model's own token as EOS
        "max_tokens": [(greedy, dict(greedy, max_tokens=3))],
        "min_tokens": [(dict(greedy, stop_token_ids=[toks[0]]),
                        dict(greedy, stop_token_ids=[toks[0]], min_tokens=3))],
        "logprobs": [(greedy, dict(greedy, logprobs=3))],
        "prompt_logprobs": [(greedy, dict(greedy, prompt_logprobs=2))],
        "skip_special_tokens": [(dict(greedy, max_tokens=50),
                                 dict(greedy, max_tokens=50, skip_special_tokens=False))],
        "output_kind": [],  # streaming: test_streamed_outputs_add_up
    }


def seen(out):
    """What a user sees of a RequestOutput."""
    return (out.error, out.prompt_logprobs,
            [(c.text, c.token_ids, c.logprobs, c.finish_reason, round(c.cumulative_logprob, 3))
             for c in out.outputs])


def test_every_field_is_listed():
    assert set(_effects([1] * 5, "a")) == {f.name for f in dataclasses.fields(SamplingParams)}


def _greedy(llm, **kw):
    return run(llm, temperature=0.0, ignore_eos=True, **kw).outputs[0]


@pytest.mark.parametrize("field", sorted(f for f in _effects([1] * 5, "a") if f != "output_kind"))
def test_each_field_changes_the_result(llm, eos_llm, field):
    g = _greedy(llm)
    toks = g.token_ids
    if field == "ignore_eos":  # the model's own third token is an EOS of eos_llm
        other, _ = eos_llm
        assert tokens(run(other, temperature=0.0)) == [toks[:3]]
        assert tokens(run(other, temperature=0.0, ignore_eos=True)) == [toks]
        return
    pairs = _effects(toks, g.text)[field]
    assert pairs, f"no settings to try for {field}"
    for base, changed in pairs:
        if seen(run(llm, **base)) != seen(run(llm, **changed)):
            return
    pytest.fail(f"{field} changed nothing in {len(pairs)} tries")


def _stop_char(text):
    visible = [c for c in text if c != "\ufffd"]
    assert visible, f"no character to stop at in {text!r}"
    return visible[len(visible) // 2]


def test_stop_strings_and_special_tokens(llm):
    g = _greedy(llm)
    stop = _stop_char(g.text)
    full = g.text
    cut = _greedy(llm, stop=[stop])
    kept = _greedy(llm, stop=[stop], include_stop_str_in_output=True)
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == full[:full.index(stop)]
    assert kept.text == full[:full.index(stop) + len(stop)]
    tok = llm.get_tokenizer()
    long = _greedy(llm, max_tokens=50)
    raw = _greedy(llm, max_tokens=50, skip_special_tokens=False).text
    assert raw == tok.decode(long.token_ids, skip_special_tokens=False)
    assert long.text == tok.decode(long.token_ids, skip_special_tokens=True)


def test_several_eos_ids(eos_llm):
    other, toks = eos_llm
    assert other.engine.eos_token_ids == {toks[5], toks[2]}
    out = run(other, temperature=0.0).outputs[0]  # whichever comes first ends it
    assert out.token_ids == toks[:3] and out.finish_reason == "stop"
    held = run(other, temperature=0.0, min_tokens=4).outputs[0]  # banned until 4 tokens
    assert len(held.token_ids) >= 4 and not {toks[5], toks[2]} & set(held.token_ids[:4])
    cfg = dataclasses.replace(other.engine.model.config, eos_token_ids=(250, 7))
    assert _eos_ids(dataclasses.replace(other.engine.model, config=cfg)) == {250, 7}


@pytest.mark.parametrize("kind", [RequestOutputKind.DELTA, RequestOutputKind.CUMULATIVE])
def test_streamed_outputs_add_up(llm, kind):
    stop = _stop_char(_greedy(llm).text)
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
        assert len(got) >= 2  # it did stream (a window's tokens at a time)
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
