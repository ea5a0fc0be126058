"""Logits processing and sampling inside the jitted step (pure jax).

The engine builds one `SamplingTensors` per step on the host with
`build_sampling_tensors` (numpy only) and passes it, with the static
`SamplerModes` it returns, into the jitted step, which calls `sample`.

Every numeric sampling value (temperature, top-p, top-k, min-p, penalties,
seeds, steps) is a traced per-row array, so a batch that mixes settings
compiles nothing new. Only `SamplerModes` is static, and each mode flag only
switches a stage *off* for speed: every stage is a no-op on a row whose value
is "off" (temperature 0 -> greedy, top_k <= 0, top_p = 1, min_p = 0,
repetition_penalty = 1, presence/frequency_penalty = 0). So turning a flag on
never changes a result, which is what lets `coarse` modes share compilations.

Processing order (as vLLM): repetition penalty -> frequency and presence
penalties -> (greedy rows: argmax here) -> temperature -> top-k -> top-p ->
min-p -> Gumbel-max sampling with the row's own key.

Randomness: the key of a row is ``fold_in(key(seed), sample_step)`` and
nothing else, so the same (seed, step) gives the same token whatever else is
in the batch and whatever the row index. Sequences of one request that must
differ (n > 1, best_of) need different seeds: see `derive_seed`.

Logprobs are those of the model's raw distribution, ``log_softmax(logits)``
before penalties, temperature and truncation (vLLM V1's default
"raw_logprobs"): they describe the model, not the sampling settings, and they
are what beam search and ``cumulative_logprob`` add up.
"""
from __future__ import annotations

import dataclasses
import operator
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Rows with a temperature below this are greedy (vLLM's _SAMPLING_EPS).
SAMPLING_EPS = 1e-5

# num_logprobs buckets: a request asking for k top logprobs runs in the
# smallest bucket >= k and the host keeps the first k columns. Few buckets
# keep the number of compiled modes small.
LOGPROBS_BUCKETS = (0, 5, 20)
MAX_LOGPROBS = LOGPROBS_BUCKETS[-1]


def logprobs_bucket(num_logprobs: int | None) -> int:
    """The smallest bucket of LOGPROBS_BUCKETS holding `num_logprobs` (None -> 0)."""
    k = 0 if num_logprobs is None else int(num_logprobs)
    if k < 0:
        raise ValueError(f"logprobs must be >= 0 or None, got {num_logprobs}")
    for b in LOGPROBS_BUCKETS:
        if k <= b:
            return b
    raise ValueError(f"logprobs={k} is more than the supported maximum {MAX_LOGPROBS}")


# --------------------------------------------------------------------------
# Static modes
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SamplerModes:
    """Static switches of `sample` (part of the jit cache key; hashable).

    all_greedy:     every row is greedy: no temperature, truncation or noise.
    do_penalties:   apply repetition / frequency / presence penalties (the
                    token arrays of SamplingTensors then have width > 0).
    do_top_k_top_p: apply top-k and top-p (one sort over the vocabulary).
    do_min_p:       apply min-p.
    num_logprobs:   K, the top-K raw logprobs returned per row; one of
                    LOGPROBS_BUCKETS.

    Canonical form: when all_greedy, do_top_k_top_p and do_min_p are False.
    Distinct modes: exact policy 2*(1 + 4)*len(LOGPROBS_BUCKETS) = 30;
    `coarsen()` brings it down to 4*len(LOGPROBS_BUCKETS) = 12: (greedy or
    sampling) x (penalties or not) x logprobs bucket (see `all_modes`).
    """

    all_greedy: bool = True
    do_penalties: bool = False
    do_top_k_top_p: bool = False
    do_min_p: bool = False
    num_logprobs: int = 0

    def __post_init__(self):
        if self.num_logprobs not in LOGPROBS_BUCKETS:
            raise ValueError(
                f"num_logprobs must be one of {LOGPROBS_BUCKETS}, got {self.num_logprobs}; "
                "use logprobs_bucket(k)")
        if self.all_greedy and (self.do_top_k_top_p or self.do_min_p):
            raise ValueError("all_greedy=True with do_top_k_top_p/do_min_p: truncation is "
                             "meaningless for greedy rows, set them False")

    def coarsen(self) -> SamplerModes:
        """The coarse mode covering this one: unless all rows are greedy, every
        truncation on. Results are unchanged (off values are no-ops); only
        4 * len(LOGPROBS_BUCKETS) modes remain. Penalties stay exact: when
        they are on, the host fills the token arrays, which costs host time."""
        return SamplerModes(all_greedy=self.all_greedy, do_penalties=self.do_penalties,
                            do_top_k_top_p=not self.all_greedy,
                            do_min_p=not self.all_greedy,
                            num_logprobs=self.num_logprobs)


def all_modes(coarse: bool = True) -> list[SamplerModes]:
    """Every canonical mode `build_sampling_tensors` can return (for warm-up)."""
    out = []
    for k in LOGPROBS_BUCKETS:
        if coarse:
            for pen in (False, True):
                out += [SamplerModes(True, pen, False, False, k),
                        SamplerModes(False, pen, True, True, k)]
            continue
        for pen in (False, True):
            out.append(SamplerModes(True, pen, False, False, k))
            for tk in (False, True):
                for mp in (False, True):
                    out.append(SamplerModes(False, pen, tk, mp, k))
    return out


# --------------------------------------------------------------------------
# Traced per-row values
# --------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingTensors:
    """Per-row sampling values of a padded batch of S rows (all traced).

    Token arrays are padded with an out-of-range id (vocab_size), which the
    penalty scatters drop; their widths L and P are 0 when the modes have no
    penalties.
    """

    temperatures: Any          # f32[S]   0 -> greedy
    top_ps: Any                # f32[S]   1 -> off
    top_ks: Any                # i32[S]   <= 0 or >= V -> off
    min_ps: Any                # f32[S]   0 -> off
    presence_penalties: Any    # f32[S]   0 -> off
    frequency_penalties: Any   # f32[S]   0 -> off
    repetition_penalties: Any  # f32[S]   1 -> off
    seeds: Any                 # u32[S]
    sample_steps: Any          # i32[S]   index of the generated token being drawn
    output_token_ids: Any      # i32[S, L] padded with vocab_size
    prompt_token_ids: Any      # i32[S, P] padded with vocab_size
    banned_token_ids: Any      # i32[S, MAX_BANNED] never sampled (min_tokens:
                               # EOS and stop ids), padded with vocab_size

    @property
    def num_rows(self) -> int:
        return self.temperatures.shape[0]


_DEFAULTS = dict(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, presence_penalty=0.0,
                 frequency_penalty=0.0, repetition_penalty=1.0, seed=None, step=0,
                 prompt_token_ids=(), output_token_ids=(), logprobs=None,
                 banned_token_ids=())
MAX_BANNED = 16  # banned ids per row (EOS + stop token ids while below min_tokens)
_PADDED_ROW = dict(_DEFAULTS, temperature=0.0, seed=0)


def sampling_row(params: Any, *, prompt_token_ids: Sequence[int] = (),
                 output_token_ids: Sequence[int] = (), seed: int | None = None,
                 step: int | None = None) -> dict:
    """One row for `build_sampling_tensors` from any object with vLLM
    SamplingParams attribute names (missing attributes take vLLM defaults).

    Args:
      params: object with temperature, top_p, top_k, min_p, presence_penalty,
        frequency_penalty, repetition_penalty, seed, logprobs attributes.
      prompt_token_ids / output_token_ids: the sequence's tokens so far.
      seed: overrides params.seed (e.g. `derive_seed(params.seed, i)`).
      step: sample step; defaults to len(output_token_ids).
    """
    row = {k: getattr(params, k, v) for k, v in _DEFAULTS.items()
           if k not in ("prompt_token_ids", "output_token_ids", "step")}
    if seed is not None:
        row["seed"] = seed
    row["prompt_token_ids"] = prompt_token_ids
    row["output_token_ids"] = output_token_ids
    row["step"] = len(output_token_ids) if step is None else step
    return row


def derive_seed(seed: int, index: int) -> int:
    """A 32-bit seed for sequence `index` of a request seeded with `seed`
    (splitmix64 of both), so the samples of an n > 1 request differ but stay
    reproducible."""
    mask = (1 << 64) - 1
    z = (int(seed) * 0x9E3779B97F4A7C15 + int(index) + 0x632BE59BD9B4E019) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return (z ^ (z >> 31)) & 0xFFFFFFFF


def _bucket_width(n: int, pad_to: int | None, what: str) -> int:
    if pad_to is None:  # next power of two, at least 16: few distinct shapes
        return max(16, 1 << max(n - 1, 0).bit_length())
    if n > pad_to:
        raise ValueError(f"a row has {n} {what} tokens, more than pad_{what}_to={pad_to}")
    return pad_to


def build_sampling_tensors(
    rows: Sequence[Mapping[str, Any]],
    vocab_size: int,
    pad_rows_to: int,
    *,
    pad_prompt_to: int | None = None,
    pad_output_to: int | None = None,
    coarse_modes: bool = False,
    rng: np.random.Generator | None = None,
    fixed_shapes: bool = False,
) -> tuple[SamplingTensors, SamplerModes]:
    """Host-side (numpy only) builder of one step's sampling inputs.

    Args:
      rows: one mapping per running sequence, keys (all optional, vLLM names
        and defaults): temperature, top_p, top_k, min_p, presence_penalty,
        frequency_penalty, repetition_penalty, seed (int or None), logprobs
        (int or None), step (int: generated tokens so far), prompt_token_ids,
        output_token_ids (int sequences; numpy int arrays are fastest: the
        token arrays are only filled when some row has a penalty). A row made
        by `sampling_row` fits.
      vocab_size: V, the last dim of the logits; also the padding token id.
      pad_rows_to: S, the batch bucket; extra rows are greedy and inert.
      pad_prompt_to / pad_output_to: P / L, widths of the token arrays when
        penalties are on. Pass fixed values (e.g. max_model_len) so shapes
        never change; None picks the next power of two >= 16.
      coarse_modes: return `modes.coarsen()` (12 modes in all, see
        SamplerModes).
      rng: draws seeds for rows whose seed is None (default: fresh entropy).
        An engine should rather fix one seed per sequence when it is added.
      fixed_shapes: always return the token arrays at widths pad_prompt_to /
        pad_output_to (both required), filling only the rows that have a
        penalty, so the token arrays' shapes never change (whether the
        penalty stage runs is the modes' do_penalties). When no row has a penalty
        they are read-only broadcast views of the padding id, which cost
        no host memory.

    Returns:
      (tensors with numpy arrays, modes). Rows whose `logprobs` is k get the
      modes' num_logprobs >= k; keep the first k top columns on the host.
    """
    n = len(rows)
    if n > pad_rows_to:
        raise ValueError(f"{n} rows do not fit in pad_rows_to={pad_rows_to}")
    unknown = set().union(*rows) - _DEFAULTS.keys()
    if unknown:
        raise ValueError(f"unknown sampling row keys {sorted(unknown)}; allowed: {sorted(_DEFAULTS)}")

    def values(name):
        try:  # rows usually carry every key: a C-level pass
            return list(map(operator.itemgetter(name), rows))
        except KeyError:
            default = _DEFAULTS[name]
            return [r.get(name, default) for r in rows]

    def col(name, dtype):
        # NOTE: rows past n are the inert padded rows (_PADDED_ROW).
        out = np.full(pad_rows_to, _PADDED_ROW[name], dtype)
        out[:n] = values(name)
        return out

    temps, top_ps, min_ps = col("temperature", np.float32), col("top_p", np.float32), col("min_p", np.float32)
    top_ks = np.zeros(pad_rows_to, np.int64)
    top_ks[:n] = [0 if k is None else k for k in values("top_k")]
    rep = col("repetition_penalty", np.float32)
    pres, freq = col("presence_penalty", np.float32), col("frequency_penalty", np.float32)
    if (temps < 0).any() or not np.isfinite(temps).all():
        raise ValueError(f"temperature must be a finite value >= 0, got {temps[:n].tolist()}")
    if ((top_ps <= 0) | (top_ps > 1)).any():
        raise ValueError(f"top_p must be in (0, 1], got {top_ps[:n].tolist()}")
    if ((min_ps < 0) | (min_ps > 1)).any():
        raise ValueError(f"min_p must be in [0, 1], got {min_ps[:n].tolist()}")
    if (rep <= 0).any() or not np.isfinite(rep).all():
        raise ValueError(f"repetition_penalty must be > 0, got {rep[:n].tolist()}")
    if not (np.isfinite(pres).all() and np.isfinite(freq).all()):
        raise ValueError("presence_penalty and frequency_penalty must be finite")
    top_ks = np.where((top_ks <= 0) | (top_ks >= vocab_size), 0, top_ks).astype(np.int32)

    seeds = np.zeros(pad_rows_to, np.uint32)
    row_seeds = values("seed")
    try:  # int64 & 0xFFFFFFFF is int(s) % 2**32, negative seeds included
        seeds[:n] = np.asarray(row_seeds, np.int64) & 0xFFFFFFFF
    except (TypeError, ValueError, OverflowError):  # a None seed (drawn in row order) or a huge one
        for i, s in enumerate(row_seeds):
            if s is None:
                rng = np.random.default_rng() if rng is None else rng
                s = int(rng.integers(0, 1 << 32))
            seeds[i] = int(s) % (1 << 32)
    steps = col("step", np.int32)

    is_greedy = temps < SAMPLING_EPS
    sampled = ~is_greedy
    has_penalty = (rep != 1) | (pres != 0) | (freq != 0)
    modes = SamplerModes(
        all_greedy=bool(is_greedy.all()),
        do_penalties=bool(has_penalty.any()),
        do_top_k_top_p=bool((sampled & ((top_ks > 0) | (top_ps < 1))).any()),
        do_min_p=bool((sampled & (min_ps > 0)).any()),
        num_logprobs=max(map(logprobs_bucket, dict.fromkeys(values("logprobs"))), default=0),
    )
    if coarse_modes:
        modes = modes.coarsen()

    def tokens(name, pad_to):
        if fixed_shapes:
            if pad_to is None:
                raise ValueError("fixed_shapes needs pad_prompt_to and pad_output_to")
            if not modes.do_penalties:
                # A read-only view of padding: no [S, pad_to] array is written
                # (ModelRunner swaps in a device-resident one).
                return np.broadcast_to(np.int32(vocab_size), (pad_rows_to, pad_to))
            out = np.full((pad_rows_to, pad_to), vocab_size, np.int32)
        elif not modes.do_penalties:
            return np.zeros((pad_rows_to, 0), np.int32)
        seqs = [q if p else () for q, p in zip(values(name), has_penalty.tolist())]
        lens = np.fromiter(map(len, seqs), np.int64, count=n)
        width = _bucket_width(int(lens.max()), pad_to, name.split("_")[0])
        if not fixed_shapes:
            out = np.full((pad_rows_to, width), vocab_size, np.int32)
        try:
            for i, q in enumerate(seqs):
                if len(q):
                    out[i, :len(q)] = q
        except OverflowError as e:
            raise ValueError(f"{name} has an id outside [0, {vocab_size}): {e}") from None
        bad = ((out[:n] < 0) | (out[:n] >= vocab_size)) & (np.arange(width)[None, :] < lens[:, None])
        if bad.any():
            i = int(np.argmax(bad.any(axis=1)))
            raise ValueError(f"row {i}: {name} has ids outside [0, {vocab_size})")
        return out

    banned = np.full((pad_rows_to, MAX_BANNED), vocab_size, np.int32)
    row_banned = values("banned_token_ids")
    num_banned = list(map(len, row_banned))
    if any(num_banned):
        for i, (ids, k) in enumerate(zip(row_banned, num_banned)):
            if k > MAX_BANNED:
                raise ValueError(f"row {i}: {k} banned_token_ids, at most {MAX_BANNED}")
            if k:
                banned[i, :k] = ids
    tensors = SamplingTensors(
        temperatures=temps, top_ps=top_ps, top_ks=top_ks, min_ps=min_ps,
        presence_penalties=pres, frequency_penalties=freq, repetition_penalties=rep,
        seeds=seeds, sample_steps=steps,
        output_token_ids=tokens("output_token_ids", pad_output_to),
        prompt_token_ids=tokens("prompt_token_ids", pad_prompt_to),
        banned_token_ids=banned)
    return tensors, modes


# --------------------------------------------------------------------------
# The jitted part
# --------------------------------------------------------------------------


class SamplerOutput(NamedTuple):
    sampled_token_ids: jax.Array  # i32[S]
    sampled_logprobs: jax.Array   # f32[S]   raw log_softmax(logits) of the sampled token
    sampled_ranks: jax.Array      # i32[S]   1 + number of tokens with a higher raw logprob
    topk_token_ids: jax.Array     # i32[S, K]
    topk_logprobs: jax.Array      # f32[S, K] raw, descending


def apply_penalties(logits, t: SamplingTensors, counts=None, in_prompt=None):
    """Repetition (prompt and output tokens), then frequency and presence
    (output tokens) penalties. f32[S, V] -> f32[S, V].

    counts (i32[S, V], output-token counts) and in_prompt (bool[S, V]) are
    built from t's token arrays unless given (the engine keeps them per
    slot on the device: jpaged.device_batch)."""
    S, V = logits.shape
    rows = jnp.arange(S)[:, None]
    if counts is None:
        counts = jnp.zeros((S, V), jnp.int32).at[rows, t.output_token_ids].add(1, mode="drop")
        in_prompt = jnp.zeros((S, V), jnp.bool_).at[rows, t.prompt_token_ids].set(
            True, mode="drop")
    seen = in_prompt | (counts > 0)
    r = t.repetition_penalties[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / r, logits * r), logits)
    logits = logits - t.frequency_penalties[:, None] * counts
    return logits - t.presence_penalties[:, None] * (counts > 0)


def apply_top_k_top_p(logits, top_ks, top_ps):
    """Mask (to -inf) tokens outside the top-k, then outside the top-p nucleus.
    Ties at a threshold are kept. f32[S, V] -> f32[S, V]."""
    V = logits.shape[-1]
    sorted_desc = -jnp.sort(-logits, axis=-1)  # f32[S, V]
    k = jnp.where(top_ks <= 0, V, jnp.minimum(top_ks, V))  # i32[S]
    pos = jnp.arange(V)[None, :]
    sorted_k = jnp.where(pos < k[:, None], sorted_desc, -jnp.inf)
    probs = jax.nn.softmax(sorted_k, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # The first token is always kept; top_p == 1 keeps the whole top-k even
    # where float round-off leaves the cumulative mass just under 1.
    keep = (mass_before < top_ps[:, None]) | (pos == 0) | (top_ps[:, None] >= 1.0)
    num_kept = jnp.minimum(jnp.sum(keep, axis=-1), k)  # keep is a prefix
    threshold = jnp.take_along_axis(sorted_desc, (num_kept - 1)[:, None], axis=-1)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def apply_min_p(logits, min_ps):
    """Mask tokens whose probability is below min_p times the top one's."""
    top = jnp.max(logits, axis=-1, keepdims=True)
    log_min_p = jnp.log(jnp.maximum(min_ps, 0.0))[:, None]  # -inf when 0
    return jnp.where(logits < top + log_min_p, -jnp.inf, logits)


def _row_gumbel(seeds, steps, vocab_size):
    def one(seed, step):
        key = jax.random.fold_in(jax.random.key(seed), step)
        return jax.random.gumbel(key, (vocab_size,), jnp.float32)
    return jax.vmap(one)(seeds, steps)  # f32[S, V]


def compute_logprobs_topk(logits, k: int):
    """Raw logprobs and their top-k.

    Args:
      logits: f32[S, V] (any float dtype; computed in f32).
      k: static number of top entries (0 allowed).
    Returns:
      (logprobs f32[S, V], topk_token_ids i32[S, k], topk_logprobs f32[S, k]).
    """
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    if k == 0:
        S = logits.shape[0]
        return logprobs, jnp.zeros((S, 0), jnp.int32), jnp.zeros((S, 0), jnp.float32)
    top_lp, top_ids = jax.lax.top_k(logprobs, k)
    return logprobs, top_ids.astype(jnp.int32), top_lp


def _gather_logprob_rank(logprobs, token_ids):
    V = logprobs.shape[-1]
    valid = (token_ids >= 0) & (token_ids < V)
    lp = jnp.take_along_axis(logprobs, jnp.clip(token_ids, 0, V - 1)[:, None], axis=-1)[:, 0]
    rank = 1 + jnp.sum(logprobs > lp[:, None], axis=-1, dtype=jnp.int32)
    return jnp.where(valid, lp, 0.0), jnp.where(valid, rank, 0)


def sample(logits, t: SamplingTensors, modes: SamplerModes, counts=None,
           in_prompt=None) -> SamplerOutput:
    """Process logits and draw one token per row.

    Args:
      logits: f32[S, V] (bf16 is upcast) for the last position of each row.
      t: SamplingTensors of S rows.
      modes: static SamplerModes (e.g. from build_sampling_tensors).
      counts, in_prompt: the penalty stage's token counts (see
        apply_penalties), instead of t's token arrays.
    Returns:
      SamplerOutput; its logprobs are of the raw distribution log_softmax(logits).
    """
    logits = logits.astype(jnp.float32)
    S, V = logits.shape
    logprobs, topk_ids, topk_lp = compute_logprobs_topk(logits, modes.num_logprobs)

    # NOTE: no stage is a run-time branch (lax.cond): on a GPU a cond makes
    # the host wait for its predicate, i.e. for the whole forward pass before
    # it, so the step's launch would block for the device time. The caller
    # picks the modes on the host instead.
    if modes.do_penalties:
        logits = apply_penalties(logits, t, counts, in_prompt)
    logits = logits.at[jnp.arange(S)[:, None], t.banned_token_ids].set(-jnp.inf, mode="drop")
    greedy_ids = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if modes.all_greedy:
        token_ids = greedy_ids
    else:
        is_greedy = t.temperatures < SAMPLING_EPS
        logits = logits / jnp.where(is_greedy, 1.0, t.temperatures)[:, None]
        if modes.do_top_k_top_p:  # one sort, ~1 ms at S=256 on an H100
            logits = apply_top_k_top_p(logits, t.top_ks, t.top_ps)
        if modes.do_min_p:
            logits = apply_min_p(logits, t.min_ps)
        noisy = logits + _row_gumbel(t.seeds, t.sample_steps, V)
        sampled_ids = jnp.argmax(noisy, axis=-1).astype(jnp.int32)
        token_ids = jnp.where(is_greedy, greedy_ids, sampled_ids)

    lp, rank = _gather_logprob_rank(logprobs, token_ids)
    return SamplerOutput(token_ids, lp, rank, topk_ids, topk_lp)


class PromptLogprobs(NamedTuple):
    token_logprobs: jax.Array  # f32[T]    raw logprob of next_token_ids[i] (0 where padded)
    token_ranks: jax.Array     # i32[T]    its rank, 1-based (0 where padded)
    topk_token_ids: jax.Array  # i32[T, k]
    topk_logprobs: jax.Array   # f32[T, k]


def prompt_logprobs(logits, next_token_ids, k: int) -> PromptLogprobs:
    """Logprobs of the prompt: logits[i] predicts next_token_ids[i].

    Args:
      logits: f32[T, V] of prompt positions 0..T-1.
      next_token_ids: i32[T], prompt token i+1 for position i; padded
        positions hold an out-of-range id (e.g. V) and get logprob 0, rank 0.
      k: static top-k width (0 allowed).
    Returns:
      PromptLogprobs (a tuple: token_logprobs, token_ranks, topk ids, topk logprobs).
    """
    logprobs, top_ids, top_lp = compute_logprobs_topk(logits, k)
    lp, rank = _gather_logprob_rank(logprobs, next_token_ids.astype(jnp.int32))
    return PromptLogprobs(lp, rank, top_ids, top_lp)
