"""Logits processing and sampling inside the jitted step (pure jax).

The engine builds a step's `SamplingTensors` on the device from its slot
state (jpaged.device_batch) and calls `sample` with one of a few static
`SamplerModes` (jpaged.model_runner.SAMPLER_MODES).

Every numeric sampling value (temperature, top-p, top-k, min-p, penalties,
seeds, steps) is a traced per-row array, so a batch that mixes settings
compiles nothing new. Only `SamplerModes` is static, and each mode flag only
switches a stage *off* for speed: every stage is a no-op on a row whose value
is "off" (temperature 0 -> greedy, top_k <= 0, top_p = 1, min_p = 0,
repetition_penalty = 1, presence/frequency_penalty = 0). So turning a flag on
never changes a result, which is what lets a few modes serve every mix.

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
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

# Rows with a temperature below this are greedy (vLLM's _SAMPLING_EPS).
SAMPLING_EPS = 1e-5

# num_logprobs buckets: a request asking for k top logprobs runs in the
# smallest bucket >= k and the host keeps the first k columns. Few buckets
# keep the number of compiled modes small.
LOGPROBS_BUCKETS = (0, 5, 20)
MAX_LOGPROBS = LOGPROBS_BUCKETS[-1]


# --------------------------------------------------------------------------
# Static modes
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SamplerModes:
    """Static switches of `sample` (part of the jit cache key; hashable).

    all_greedy:     every row is greedy: no temperature, truncation or noise.
    do_penalties:   apply repetition / frequency / presence penalties (from
                    the token counts given to `sample`, or the token arrays
                    of SamplingTensors).
    do_top_k_top_p: apply top-k and top-p (one sort over the vocabulary).
    do_min_p:       apply min-p.
    num_logprobs:   K, the top-K raw logprobs returned per row; one of
                    LOGPROBS_BUCKETS.

    Canonical form: when all_greedy, do_top_k_top_p and do_min_p are False.
    The engine compiles four (jpaged.model_runner.SAMPLER_MODES).
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


MAX_BANNED = 16  # banned ids per row (EOS + stop token ids while below min_tokens)


def derive_seed(seed: int, index: int) -> int:
    """A 32-bit seed for sequence `index` of a request seeded with `seed`
    (splitmix64 of both), so the samples of an n > 1 request differ but stay
    reproducible."""
    mask = (1 << 64) - 1
    z = (int(seed) * 0x9E3779B97F4A7C15 + int(index) + 0x632BE59BD9B4E019) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return (z ^ (z >> 31)) & 0xFFFFFFFF


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


# exact_top_k: rows up to this wide are ranked by all-pairs comparison
# ([S, m, m] compares fused into one reduction, no sort); wider rows are cut
# down to it a level at a time.
RANK_MAX = 256


def exact_top_k(x, k: int):
    """The k largest entries of each row of x ([R, m], NaN-free) and their
    indices, as jax.lax.top_k but with no sort and in a stable order:
    descending, equal values lower index first (lax.top_k does not promise
    that order; XLA's CPU top_k does not keep it).

    Why: XLA lowers top_k on the GPU to a segmented radix sort of every row
    (0.38 ms a step for k = 20 over a 49k vocabulary at 256 rows on an H200,
    more than the step's attention). Here a row of at most RANK_MAX entries
    gets each entry's rank by counting the entries ahead of it (larger, or
    equal with a lower index) and scatters the first k ranks into place. A
    wider row is split into n <= RANK_MAX contiguous chunks; the k chunks
    whose maxima rank first (equal maxima: lower chunk first) hold every
    entry of the row's top k (were an entry's chunk not among them, the
    maxima of the k chunks ahead of it would be k entries ahead of it), so
    only those chunks, kept in index order, go on to the next level: one
    read of the row, then rows of k x chunk entries.
    """
    R, m = x.shape
    if not 0 <= k <= min(m, RANK_MAX // 2):
        raise ValueError(f"exact_top_k: k={k} must be in [0, {min(m, RANK_MAX // 2)}] (at most "
                         f"the row's length, {m}, and RANK_MAX // 2)")
    if k == 0:
        return jnp.zeros((R, 0), x.dtype), jnp.zeros((R, 0), jnp.int32)
    # NOTE: no index array until the first level has chosen its chunks: a
    # padded iota is a constant that XLA folds into a literal of R x m ints
    # and then carries into the kernels (on the GPU, minutes of compile per
    # prefill bucket at a 50k vocabulary); indices computed from the choice
    # are not constants.
    idx = None
    while x.shape[1] > RANK_MAX:
        m = x.shape[1]
        chunk = -(-m // RANK_MAX)
        n = -(-m // chunk)  # k <= RANK_MAX / 2 < n, and k * chunk < m: each level cuts
        pad = ((0, 0), (0, n * chunk - m))
        # padding: -inf with indices past the row's, so it ranks after any real -inf
        xs = jnp.pad(x, pad, constant_values=-jnp.inf).reshape(R, n, chunk)
        chosen = _ranks(jnp.max(xs, axis=2), jnp.arange(n, dtype=jnp.int32)) < k  # [R, n]
        at = jnp.where(chosen, jnp.cumsum(chosen, axis=1) - 1, k)  # the chosen, in chunk order
        sel = jnp.zeros((R, k), jnp.int32).at[jnp.arange(R)[:, None], at].set(
            jnp.arange(n, dtype=jnp.int32)[None, :], mode="drop")
        x = jnp.take_along_axis(xs, sel[:, :, None], axis=1).reshape(R, k * chunk)
        if idx is None:  # entry j of chunk c is entry c * chunk + j of the row (>= m: padding)
            idx = (sel[:, :, None] * chunk + jnp.arange(chunk, dtype=jnp.int32)).reshape(R, k * chunk)
        else:
            ids = jnp.pad(idx, pad, constant_values=jnp.iinfo(jnp.int32).max).reshape(R, n, chunk)
            idx = jnp.take_along_axis(ids, sel[:, :, None], axis=1).reshape(R, k * chunk)
    if idx is None:
        idx = jnp.broadcast_to(jnp.arange(m, dtype=jnp.int32), (R, m))
    rank = _ranks(x, idx)
    rows = jnp.arange(R)[:, None]
    vals = jnp.zeros((R, k), x.dtype).at[rows, rank].set(x, mode="drop")
    return vals, jnp.zeros((R, k), jnp.int32).at[rows, rank].set(idx, mode="drop")


def _ranks(x, idx):
    """i32[R, m]: how many entries of its row are ahead of each entry
    (larger, or equal with a lower idx: a permutation of 0..m-1 when a
    row's idx are distinct)."""
    a, b = x[:, None, :], x[:, :, None]
    ahead = (a > b) | ((a == b) & (idx[..., None, :] < idx[..., :, None]))
    return jnp.sum(ahead, axis=-1, dtype=jnp.int32)


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
    top_lp, top_ids = exact_top_k(logprobs, k)
    return logprobs, top_ids, top_lp


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
    # NOTE: lax.top_k (a sort), not exact_top_k: a prompt's rows are a
    # prefill's tokens, up to thousands a step, where exact_top_k's GPU
    # compile time is unmeasured. With it here, the H200 sharing bench
    # (1.1B) ran past 240 s with XLA's slow-compile alarms on the prefill
    # forward, whose only top-k is this one (b5d2033), and past 330 s at
    # 79220c8; its warm-up took 54 s with lax.top_k (37b7b15).
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    top_lp, top_ids = jax.lax.top_k(logprobs, k)
    lp, rank = _gather_logprob_rank(logprobs, next_token_ids.astype(jnp.int32))
    return PromptLogprobs(lp, rank, top_ids.astype(jnp.int32), top_lp)
