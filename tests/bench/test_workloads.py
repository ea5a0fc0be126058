"""Workloads: ShareGPT parsing and vLLM's filter, synthetic workloads, Poisson arrivals."""
import json

import numpy as np
import pytest

from jpaged.bench import workloads as wl


class WordTokenizer:
    """One token per whitespace-separated word (ids are word lengths)."""

    def encode(self, text):
        return [len(w) for w in text.split()]


def words(n):
    return " ".join(["w"] * n)


def conv(cid, *turns):
    return {"id": cid, "conversations": [{"from": f, "value": v} for f, v in turns]}


def write_truncated(path, records):
    text = json.dumps(records, indent=2)
    cut = text.rindex('"from"')  # inside the last record
    path.write_text(text[:cut])


def test_iter_json_array_stops_at_the_cut_record():
    text = '[\n {"a": 1},\n {"b": [1, 2]} , {"c": "unfinished'
    assert list(wl.iter_json_array(text)) == [{"a": 1}, {"b": [1, 2]}]
    assert list(wl.iter_json_array('[1, 2]')) == [1, 2]
    assert list(wl.iter_json_array('  []')) == []
    with pytest.raises(ValueError, match="JSON array"):
        list(wl.iter_json_array('{"a": 1}'))


def test_sharegpt_filter_rules(tmp_path):
    records = [
        conv("keep", ("human", words(10)), ("gpt", words(20)), ("human", words(3))),
        conv("short-prompt", ("human", words(3)), ("gpt", words(20))),
        conv("short-output", ("human", words(10)), ("gpt", words(3))),
        conv("long-prompt", ("human", words(1025)), ("gpt", words(10))),
        conv("edge-prompt", ("human", words(1024)), ("gpt", words(1024))),
        conv("too-long", ("human", words(1000)), ("gpt", words(1049))),
        conv("gpt-first", ("gpt", words(50)), ("human", words(6)), ("gpt", words(7))),
        conv("single-turn", ("human", words(10))),
        conv("no-reply", ("human", words(10)), ("human", words(10))),
        conv("cut-off", ("human", words(11)), ("gpt", words(12))),
    ]
    path = tmp_path / "sharegpt.json"
    write_truncated(path, records)
    convs = wl.load_conversations(path)
    assert [c["id"] for c in convs] == [r["id"] for r in records[:-1]]
    w = wl.sample_sharegpt(3, WordTokenizer(), seed=0, path=path)
    got = sorted((r.prompt_len, r.output_len) for r in w.requests)
    assert got == [(6, 7), (10, 20), (1024, 1024)]
    assert w.info["num_conversations"] == 9
    with pytest.raises(ValueError, match="only 3 ShareGPT pairs"):
        wl.sample_sharegpt(4, WordTokenizer(), seed=0, path=path)
    # the seed fixes the order
    a = wl.sample_sharegpt(2, WordTokenizer(), seed=1, path=path)
    b = wl.sample_sharegpt(2, WordTokenizer(), seed=1, path=path)
    assert a.requests == b.requests
    with pytest.raises(FileNotFoundError):
        wl.load_conversations(tmp_path / "missing.json")


def test_keep_pair_bounds():
    assert wl.keep_pair(4, 4) and wl.keep_pair(1024, 1024)
    assert not wl.keep_pair(3, 100) and not wl.keep_pair(100, 3)
    assert not wl.keep_pair(1025, 4) and not wl.keep_pair(1000, 1049)


@pytest.mark.parametrize("make", [wl.synthetic_sharegpt, wl.synthetic_alpaca])
def test_synthetic_is_seeded_and_filtered(make):
    a, b, c = make(300, 1000, seed=3), make(300, 1000, seed=3), make(300, 1000, seed=4)
    assert a.requests == b.requests
    assert a.requests != c.requests
    for r in a.requests:
        assert wl.keep_pair(r.prompt_len, r.output_len)
        assert all(wl.FIRST_TOKEN_ID <= t < 1000 for t in r.prompt_token_ids)
    s = a.summary()
    if make is wl.synthetic_sharegpt:  # real filtered ShareGPT: 91 / 336 mean tokens
        assert 40 < s["mean_prompt_len"] < 160 and 200 < s["mean_output_len"] < 500
    else:  # the paper's Alpaca: 19.3 / 58.5
        assert 12 < s["mean_prompt_len"] < 30 and 35 < s["mean_output_len"] < 90


def test_synthetic_respects_a_smaller_limit():
    w = wl.make_workload("synthetic", 50, 320, seed=0, max_total_len=64)
    assert max(r.prompt_len + r.output_len for r in w.requests) <= 64


def test_poisson_arrivals_mean_rate():
    t = wl.poisson_arrivals(20000, 5.0, seed=0)
    assert np.all(np.diff(t) >= 0) and t[0] > 0
    assert np.mean(np.diff(t)) == pytest.approx(0.2, rel=0.03)
    assert len(t) / t[-1] == pytest.approx(5.0, rel=0.03)
    assert np.array_equal(t, wl.poisson_arrivals(20000, 5.0, seed=0))
    assert not np.any(wl.poisson_arrivals(5, float("inf")))
    with pytest.raises(ValueError, match="rate"):
        wl.poisson_arrivals(5, 0)


def test_shared_prefix_and_vocab_folding():
    base = wl.synthetic_alpaca(4, 1000, seed=0)
    w = wl.shared_prefix(base, 80, 1000)
    prefix = w.requests[0].prompt_token_ids[:80]
    for r, b in zip(w.requests, base.requests):
        assert r.prompt_token_ids == prefix + b.prompt_token_ids and r.output_len == b.output_len
    folded = w.for_vocab(100)
    assert all(t < 100 for r in folded.requests for t in r.prompt_token_ids)


def test_save_load_roundtrip_and_errors(tmp_path):
    w = wl.synthetic_alpaca(5, 500, seed=1)
    path = tmp_path / "w.json"
    wl.save_workload(w, path)
    back = wl.load_workload(path)
    assert back.requests == w.requests
    assert wl.make_workload(str(path), 3, 500).requests == w.requests[:3]
    with pytest.raises(ValueError, match="holds 5 requests"):
        wl.make_workload(str(path), 6, 500)
    (tmp_path / "bad.json").write_text('{"requests": [{"x": 1}]}')
    with pytest.raises(ValueError, match="not a workload file"):
        wl.load_workload(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError):
        wl.load_workload(tmp_path / "none.json")
    with pytest.raises(ValueError, match="unknown workload"):
        wl.make_workload("nonsense", 3, 500)
