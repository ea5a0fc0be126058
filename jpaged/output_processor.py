"""OutputProcessor: a step's sampled tokens become sequence updates and outputs.

For each group of a step whose results are back (the engine's commit):
append each sequence's tokens, one at a time, until a stop rule holds (the
rules the device applied too, plus stop strings, which only the host sees);
detokenize incrementally; end beams, fork and free them (jpaged.beam_search);
and build the RequestOutputs: final ones, or for streamed requests
(output_kind DELTA / CUMULATIVE) one after every step that added tokens.
"""
from __future__ import annotations

import dataclasses
import time

from jpaged import beam_search
from jpaged.outputs import CompletionOutput, RequestMetrics, RequestOutput
from jpaged.sampling_params import RequestOutputKind, SamplingType
from jpaged.sequence import SequenceGroup, SequenceStatus


@dataclasses.dataclass
class SeqState:
    """Engine-side state of one sequence: its sampling seed, its incremental
    detokenizer state (None without a tokenizer), for streamed requests how
    many of its tokens and characters went out already, and its slot in the
    persistent batch (jpaged.slots): -1 without one; the block table as the
    device has it; the slot its penalty counts start from (a fork's parent);
    and whether the device row must be sent again whole."""
    seed: int
    detok: object
    num_sent_tokens: int = 0
    num_sent_chars: int = 0
    slot: int = -1
    sent_table: list | None = None
    counts_from: int = -1
    refill: bool = False


class OutputProcessor:
    """Applies step results to groups (see the module docstring).

    Args:
      states: seq_id -> SeqState, shared with the engine (the owner of a
        sequence's engine-side state).
      free_seq(seq): frees a finished sequence's blocks and slot.
      fork_seq(group, parent, child, seed): adds a child sharing the parent's blocks.
      new_seq_id(): a fresh sequence id.
    """

    def __init__(self, tokenizer, detokenizer, eos_token_ids, max_model_len: int, states,
                 stats, free_seq, fork_seq, new_seq_id):
        self.tokenizer = tokenizer
        self.detokenizer = detokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.states = states
        self.stats = stats
        self.free_seq = free_seq
        self.fork_seq = fork_seq
        self.new_seq_id = new_seq_id
        self.finished_beams: dict[str, list] = {}  # request_id -> ended beams, best first

    # ------------------------------------------------------------ a step's tokens
    def update(self, g: SequenceGroup, entries, result, now: float) -> None:
        """Applies one group's results. entries: (seq, column, num_tokens)
        per row of the step: the sequence's tokens are
        result.token_ids[:num_tokens, column], arriving where it holds that
        many placeholders. now: time.monotonic() of the results' arrival."""
        g.last_token_time = now
        if g.first_token_time is None:
            g.first_token_time = now
        live = [e for e in entries if e[0].status == SequenceStatus.RUNNING]  # not stopped since
        sp = g.sampling_params
        if sp.sampling_type == SamplingType.BEAM:
            self._beam_step(g, [(seq, result.topk_token_ids[0, col], result.topk_logprobs[0, col])
                                for seq, col, _ in live])
            return
        topk_ids = result.topk_token_ids
        columns = result.columns()
        for seq, col, n in live:
            seq.drop_placeholders()
            tokens, lps = columns[0][col][:n], columns[1][col][:n]
            if sp.logprobs is None and self.states[seq.seq_id].detok is None:
                self._append_window(seq, sp, tokens, lps)  # no text: no per-token work
                continue
            for j in range(n):
                token = tokens[j]
                assert token >= 0, "the device ended a sequence the host did not"
                entry = None
                if sp.logprobs is not None:  # building the dict costs host time per token
                    entry = dict(zip(topk_ids[j, col, :sp.logprobs].tolist(),
                                     result.topk_logprobs[j, col, :sp.logprobs].tolist()))
                    entry[token] = lps[j]
                seq.append_token_id(token, lps[j], entry)
                self.stats.num_generated_tokens += 1
                if self._check_stop(seq, sp):
                    self.free_seq(seq)
                    break
        if g.is_finished():
            g.finished_time = time.monotonic()

    def _append_window(self, seq, sp, tokens, lps) -> None:
        """A window's tokens at once for a sequence without text or logprobs:
        the first that ends it (the rules of _stops) ends the window."""
        num_out, length = seq.get_output_len(), seq.get_len()
        cap = self.max_model_len - length  # tokens until a length cap, the first always taken
        if sp.max_tokens is not None:
            cap = min(cap, sp.max_tokens - num_out)
        cap = max(1, cap)
        stops = sp.stop_token_ids
        eos = () if sp.ignore_eos else self.eos_token_ids
        end = None
        for j in range(min(len(tokens), cap)):
            t = tokens[j]
            if num_out + j + 1 >= sp.min_tokens and (t in eos or t in stops):
                end = j
                seq.stop_reason = t if t in stops else None
                status = SequenceStatus.FINISHED_STOPPED
                break
        else:
            if cap <= len(tokens):
                end, status = cap - 1, SequenceStatus.FINISHED_LENGTH_CAPPED
        take = len(tokens) if end is None else end + 1
        assert min(tokens[:take], default=0) >= 0, "the device ended a sequence the host did not"
        seq.extend_tokens(tokens[:take], lps[:take])
        self.stats.num_generated_tokens += take
        if end is not None:
            seq.status = status
            self.free_seq(seq)

    def _check_stop(self, seq, sp) -> bool:
        """Sets a finished status on `seq` if a stop condition holds."""
        state = self.states[seq.seq_id]
        token = seq.get_last_token_id()
        num_out = seq.get_output_len()
        is_stop_token = token in sp.stop_token_ids or (
            not sp.ignore_eos and token in self.eos_token_ids)
        stop_str = None
        if state.detok is not None and not is_stop_token:
            # NOTE: EOS and stop-token ids stay out of the text, as in vLLM.
            _, stop_str = self.detokenizer.step(state.detok, token, sp.stop,
                                                sp.include_stop_str_in_output,
                                                check_stop=num_out >= sp.min_tokens)
            seq.output_text = state.detok.output_text
        if self._stops(seq, sp, token, num_out, stop_str):
            if state.detok is not None and stop_str is None:  # trailing bytes, held-back text
                self.detokenizer.flush(state.detok)
                seq.output_text = state.detok.output_text
            return True
        return False

    def _stops(self, seq, sp, token, num_out, stop_str) -> bool:
        if num_out >= sp.min_tokens:
            if stop_str is not None:
                seq.status, seq.stop_reason = SequenceStatus.FINISHED_STOPPED, stop_str
                return True
            if token in sp.stop_token_ids:
                seq.status, seq.stop_reason = SequenceStatus.FINISHED_STOPPED, token
                return True
            if not sp.ignore_eos and token in self.eos_token_ids:
                seq.status = SequenceStatus.FINISHED_STOPPED
                return True
        if (sp.max_tokens is not None and num_out >= sp.max_tokens) or \
                seq.get_len() >= self.max_model_len:
            seq.status = SequenceStatus.FINISHED_LENGTH_CAPPED
            return True
        return False

    def record_prompt_logprobs(self, g, spans, result) -> None:
        """vLLM's layout: None for the first prompt token, then for each
        later one {token_id: logprob} of that token and the top-k; a
        chunked prompt adds its chunks' entries in order (the row of the
        token before each prompt token holds that token's logprob)."""
        k = g.sampling_params.prompt_logprobs
        seq = g.get_seqs()[0]
        if k is None or seq.seq_id not in spans:
            return
        prompt = seq.prompt_token_ids
        entries = g.prompt_logprobs
        if entries is not None and len(entries) == len(prompt):
            return  # complete (a recompute does not redo it)
        t0, n, start = spans[seq.seq_id]
        if entries is None or start == 0:
            entries = [None]
        for i in range(n):
            pos = start + i + 1  # the prompt token this row predicts
            if pos >= len(prompt):
                break
            if pos != len(entries):  # a chunk seen before (not in order): skip
                continue
            row = t0 + i
            entry = {int(tid): float(lp) for tid, lp in
                     zip(result.prompt_topk_token_ids[row][:k],
                         result.prompt_topk_logprobs[row][:k])}
            entry[prompt[pos]] = float(result.prompt_logprobs[row])
            entries.append(entry)
        g.prompt_logprobs = entries

    # ------------------------------------------------------------ beam search
    def _beam_score(self, seq, sp) -> float:
        return beam_search.length_normalized(seq.cumulative_logprob, seq.get_output_len(),
                                             sp.length_penalty)

    def _beam_step(self, g, parents):
        """One beam-search step over the group's running beams (parents:
        (seq, topk_ids, topk_logprobs) each), decided by jpaged.beam_search:
        ending proposals join the finished pool as copies, parents chosen
        several times fork, parents not chosen are freed."""
        sp = g.sampling_params
        width = sp.actual_best_of
        finished = self.finished_beams.setdefault(g.request_id, [])
        proposals = beam_search.propose(
            [(seq.cumulative_logprob, ids, lps) for seq, ids, lps in parents], width)
        running = []
        for p in proposals:
            parent = parents[p.parent][0]
            how = beam_search.ends(p.token, parent.get_output_len(), parent.get_len(), sp,
                                   self.eos_token_ids, self.max_model_len)
            if how is not None:  # a copy joins the finished pool (only these need one)
                trial = parent.fork(self.new_seq_id())
                trial.append_token_id(p.token, p.logprob, {p.token: p.logprob})
                trial.status = (SequenceStatus.FINISHED_STOPPED if how == "stop"
                                else SequenceStatus.FINISHED_LENGTH_CAPPED)
                finished.append(trial)
            elif len(running) < width:
                running.append((parent, p.token, p.logprob))
        finished.sort(key=lambda s: -self._beam_score(s, sp))
        del finished[width:]
        done = not running or beam_search.is_done(
            self._beam_score(finished[-1], sp) if finished else None, len(finished),
            (running[0][0].cumulative_logprob + running[0][2], running[0][0].get_output_len() + 1),
            sp, width, self.max_model_len)
        used: set[int] = set()
        if not done:
            targets = []
            for parent, t, lp in running:  # forks first, while parents are unchanged
                target = parent
                if parent.seq_id in used:
                    target = parent.fork(self.new_seq_id())
                    self.fork_seq(g, parent, target, self.states[parent.seq_id].seed)
                used.add(parent.seq_id)
                targets.append((target, t, lp))
            for target, t, lp in targets:
                target.append_token_id(t, lp, {t: lp})
                self.states[target.seq_id].refill = True  # the device sampled another token
                self.stats.num_generated_tokens += 1
        for parent, _, _ in parents:
            if done or parent.seq_id not in used:
                parent.status = SequenceStatus.FINISHED_ABORTED
                self.free_seq(parent)
                if not done:  # a beam that lost: nothing reads it again (the group
                    g.remove(parent.seq_id)  # would grow by the width every step)
                    del self.states[parent.seq_id]
        if done:
            g.finished_time = time.monotonic()

    # ------------------------------------------------------------ outputs
    def _completion(self, index, seq, sp) -> CompletionOutput:
        """One sequence's output: all of it, or with DELTA what was not sent
        yet (text only up to what can no longer start a stop string)."""
        start, chars = 0, len(seq.output_text or "")
        text_from = 0
        if sp.output_kind != RequestOutputKind.FINAL_ONLY:
            state = self.states[seq.seq_id]
            if not seq.is_finished() and state.detok is not None:
                chars = state.detok.num_emitted
            if sp.output_kind == RequestOutputKind.DELTA:
                start, text_from = state.num_sent_tokens, state.num_sent_chars
            state.num_sent_tokens, state.num_sent_chars = seq.get_output_len(), chars
        tokens = seq.output_token_ids[start:]
        logprobs = None
        if sp.logprobs is not None:
            logprobs = [_top_entries(e, sp.logprobs, tok) for e, tok in
                        zip(seq.output_logprobs[start:], tokens)]
        reason = SequenceStatus.get_finished_reason(seq.status)
        return CompletionOutput(index=index, text=(seq.output_text or "")[text_from:chars],
                                token_ids=list(tokens),
                                cumulative_logprob=seq.cumulative_logprob,
                                logprobs=logprobs, finish_reason=reason,
                                stop_reason=seq.stop_reason)

    def stream_output(self, g) -> RequestOutput:
        """An unfinished request's output so far (DELTA / CUMULATIVE)."""
        return RequestOutput(
            request_id=g.request_id, prompt=g.prompt,
            prompt_token_ids=list(g.prompt_token_ids), prompt_logprobs=g.prompt_logprobs,
            outputs=[self._completion(i, s, g.sampling_params)
                     for i, s in enumerate(g.get_seqs())],
            finished=False, metrics=metrics(g), error=None)

    def final_output(self, g) -> RequestOutput:
        sp = g.sampling_params
        if sp.sampling_type == SamplingType.BEAM:
            seqs = self.finished_beams.pop(g.request_id, [])
            seqs = sorted(seqs, key=lambda s: -self._beam_score(s, sp))[:sp.n]
            for s in seqs:
                if self.detokenizer is not None:  # (the path streamed text takes)
                    s.output_text = self.detokenizer.decode(s.output_token_ids,
                                                            sp.skip_special_tokens)
        else:
            seqs = g.get_seqs()
            if sp.actual_best_of > sp.n:
                seqs = sorted(seqs, key=lambda s: -s.cumulative_logprob)
            seqs = seqs[:sp.n]
        return RequestOutput(
            request_id=g.request_id, prompt=g.prompt,
            prompt_token_ids=list(g.prompt_token_ids), prompt_logprobs=g.prompt_logprobs,
            outputs=[self._completion(i, s, sp) for i, s in enumerate(seqs)],
            finished=True, metrics=metrics(g), error=None)

    @staticmethod
    def error_output(g, reason) -> RequestOutput:
        """The output of a request rejected or failed with `reason`."""
        return RequestOutput.from_error(g.request_id, g.prompt, g.prompt_token_ids,
                                        reason, n=g.sampling_params.n, metrics=metrics(g))


def _top_entries(entry, k, token):
    if not isinstance(entry, dict):
        return {token: entry}
    top = dict(sorted(entry.items(), key=lambda kv: -kv[1])[:k])
    top[token] = entry[token]
    return top


def metrics(g) -> RequestMetrics:
    scheduled = g.first_scheduled_time
    return RequestMetrics(arrival_time=g.arrival_time, first_scheduled_time=scheduled,
                          first_token_time=g.first_token_time,
                          last_token_time=g.last_token_time,
                          finished_time=g.finished_time or time.monotonic(),
                          time_in_queue=None if scheduled is None else scheduled - g.arrival_time,
                          num_preemptions=g.num_preemptions)
