import math

import numpy as np
import pytest

from jpaged.sampling_params import SamplingParams, SamplingType


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.best_of, p.actual_best_of) == (1, None, 1)
    assert (p.temperature, p.top_p, p.top_k, p.min_p) == (1.0, 1.0, -1, 0.0)
    assert (p.max_tokens, p.min_tokens, p.logprobs, p.prompt_logprobs) == (16, 0, None, None)
    assert p.stop == [] and p.stop_token_ids == []
    assert p.sampling_type == SamplingType.RANDOM
    assert p.skip_special_tokens and not p.ignore_eos and not p.use_beam_search


def test_stop_is_normalized_to_a_list():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop_token_ids=(2, 7)).stop_token_ids == [2, 7]


def test_sampling_types():
    assert SamplingParams(temperature=0.0).sampling_type == SamplingType.GREEDY
    assert SamplingParams(temperature=1e-6).sampling_type == SamplingType.GREEDY
    assert SamplingParams(temperature=0.7, seed=3).sampling_type == SamplingType.RANDOM_SEED
    assert SamplingParams(n=2, use_beam_search=True, temperature=0.0).sampling_type == SamplingType.BEAM


def test_greedy_resets_truncation_knobs():
    p = SamplingParams(temperature=0.0, top_p=0.5, top_k=3, min_p=0.2)
    assert (p.top_p, p.top_k, p.min_p) == (1.0, -1, 0.0)


def test_beam_width_is_best_of_defaulting_to_n():
    assert SamplingParams(n=3, use_beam_search=True, temperature=0.0).actual_best_of == 3
    p = SamplingParams(n=2, best_of=5, use_beam_search=True, temperature=0.0, early_stopping="never",
                       length_penalty=0.5)
    assert p.actual_best_of == 5 and p.n == 2


def test_parallel_sampling_and_unbounded_max_tokens():
    p = SamplingParams(n=2, best_of=4, temperature=0.8, max_tokens=None)
    assert p.actual_best_of == 4 and p.max_tokens is None


@pytest.mark.parametrize("kwargs, field, allowed", [
    (dict(n=0), "n", ">= 1"),
    (dict(n=True), "n", ">= 1"),
    (dict(n=3, best_of=2), "best_of", ">= n"),
    (dict(presence_penalty=2.5), "presence_penalty", "[-2.0, 2.0]"),
    (dict(frequency_penalty=-3), "frequency_penalty", "[-2.0, 2.0]"),
    (dict(repetition_penalty=0.0), "repetition_penalty", "(0.0, 2.0]"),
    (dict(temperature=-0.1), "temperature", ">= 0"),
    (dict(top_p=0.0), "top_p", "(0.0, 1.0]"),
    (dict(top_p=1.5), "top_p", "(0.0, 1.0]"),
    (dict(top_k=0), "top_k", "-1 (off)"),
    (dict(min_p=1.5), "min_p", "[0.0, 1.0]"),
    (dict(seed=-1), "seed", ">= 0"),
    (dict(max_tokens=0), "max_tokens", ">= 1"),
    (dict(min_tokens=5, max_tokens=3), "min_tokens", "[0, max_tokens=3]"),
    (dict(logprobs=-1), "logprobs", ">= 0"),
    (dict(prompt_logprobs=-2), "prompt_logprobs", ">= 0"),
    (dict(stop=["ok", ""]), "stop", "non-empty"),
    (dict(stop_token_ids=[-1]), "stop_token_ids", "[0, 2147483647]"),
    (dict(ignore_eos="yes"), "ignore_eos", "bool"),
    (dict(n=2, temperature=0.0), "best_of", "must be 1 when using greedy"),
    (dict(early_stopping=True), "early_stopping", "must be False when not using beam search"),
    (dict(length_penalty=2.0), "length_penalty", "must be 1.0 when not using beam search"),
    (dict(use_beam_search=True, temperature=0.0), "best_of", ">= 2"),
    (dict(n=2, use_beam_search=True), "temperature", "must be 0"),
    (dict(n=2, use_beam_search=True, temperature=0.0, top_p=0.9), "top_p", "must be 1"),
    (dict(n=2, use_beam_search=True, temperature=0.0, top_k=4), "top_k", "must be -1"),
    (dict(n=2, use_beam_search=True, temperature=0.0, early_stopping="sometimes"),
     "early_stopping", "'never'"),
])
def test_invalid_values_name_field_and_range(kwargs, field, allowed):
    with pytest.raises(ValueError) as e:
        SamplingParams(**kwargs)
    assert field in str(e.value) and allowed in str(e.value)


FLOAT_FIELDS = ["presence_penalty", "frequency_penalty", "repetition_penalty", "temperature",
                "top_p", "min_p", "length_penalty"]


def _beam(**kwargs):
    """Beam search, where length_penalty may differ from 1."""
    return SamplingParams(n=2, use_beam_search=True, temperature=0.0, **kwargs)


@pytest.mark.parametrize("field", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, 1e39, -1e39, 3.5e38])
def test_float_fields_must_be_finite_float32(field, value):
    make = _beam if field == "length_penalty" else SamplingParams
    with pytest.raises(ValueError, match=field):
        make(**{field: value})


@pytest.mark.parametrize("field", FLOAT_FIELDS)
@pytest.mark.parametrize("value", ["0.5", True, None, [1.0]])
def test_float_fields_reject_non_numbers(field, value):
    make = _beam if field == "length_penalty" else SamplingParams
    with pytest.raises(ValueError, match=field):
        make(**{field: value})


def test_float32_edges_and_numpy_floats():
    assert SamplingParams(temperature=3.4e38).temperature == 3.4e38
    assert _beam(length_penalty=-3.4e38).length_penalty == -3.4e38
    p = SamplingParams(temperature=np.float32(0.5), top_p=np.float64(0.9), min_p=np.float16(0.25),
                       repetition_penalty=1, presence_penalty=np.int64(1))
    assert (p.temperature, p.top_p, p.min_p, p.repetition_penalty, p.presence_penalty) == \
        (0.5, 0.9, 0.25, 1.0, 1.0)
    assert all(type(getattr(p, f)) is float for f in FLOAT_FIELDS)


INT_FIELDS = {"n": {}, "best_of": {}, "top_k": {}, "seed": {}, "max_tokens": {},
              "min_tokens": {}, "logprobs": {}, "prompt_logprobs": {}}


@pytest.mark.parametrize("field", sorted(INT_FIELDS))
@pytest.mark.parametrize("value", [True, False, 2.0, np.float64(2.0), "2", [2], math.nan])
def test_int_fields_reject_bool_float_str(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_numpy_ints_are_accepted_and_normalised():
    p = SamplingParams(n=np.int64(2), best_of=np.int32(3), top_k=np.int64(5), seed=np.uint32(7),
                       max_tokens=np.int16(9), min_tokens=np.int8(1), logprobs=np.int64(2),
                       prompt_logprobs=np.int64(0), stop_token_ids=[np.int64(4), np.int32(5)])
    assert (p.n, p.best_of, p.top_k, p.seed, p.max_tokens, p.min_tokens, p.logprobs,
            p.prompt_logprobs) == (2, 3, 5, 7, 9, 1, 2, 0)
    assert all(type(getattr(p, f)) is int for f in INT_FIELDS)
    assert p.stop_token_ids == [4, 5] and all(type(t) is int for t in p.stop_token_ids)
    with pytest.raises(ValueError, match="n must be an int"):
        SamplingParams(n=np.bool_(True))


def test_int32_ranges():
    assert SamplingParams(stop_token_ids=[0, 2**31 - 1]).stop_token_ids == [0, 2**31 - 1]
    assert SamplingParams(top_k=2**31 - 1).top_k == 2**31 - 1
    # Host-only ints are not bounded: seeds are reduced mod 2**32, lengths are Python ints.
    assert SamplingParams(seed=2**70, max_tokens=2**63).seed == 2**70
    for bad in ([2**31], [2**40], [5, -1], [np.int64(2**40)]):
        with pytest.raises(ValueError, match=r"stop_token_ids must be ints in \[0, 2147483647\]"):
            SamplingParams(stop_token_ids=bad)
    with pytest.raises(ValueError, match="top_k must be -1"):
        SamplingParams(top_k=2**31)


@pytest.mark.parametrize("value", [5, "2", {2: 1}, {2}, np.int64(3)])
def test_stop_token_ids_must_be_a_list(value):
    with pytest.raises(ValueError, match="stop_token_ids must be a list of token ids"):
        SamplingParams(stop_token_ids=value)


@pytest.mark.parametrize("value, message", [
    (5, "stop must be a string or a list of strings"),
    ({"a": 1}, "stop must be a string or a list of strings"),
    (b"###", "stop must be a string or a list of strings"),
    (["ok", 3], "stop must be a non-empty string"),
    ([["nested"]], "stop must be a non-empty string"),
])
def test_stop_must_be_strings(value, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(stop=value)
