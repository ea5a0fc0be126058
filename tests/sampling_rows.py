"""Sampler rows built on the host, for the sampler's tests.

The engine builds its SamplingTensors on the device from the slot state
(jpaged.device_batch); these helpers build them from per-row dicts in numpy,
so tests can state each row's settings directly and check `sample` stage
by stage.
"""
from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jpaged.sampler import (LOGPROBS_BUCKETS, MAX_BANNED, MAX_LOGPROBS, SAMPLING_EPS,
                            SamplerModes, SamplingTensors)


def logprobs_bucket(num_logprobs: int | None) -> int:
    """The smallest bucket of LOGPROBS_BUCKETS holding `num_logprobs` (None -> 0)."""
    k = 0 if num_logprobs is None else int(num_logprobs)
    if k < 0:
        raise ValueError(f"logprobs must be >= 0 or None, got {num_logprobs}")
    for b in LOGPROBS_BUCKETS:
        if k <= b:
            return b
    raise ValueError(f"logprobs={k} is more than the supported maximum {MAX_LOGPROBS}")


def coarsen(modes: SamplerModes) -> SamplerModes:
    """The coarse mode covering `modes`: unless all rows are greedy, every
    truncation on (off values are no-ops, results unchanged)."""
    return SamplerModes(all_greedy=modes.all_greedy, do_penalties=modes.do_penalties,
                        do_top_k_top_p=not modes.all_greedy, do_min_p=not modes.all_greedy,
                        num_logprobs=modes.num_logprobs)


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


_DEFAULTS = dict(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, presence_penalty=0.0,
                 frequency_penalty=0.0, repetition_penalty=1.0, seed=None, step=0,
                 prompt_token_ids=(), output_token_ids=(), logprobs=None,
                 banned_token_ids=())
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
        modes = coarsen(modes)

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
