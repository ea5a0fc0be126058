"""Sampler: masks, penalties, seeds, logprobs and the no-retrace property (CPU)."""
import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpaged import sampler as smp
from jpaged.sampler import SamplerModes, sample
import sampling_rows as rows_lib
from sampling_rows import build_sampling_tensors

_TRACES = []


def _traced_sample(logits, t, modes):
    _TRACES.append(modes)  # runs once per trace, not per call
    return sample(logits, t, modes)


_sample = jax.jit(_traced_sample, static_argnames="modes")


def _run(rows, logits, S=8):
    """Sample with coarse modes, fixed token widths and 5 logprobs, so tests
    with S x 64 logits share one compilation per (greedy, sampling).
    Returns (SamplerOutput, the exact modes of rows)."""
    V = logits.shape[-1]
    t, m = build_sampling_tensors(rows, V, S, pad_prompt_to=16, pad_output_to=16, coarse_modes=True)
    if not m.do_penalties:  # penalties on with all-padding token arrays: a no-op
        pad = np.full((S, 16), V, np.int32)
        t = dataclasses.replace(t, output_token_ids=pad, prompt_token_ids=pad)
    m = dataclasses.replace(m, do_penalties=True, num_logprobs=5)
    return _sample(jnp.asarray(logits, jnp.float32), t, m), build_sampling_tensors(rows, V, S)[1]


_N, _V = 4096, 8


def _draw(logits_row, **row):
    """_N draws from one distribution over <= _V tokens (padded with -inf
    logits, which must never be drawn): rows with seeds 0.._N-1. Coarse modes
    keep every call on one compilation; the exact modes are returned."""
    logits_row = np.concatenate([logits_row, np.full(_V - len(logits_row), -np.inf)])
    rows = [dict(row, seed=i) for i in range(_N)]
    t, m = build_sampling_tensors(rows, _V, _N, coarse_modes=True, pad_prompt_to=1, pad_output_to=1)
    logits = jnp.asarray(np.tile(logits_row.astype(np.float32), (_N, 1)))
    ids = np.asarray(_sample(logits, t, m).sampled_token_ids)
    return ids, build_sampling_tensors(rows[:1], _V, 1)[1]


def _freqs(ids, V):
    f = np.bincount(ids, minlength=_V) / len(ids)
    assert f[V:].sum() == 0, "a padding token (logit -inf) was drawn"
    return f[:V]


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))


def test_greedy_is_argmax_alone_and_mixed():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(8, 64)).astype(np.float32)
    t, m = build_sampling_tensors([dict(temperature=0.0)] * 5, 64, 8)
    assert m == SamplerModes(all_greedy=True)
    out = _sample(jnp.asarray(logits), t, m)
    np.testing.assert_array_equal(out.sampled_token_ids, logits.argmax(-1))
    # Greedy rows inside a sampled batch still take the argmax.
    rows = [dict(temperature=0.0), dict(temperature=1.5, top_k=5, seed=1),
            dict(temperature=0.0, top_p=0.3), dict(temperature=0.9, min_p=0.2, seed=2)]
    out, m = _run(rows, logits)
    assert not m.all_greedy and m.do_top_k_top_p and m.do_min_p
    out = np.asarray(out.sampled_token_ids)
    assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax()
    np.testing.assert_array_equal(out[4:], logits[4:].argmax(-1))  # padded rows


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_frequencies(temperature):
    logits = np.array([1.0, 0.5, 0.0, -0.5, -1.0, -3.0], np.float32)
    ids, m = _draw(logits, temperature=temperature)
    assert m == SamplerModes(all_greedy=False)
    np.testing.assert_allclose(_freqs(ids, 6), _softmax(logits / temperature), atol=0.03)


def test_top_k_masks_and_renormalises():
    logits = np.array([0.0, 2.0, 1.0, 0.5, 1.5, -1.0, 0.2, 0.1], np.float32)
    ids, m = _draw(logits, top_k=3)
    assert m.do_top_k_top_p and not m.do_min_p
    allowed = np.array([1, 4, 2])
    assert set(ids.tolist()) <= set(allowed.tolist())
    want = np.zeros(8)
    want[allowed] = _softmax(logits[allowed])
    np.testing.assert_allclose(_freqs(ids, 8), want, atol=0.03)


def test_top_p_nucleus():
    probs = np.array([0.1, 0.5, 0.15, 0.25])
    ids, _ = _draw(np.log(probs).astype(np.float32), top_p=0.7)
    # Sorted: 0.5, 0.25 | 0.15 (mass before it is 0.75 >= 0.7) -> keep {1, 3}.
    assert set(ids.tolist()) == {1, 3}
    np.testing.assert_allclose(_freqs(ids, 4), [0, 2 / 3, 0, 1 / 3], atol=0.03)


def test_min_p():
    probs = np.array([0.3, 0.1, 0.5, 0.1])
    ids, m = _draw(np.log(probs).astype(np.float32), min_p=0.3)
    assert m.do_min_p and not m.do_top_k_top_p
    # threshold 0.3 * 0.5 = 0.15 -> keep {0, 2}
    assert set(ids.tolist()) == {0, 2}
    np.testing.assert_allclose(_freqs(ids, 4), [0.375, 0, 0.625, 0], atol=0.03)


def _np_top_k_top_p_mask(logits, k, p):
    """Reference: True where a token survives top-k then top-p (no ties)."""
    V = len(logits)
    order = np.argsort(-logits)
    k = V if k <= 0 else min(k, V)
    keep = np.zeros(V, bool)
    keep[order[:k]] = True
    pr = _softmax(np.where(keep, logits, -np.inf))
    mass = 0.0
    keep2 = np.zeros(V, bool)
    for j, tok in enumerate(order[:k]):
        if j == 0 or mass < p or p >= 1:
            keep2[tok] = True
        mass += pr[tok]
    return keep2


def test_top_k_top_p_matches_reference_on_random_rows():
    rng = np.random.default_rng(1)
    S, V = 64, 40
    logits = (rng.normal(size=(S, V)) * 2).astype(np.float32)
    ks = rng.integers(-1, V + 3, size=S).astype(np.int32)
    ps = rng.uniform(0.05, 1.0, size=S).astype(np.float32)
    ps[:8] = 1.0
    out = np.asarray(jax.jit(smp.apply_top_k_top_p)(logits, ks, ps))
    for i in range(S):
        np.testing.assert_array_equal(np.isfinite(out[i]), _np_top_k_top_p_mask(logits[i], ks[i], ps[i]),
                                      err_msg=f"row {i} k={ks[i]} p={ps[i]}")
        np.testing.assert_array_equal(out[i][np.isfinite(out[i])], logits[i][np.isfinite(out[i])])


def test_penalties_hand_computed_and_padding_dropped():
    V = 5
    logits = np.array([[2.0, -1.0, 0.5, 1.5, 3.0],
                       [2.0, -1.0, 0.5, 1.5, 3.0]], np.float32)
    rows = [dict(temperature=0.0, repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25,
                 prompt_token_ids=[2, 1], output_token_ids=[0, 0, 3]),
            # A row with long, different-length token lists: its padding must be dropped.
            dict(temperature=0.0, presence_penalty=1.0, prompt_token_ids=[4] * 12, output_token_ids=[4])]
    t, m = build_sampling_tensors(rows, V, 2, pad_prompt_to=24, pad_output_to=8)
    assert m.do_penalties
    assert t.prompt_token_ids.shape == (2, 24) and t.output_token_ids.shape == (2, 8)
    assert (t.output_token_ids[0, 3:] == V).all() and (t.prompt_token_ids[1, 12:] == V).all()
    got = np.asarray(jax.jit(smp.apply_penalties)(jnp.asarray(logits), t))
    # token 0: seen, 2/2 = 1, count 2 -> 1 - 2*0.5 - 0.25 = -0.25
    # token 1: in prompt, negative -> -1*2 = -2
    # token 2: in prompt -> 0.5/2 = 0.25
    # token 3: seen, 1.5/2 = 0.75, count 1 -> 0.75 - 0.5 - 0.25 = 0
    # token 4: unseen -> 3
    np.testing.assert_allclose(got[0], [-0.25, -2.0, 0.25, 0.0, 3.0], rtol=1e-6)
    np.testing.assert_allclose(got[1], [2.0, -1.0, 0.5, 1.5, 2.0], rtol=1e-6)
    # Through sample (64-token vocab, padded with the id 64): greedy picks the penalised argmax.
    wide = np.full((8, 64), -10.0, np.float32)
    wide[:2, :5] = logits
    out, m = _run(rows, wide)
    assert m.do_penalties
    np.testing.assert_array_equal(out.sampled_token_ids[:2], [4, 0])
    # Logprobs stay those of the raw logits.
    np.testing.assert_allclose(out.sampled_logprobs[:2], _log_softmax(wide)[[0, 1], [4, 0]], rtol=1e-5)


def test_same_seed_and_step_same_token_whatever_the_batch():
    V = 64
    base = np.zeros(V, np.float32)  # uniform: the token reveals the noise
    probe = [dict(temperature=1.0, seed=s, step=st) for s, st in [(7, 3), (123456789, 0), (2**32 + 5, 11)]]
    others = [dict(temperature=0.7, top_k=50, seed=99), dict(temperature=0.0), dict(temperature=2.0, seed=1, step=4)]

    def run(rows, S, where):
        return np.asarray(_run(rows, np.tile(base, (S, 1)), S)[0].sampled_token_ids)[where]

    a = run(probe, 8, [0, 1, 2])
    b = run(others + probe[::-1], 8, [5, 4, 3])
    c = run(others + [probe[1]] * 13, 16, slice(3, None))  # another batch bucket
    np.testing.assert_array_equal(a, b)
    assert (c == a[1]).all()
    # Different seeds (or steps) give different tokens.
    seeds = [dict(temperature=1.0, seed=s) for s in range(16)]
    assert len(set(run(seeds, 16, slice(None)).tolist())) >= 10
    steps = [dict(temperature=1.0, seed=5, step=i) for i in range(16)]
    assert len(set(run(steps, 16, slice(None)).tolist())) >= 10


def test_no_retrace_across_numeric_values():
    rng = np.random.default_rng(3)
    settings = [
        [dict(temperature=1.0, top_k=5, top_p=0.9, min_p=0.05, repetition_penalty=1.1, seed=1,
              prompt_token_ids=[1, 2], output_token_ids=[3])],
        [dict(temperature=0.3, top_k=40, top_p=0.5, min_p=0.2, frequency_penalty=0.7, seed=2, step=9,
              prompt_token_ids=[5] * 9, output_token_ids=[6, 7, 8]),
         dict(temperature=0.0, top_k=1, top_p=0.99, min_p=0.01, presence_penalty=-0.4)],
        [dict(temperature=2.5, top_k=3, top_p=0.1, min_p=0.5, repetition_penalty=0.8, seed=3, step=1)] * 8,
        [dict(temperature=1.0, seed=4)],
    ]
    _run(settings[0], rng.normal(size=(8, 64)))  # may compile (or reuse an earlier test's trace)
    num_traces = len(_TRACES)
    assert num_traces >= 1
    for rows in settings:
        out, _ = _run(rows, rng.normal(size=(8, 64)))
        out.sampled_token_ids.block_until_ready()
    assert len(_TRACES) == num_traces


def test_modes_are_only_speed_switches():
    """The coarse (all-on) modes give the same tokens as the exact ones."""
    rng = np.random.default_rng(4)
    V, S = 64, 8
    logits = jnp.asarray(rng.normal(size=(S, V)), jnp.float32)
    rows = [dict(temperature=0.8, seed=i, step=i) for i in range(6)] + [dict(temperature=0.0)]
    t, m = build_sampling_tensors(rows, V, S)
    assert m == SamplerModes(all_greedy=False)
    coarse, _ = _run(rows, logits)
    np.testing.assert_array_equal(_sample(logits, t, m).sampled_token_ids, coarse.sampled_token_ids)
    mc = build_sampling_tensors(rows, V, S, coarse_modes=True)[1]
    assert mc in rows_lib.all_modes(coarse=True) and mc != m
    assert len(set(rows_lib.all_modes(coarse=True))) == 4 * len(smp.LOGPROBS_BUCKETS)
    assert len(set(rows_lib.all_modes(coarse=False))) == 10 * len(smp.LOGPROBS_BUCKETS)


def test_logprobs_match_log_softmax():
    rng = np.random.default_rng(5)
    V, S = 64, 8
    logits = (rng.normal(size=(S, V)) * 3).astype(np.float32)
    rows = [dict(temperature=1.0, seed=1, logprobs=3), dict(temperature=0.0, logprobs=0),
            dict(temperature=0.5, top_k=2, seed=3)]
    out, m = _run(rows, logits)
    assert m.num_logprobs == 5
    ref = _log_softmax(logits)
    ids = np.asarray(out.sampled_token_ids)
    np.testing.assert_allclose(out.sampled_logprobs, ref[np.arange(S), ids], rtol=1e-5, atol=1e-6)
    ranks = 1 + (ref > ref[np.arange(S), ids][:, None]).sum(-1)
    np.testing.assert_array_equal(out.sampled_ranks, ranks)
    want_ids = np.argsort(-ref, axis=-1)[:, :5]
    np.testing.assert_array_equal(out.topk_token_ids, want_ids)
    np.testing.assert_allclose(out.topk_logprobs, np.take_along_axis(ref, want_ids, -1), rtol=1e-5)
    ids_k, lp_k = smp.compute_logprobs_topk(jnp.asarray(logits), 4)[1:]
    np.testing.assert_array_equal(ids_k, want_ids[:, :4])
    np.testing.assert_allclose(lp_k, np.take_along_axis(ref, want_ids[:, :4], -1), rtol=1e-5)


_exact_top_k = jax.jit(smp.exact_top_k, static_argnums=1)


@pytest.mark.parametrize("m", [5, 200, 256, 257, 4097, 49152])
def test_exact_top_k_is_a_stable_top_k(m):
    """Rows ranked whole (m <= RANK_MAX) and cut down by chunks (a real
    vocabulary): the values and indices of a stable descending sort, ties
    (rounded values), -inf runs and the padding's place included."""
    rng = np.random.default_rng(m)
    R = 3
    x = rng.normal(size=(3 * R, m)).astype(np.float32)
    x[R:2 * R] = np.round(x[R:2 * R] * 2) / 2  # many equal values
    x[2 * R:][rng.random((R, m)) < 0.95] = -np.inf
    x[-1, :] = -np.inf  # a row with nothing but -inf: the lowest indices, in order
    for k in sorted({0, 1, min(m, 5), min(m, 20)}):
        want = np.argsort(-x, axis=1, kind="stable")[:, :k]
        vals, ids = _exact_top_k(jnp.asarray(x), k)
        np.testing.assert_array_equal(ids, want, err_msg=f"m={m} k={k}")
        np.testing.assert_array_equal(vals, np.take_along_axis(x, want, 1))
        assert ids.dtype == jnp.int32 and vals.shape == (3 * R, k)
    if m == 5:
        with pytest.raises(ValueError, match=r"k=6 must be in \[0, 5\]"):
            smp.exact_top_k(jnp.zeros((1, 5)), 6)
    if m == 4097:
        with pytest.raises(ValueError, match=r"k=129 must be in \[0, 128\]"):
            smp.exact_top_k(jnp.zeros((1, m)), 129)


def test_exact_top_k_compiles_without_a_vocabulary_sized_constant():
    """XLA folds any index array made of constants (a padded iota) into a
    literal carried by the kernels: at 256 rows of OPT's 50,272 entries a
    51 MB s32 constant, which took the GPU compiler minutes per prefill
    bucket. The compiled top-k holds no constant larger than a small table."""
    x = jax.ShapeDtypeStruct((256, 50272), jnp.float32)
    hlo = jax.jit(lambda v: smp.exact_top_k(v, 20)).lower(x).compile().as_text()
    shapes = re.findall(r"= \w+\[([\d,]*)\][^ ]* constant\(", hlo)
    sizes = [math.prod(int(d) for d in s.split(",")) for s in shapes if s]
    assert shapes and max(sizes, default=1) <= 4096, sorted(sizes)[-3:]


def test_prompt_logprobs_with_padding():
    rng = np.random.default_rng(6)
    T, V = 7, 20
    logits = rng.normal(size=(T, V)).astype(np.float32)
    nxt = np.array([3, 0, 19, 5, 5, V, V], np.int32)
    out = jax.jit(smp.prompt_logprobs, static_argnums=2)(jnp.asarray(logits), jnp.asarray(nxt), 2)
    ref = _log_softmax(logits)
    np.testing.assert_allclose(out.token_logprobs[:5], ref[np.arange(5), nxt[:5]], rtol=1e-5)
    np.testing.assert_array_equal(out.token_logprobs[5:], 0.0)
    np.testing.assert_array_equal(out.token_ranks[5:], 0)
    np.testing.assert_array_equal(out.token_ranks[:5], 1 + (ref[:5] > ref[np.arange(5), nxt[:5]][:, None]).sum(-1))
    np.testing.assert_array_equal(out.topk_token_ids, np.argsort(-ref, -1)[:, :2])
    lp, ids_top, lp_top = out[0], out[2], out[3]
    assert lp.shape == (T,) and ids_top.shape == lp_top.shape == (T, 2)


def test_builder_errors_and_helpers():
    with pytest.raises(ValueError, match="top_p"):
        build_sampling_tensors([dict(top_p=0.0)], 10, 1)
    with pytest.raises(ValueError, match="temperature"):
        build_sampling_tensors([dict(temperature=-1.0)], 10, 1)
    with pytest.raises(ValueError, match="min_p"):
        build_sampling_tensors([dict(min_p=1.5)], 10, 1)
    with pytest.raises(ValueError, match="repetition_penalty"):
        build_sampling_tensors([dict(repetition_penalty=0.0)], 10, 1)
    with pytest.raises(ValueError, match="pad_rows_to"):
        build_sampling_tensors([{}, {}], 10, 1)
    with pytest.raises(ValueError, match="outside"):
        build_sampling_tensors([dict(repetition_penalty=1.2, output_token_ids=[10])], 10, 1)
    with pytest.raises(ValueError, match="pad_output_to"):
        build_sampling_tensors([dict(repetition_penalty=1.2, output_token_ids=[1] * 5)], 10, 1, pad_output_to=4)
    with pytest.raises(ValueError, match="unknown"):
        build_sampling_tensors([dict(temprature=1.0)], 10, 1)
    with pytest.raises(ValueError, match="maximum"):
        rows_lib.logprobs_bucket(21)
    with pytest.raises(ValueError, match="num_logprobs"):
        SamplerModes(num_logprobs=3)
    assert [rows_lib.logprobs_bucket(k) for k in (None, 0, 1, 5, 6, 20)] == [0, 0, 5, 5, 20, 20]
    with pytest.raises(ValueError, match="outside"):
        build_sampling_tensors([dict(repetition_penalty=1.2, prompt_token_ids=[2**40])], 10, 1)
    t, _ = build_sampling_tensors([dict(frequency_penalty=1.0, output_token_ids=np.array([3, 4], np.int32))], 10, 2)
    np.testing.assert_array_equal(t.output_token_ids, [[3, 4] + [10] * 14, [10] * 16])
    # Without penalties the token arrays have width 0 (nothing to transfer).
    t, m = build_sampling_tensors([dict(output_token_ids=[1, 2])], 10, 2)
    assert not m.do_penalties and t.output_token_ids.shape == (2, 0)
    # sampling_row reads SamplingParams-like attributes.
    class P:
        temperature, top_p, top_k, seed, logprobs = 0.5, 0.9, 7, 3, 2
    row = rows_lib.sampling_row(P(), prompt_token_ids=[1], output_token_ids=[2, 3], seed=smp.derive_seed(3, 1))
    assert row["step"] == 2 and row["top_k"] == 7 and row["repetition_penalty"] == 1.0
    t, m = build_sampling_tensors([row], 10, 1)
    assert t.seeds[0] == smp.derive_seed(3, 1) and t.top_ks[0] == 7 and m.num_logprobs == 5
    assert len({smp.derive_seed(3, i) for i in range(100)}) == 100


def test_banned_tokens_are_never_drawn():
    import jax.numpy as jnp
    logits = jnp.array([[0.0, 5.0, 4.0, 1.0]] * 2)
    rows = [dict(temperature=0.0, banned_token_ids=[1]), dict(temperature=0.0)]
    t, _ = build_sampling_tensors(rows, 4, 2)
    modes = SamplerModes(all_greedy=True, do_penalties=False, do_top_k_top_p=False,
                         do_min_p=False, num_logprobs=0)
    out = sample(logits, t, modes)
    assert out.sampled_token_ids.tolist() == [2, 1]
    # raw logprobs are of the unmodified distribution
    assert float(out.sampled_logprobs[0]) < float(out.sampled_logprobs[1])


def test_builder_fixed_shapes_seeds_and_banned():
    V, S, L = 10, 4, 8
    # No row has a penalty: the token arrays are padding views, nothing written.
    t, m = build_sampling_tensors([dict(output_token_ids=[1, 2]), {}], V, S,
                                  pad_prompt_to=L, pad_output_to=L, fixed_shapes=True)
    assert not m.do_penalties and t.output_token_ids.shape == t.prompt_token_ids.shape == (S, L)
    assert (t.output_token_ids == V).all() and (t.prompt_token_ids == V).all()
    # Some row has one: only the penalty rows are filled.
    rows = [dict(output_token_ids=[1, 2]), dict(repetition_penalty=1.2, output_token_ids=[3],
                                                 prompt_token_ids=[4, 5])]
    t, m = build_sampling_tensors(rows, V, S, pad_prompt_to=L, pad_output_to=L, fixed_shapes=True)
    assert m.do_penalties
    np.testing.assert_array_equal(t.output_token_ids[:, :2], [[V, V], [3, V], [V, V], [V, V]])
    np.testing.assert_array_equal(t.prompt_token_ids[1, :3], [4, 5, V])
    # Seeds are taken mod 2**32 (negative and huge ones too); None draws from rng, in row order.
    seeds = [-1, 2**40 + 7, 2**70 + 3, None, None]
    t, _ = build_sampling_tensors([dict(seed=s) for s in seeds], V, 6, rng=np.random.default_rng(0))
    drawn = np.random.default_rng(0).integers(0, 1 << 32, 2)
    np.testing.assert_array_equal(t.seeds, [2**32 - 1, 7, 3, *drawn, 0])
    # Banned ids pad with V; more than MAX_BANNED is an error naming the row.
    t, _ = build_sampling_tensors([{}, dict(banned_token_ids=(2, 7))], V, 3)
    np.testing.assert_array_equal(t.banned_token_ids[:, :3], [[V, V, V], [2, 7, V], [V, V, V]])
    with pytest.raises(ValueError, match="row 1: 17 banned_token_ids"):
        build_sampling_tensors([{}, dict(banned_token_ids=range(17))], V, 2)
