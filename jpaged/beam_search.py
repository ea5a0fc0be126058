"""Beam search decisions as pure functions (vLLM 0.2-0.5's rules).

One step of a group with beam width W: every running beam proposes its top
2W next tokens; the 2W best proposals by cumulative logprob are kept; a
proposal whose token ends the sequence (EOS, a stop token id, max_tokens,
max_model_len) joins the finished pool, the others continue, W at most. The
search ends when no beam continues or ``is_done`` says no running beam can
beat the finished ones. jpaged.output_processor applies these decisions to
the group's sequences (forks, frees). Host core: stdlib only.
"""
from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class Proposal:
    """A beam's next token: from running beam `parent` (an index)."""
    parent: int
    token: int
    logprob: float
    cumulative: float


def length_normalized(logprob: float, length: int, length_penalty: float) -> float:
    """logprob / length**length_penalty, without overflow for any finite
    penalty (the exponent is clamped where the power leaves float range)."""
    exponent = min(700.0, max(-700.0, length_penalty * math.log(max(1, length))))
    return logprob * math.exp(-exponent)


def propose(parents, width: int) -> list[Proposal]:
    """The 2W best next tokens over all running beams.

    parents: per running beam (cumulative logprob, top token ids, their
    logprobs), the top lists at least 2W long."""
    out = []
    for i, (cum, ids, lps) in enumerate(parents):
        for t, lp in zip(ids[:2 * width], lps[:2 * width]):
            out.append(Proposal(i, int(t), float(lp), cum + float(lp)))
    out.sort(key=lambda p: -p.cumulative)
    return out[:2 * width]


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
