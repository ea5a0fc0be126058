"""Incremental detokenizer and stop strings on a tiny byte-level BPE trained
here (no network); plus the host-side output types of jpaged/outputs.py."""
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from jpaged.detokenizer import Detokenizer
from jpaged.outputs import CompletionOutput, RequestMetrics, RequestOutput

CORPUS = ["hello world, the quick brown fox jumps", "naïve café résumé über straße",
          "日本語のテキストです", "emoji 🙂 and 🚀 rocket"] * 3
TEXTS = ["日本語 🚀 café, hello world", "the quick brown fox 🙂🙂 über 日本", "über naïve 語のテ",
         "x🚀y", "plain ascii text only"]


@pytest.fixture(scope="module")
def raw_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # A small vocabulary leaves most multi-byte characters split over tokens.
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"])
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture(scope="module")
def hf_tokenizer(raw_tokenizer):
    return PreTrainedTokenizerFast(tokenizer_object=raw_tokenizer, eos_token="<eos>")


def _stream(detok, prompt_ids, ids, stop=(), include_stop_str=False, skip_special_tokens=True):
    state = detok.new_state(prompt_ids, skip_special_tokens)
    deltas, hit = [], None
    for i in ids:
        d, hit = detok.step(state, i, stop, include_stop_str)
        deltas.append(d)
        if hit is not None:
            break
    if hit is None:
        deltas.append(detok.flush(state))
    return state, deltas, hit


def test_texts_split_characters_across_tokens(hf_tokenizer):
    """The fixture really exercises the hard case."""
    split = 0
    for text in TEXTS:
        for i in hf_tokenizer(text)["input_ids"]:
            split += "\ufffd" in hf_tokenizer.decode([i])
    assert split >= 5


@pytest.mark.parametrize("which", ["hf", "raw"])
def test_incremental_equals_full_decode(which, hf_tokenizer, raw_tokenizer):
    tok = hf_tokenizer if which == "hf" else raw_tokenizer
    detok = Detokenizer(tok)
    prompt_ids = raw_tokenizer.encode("café 日本").ids
    for text in TEXTS:
        ids = raw_tokenizer.encode(text).ids
        state, deltas, hit = _stream(detok, prompt_ids, ids)
        assert hit is None
        assert state.output_text == text == "".join(deltas) == hf_tokenizer.decode(ids)
        assert not any("\ufffd" in d for d in deltas), deltas
        assert len(state.tokens) <= 8  # the window stays short


def test_flush_of_an_incomplete_character_matches_decode(hf_tokenizer, raw_tokenizer):
    detok = Detokenizer(hf_tokenizer)
    ids = raw_tokenizer.encode("ab 🚀").ids
    cut = ids[:-1]  # the rocket's last byte(s) missing
    assert hf_tokenizer.decode(cut).endswith("\ufffd")
    state, deltas, _ = _stream(detok, [], cut)
    assert "".join(deltas) == state.output_text == hf_tokenizer.decode(cut)
    assert "\ufffd" not in "".join(deltas[:-1])  # only the final flush shows it


def test_skip_special_tokens(hf_tokenizer, raw_tokenizer):
    detok = Detokenizer(hf_tokenizer)
    eos = hf_tokenizer.eos_token_id
    ids = raw_tokenizer.encode("日本 ").ids + [eos] + raw_tokenizer.encode("end").ids
    for skip in (True, False):
        state, deltas, _ = _stream(detok, [eos], ids, skip_special_tokens=skip)
        assert state.output_text == hf_tokenizer.decode(ids, skip_special_tokens=skip)
        assert ("<eos>" in state.output_text) == (not skip)
    assert detok.decode(ids) == "日本 end"
    assert Detokenizer(raw_tokenizer).special_ids == detok.special_ids == {eos}


def _boundary_stop(hf_tokenizer, raw_tokenizer, text):
    """A stop string made of the last char of one token and the first of the next."""
    ids = raw_tokenizer.encode(text).ids
    pieces = [hf_tokenizer.decode([i]) for i in ids]
    for a, b in zip(pieces, pieces[1:]):
        if a and b and "\ufffd" not in a + b and a[-1] != " " and b[0] != " ":
            stop = a[-1] + b[0]
            assert not any(stop in p for p in pieces)
            return ids, stop
    raise AssertionError("no token boundary inside a word")


@pytest.mark.parametrize("include_stop_str", [False, True])
def test_stop_string_spanning_two_tokens_is_cut(include_stop_str, hf_tokenizer, raw_tokenizer):
    detok = Detokenizer(hf_tokenizer)
    text = "the quick brown fox jumps"
    ids, stop = _boundary_stop(hf_tokenizer, raw_tokenizer, text)
    state, deltas, hit = _stream(detok, [], ids, stop=["zzz", stop, "never there"],
                                 include_stop_str=include_stop_str)
    i = text.index(stop)
    want = text[:i + len(stop)] if include_stop_str else text[:i]
    assert hit == stop == state.stop_reason
    assert state.output_text == want == "".join(deltas)
    with pytest.raises(ValueError, match="stop string"):
        detok.step(state, ids[0])


def test_stop_strings_multibyte_leftmost_and_held_back(hf_tokenizer, raw_tokenizer):
    detok = Detokenizer(hf_tokenizer)
    text = "über naïve 語のテ"
    ids = raw_tokenizer.encode(text).ids
    # "語" is split over tokens; "ve" comes before it and wins.
    state, deltas, hit = _stream(detok, [], ids, stop=["語", "ve"])
    assert hit == "ve" and state.output_text == "über naï" == "".join(deltas)
    state, deltas, hit = _stream(detok, [], ids, stop=["語の"])
    assert hit == "語の" and state.output_text == "über naïve " == "".join(deltas)
    # A delta never shows a prefix of a stop string that may still complete.
    state = detok.new_state([])
    shown = ""
    for i in raw_tokenizer.encode("hello world").ids:
        shown += detok.step(state, i, ["world!"])[0]
        assert len(state.output_text) - len(shown) <= len("world!") - 1
    assert shown + detok.flush(state) == "hello world"


def test_check_stop_false_and_fork(hf_tokenizer, raw_tokenizer):
    detok = Detokenizer(hf_tokenizer)
    ids = raw_tokenizer.encode("hello world hello").ids
    state = detok.new_state([])
    for n, i in enumerate(ids):
        _, hit = detok.step(state, i, ["hello"], check_stop=n >= 3)  # min_tokens = 3
        if hit:
            break
    assert hit == "hello" and state.output_text == "hello world "
    # Forked states evolve independently.
    a = detok.new_state([])
    first = detok.step(a, ids[0])[0]
    b = a.fork()
    for i in raw_tokenizer.encode(" 日本").ids:
        detok.step(b, i)
    assert a.output_text == first == hf_tokenizer.decode(ids[:1])
    assert b.output_text == first + " 日本" and detok.flush(b) == ""
    with pytest.raises(ValueError, match="fast tokenizer"):
        Detokenizer(object())


def test_output_types_repr_and_errors():
    metrics = RequestMetrics(arrival_time=10.0, first_scheduled_time=10.5, time_in_queue=0.5)
    out = CompletionOutput(index=0, text="hi", token_ids=list(range(40)), cumulative_logprob=-1.5,
                           logprobs=[{7: -0.1}], finish_reason="length")
    r = repr(out)
    assert "text='hi'" in r and "(40 in all)" in r and "finish_reason='length'" in r
    req = RequestOutput("r1", "p", [1, 2], None, [out], True, metrics)
    assert "request_id='r1'" in repr(req) and "error" not in repr(req)
    bad = RequestOutput.from_error("r2", None, [1] * 5000, "prompt has 5000 tokens, max_model_len is 2048", n=2)
    assert bad.finished and bad.error.startswith("prompt has 5000")
    assert [o.finish_reason for o in bad.outputs] == ["abort", "abort"] and bad.outputs[1].index == 1
    assert "error='prompt has 5000" in repr(bad)
