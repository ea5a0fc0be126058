"""Beam search decisions as pure functions (vLLM 0.2-0.5's rules).

One step of a group with beam width W: every running beam proposes its top
2W next tokens; the 2W best proposals by cumulative logprob are kept; a
proposal whose token ends the sequence (EOS, a stop token id, max_tokens,
max_model_len) joins the finished pool, the others continue, W at most. The
search ends when no beam continues or ``is_done`` says no running beam can
beat the finished ones.

The device makes each step's choice (jpaged.device_batch.beam_select), so a
group's steps run in decode windows: the j-th running beam (by rank) takes
the j-th continuing proposal, and a rank left without one ends for good (a
group shrinks only when more than W of its 2W best proposals end, which
takes several EOS or stop ids). ``replay_step`` redoes a step on the host
from the device's proposals, with the finished pool and ``is_done`` (which
only the host applies: the device runs on to the window's end), and tracks
each beam's block table as the device changed it. jpaged.output_processor
applies the result to the group's sequences (forks, frees, new histories).
Host core: stdlib only.
"""
from __future__ import annotations

import dataclasses
import math
import struct

# A proposal's packed id on the device: parent rank << PARENT_SHIFT | token id.
PARENT_SHIFT = 27
TOKEN_MASK = (1 << PARENT_SHIFT) - 1


def unpack(packed: int) -> tuple[int, int]:
    """(parent rank, token id) of a packed proposal."""
    return packed >> PARENT_SHIFT, packed & TOKEN_MASK


_F32 = struct.Struct("f")


def _f32(x: float) -> float:
    return _F32.unpack(_F32.pack(x))[0]


def add32(a: float, b: float) -> float:
    """a + b in float32, as the device adds (one addition rounded through
    float64 is correctly rounded: 53 >= 2 * 24 + 2 bits)."""
    return _f32(_f32(a) + _f32(b))


@dataclasses.dataclass(frozen=True)
class Hyp:
    """A beam during a replay: the rank whose history (when the replay began)
    it extends, its tokens since, their logprobs, its cumulative logprob
    (float64, what the host scores) and the device's float32 one, and its
    block table as the device has it."""
    origin: int
    tokens: tuple
    logprobs: tuple
    cumulative: float
    cum32: float
    table: tuple


def replay_step(hyps: dict, proposals, width: int, lengths: tuple[int, int], sp,
                eos_token_ids, max_model_len: int, block_size: int, finished: list,
                grow: bool = False):
    """One device step of a group, redone on the host.

    Args:
      hyps: rank -> Hyp of the ranks that proposed.
      proposals: the device's 2W best (parent rank, token, logprob), best first.
      lengths: (output length, length) of the group's sequences before the step.
      finished: the pool, (score, entry) best first, at most `width`; ending
        proposals enter as (score, (Hyp, "stop" | "length")). Updated in place.
      grow: the group's first step, where the device held rank 0 alone:
        continuing proposals after the first take new ranks (forks).
    Returns (rank -> Hyp of the beams that continue, whether the search is done).
    """
    out_len, length = lengths
    col = length // block_size  # the block of the new tokens (position `length`)
    running, ended = [], False
    for parent, token, lp in proposals:
        how = ends(token, out_len, length, sp, eos_token_ids, max_model_len)
        if how is None and len(running) == width:
            continue  # (a continuing proposal past the width: dropped)
        h = hyps[parent]
        new = Hyp(h.origin, h.tokens + (token,), h.logprobs + (lp,), h.cumulative + lp,
                  add32(h.cum32, lp), h.table)
        if how is None:
            running.append(new)
        else:
            finished.append((length_normalized(new.cumulative, out_len + 1, sp.length_penalty),
                             (new, how)))
            ended = True
    if ended:
        finished.sort(key=lambda f: -f[0])
        del finished[width:]
    if not running or is_done(finished[-1][0] if finished else None, len(finished),
                              (running[0].cumulative, out_len + 1), sp, width, max_model_len):
        return {}, True
    ranks = range(len(running)) if grow else sorted(hyps)
    out = {}
    for r, h in zip(ranks, running):
        own = hyps[r].table if r in hyps else h.table  # (a fork: its parent's blocks)
        if own is not h.table:
            h = Hyp(h.origin, h.tokens, h.logprobs, h.cumulative, h.cum32,
                    h.table[:col] + own[col:])
        out[r] = h
    return out, False


def length_normalized(logprob: float, length: int, length_penalty: float) -> float:
    """logprob / length**length_penalty, without overflow for any finite
    penalty (the exponent is clamped where the power leaves float range)."""
    exponent = min(700.0, max(-700.0, length_penalty * math.log(max(1, length))))
    return logprob * math.exp(-exponent)


def ends(token: int, parent_output_len: int, parent_len: int, sp, eos_token_ids,
         max_model_len: int) -> str | None:
    """How a proposal ends its beam: "stop" (EOS or a stop id), "length"
    (max_tokens or max_model_len), or None (it continues)."""
    if (not sp.ignore_eos and token in eos_token_ids) or token in sp.stop_token_ids:
        return "stop"
    if (sp.max_tokens is not None and parent_output_len + 1 >= sp.max_tokens) or \
            parent_len + 1 >= max_model_len:
        return "length"
    return None


def is_done(worst_finished_score: float | None, num_finished: int, best_running, sp,
            width: int, max_model_len: int) -> bool:
    """Whether no running beam can beat the finished pool.

    best_running: (cumulative logprob, output length) of the best
    continuing proposal, its token included."""
    if num_finished < width:
        return False
    if sp.early_stopping is True:
        return True
    cum, out_len = best_running
    if sp.early_stopping == "never" and sp.length_penalty > 0:
        best_possible = length_normalized(cum, sp.max_tokens or max_model_len, sp.length_penalty)
    else:
        best_possible = length_normalized(cum, out_len, sp.length_penalty)
    return worst_finished_score >= best_possible
