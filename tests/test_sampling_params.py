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
    (dict(stop_token_ids=[-1]), "stop_token_ids", ">= 0"),
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
