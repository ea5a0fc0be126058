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
    whether the device row must be sent again whole; and for beam search
    its group id, its rank, and its cumulative logprob as the device holds
    it (float32)."""
    seed: int
    detok: object
    num_sent_tokens: int = 0
    num_sent_chars: int = 0
    slot: int = -1
    sent_table: list | None = None
    counts_from: int = -1
    refill: bool = False
    beam_group: int = -1
    beam_rank: int = 0
    cum32: float = 0.0


class OutputProcessor:
    """Applies step results to groups (see the module docstring).

    Args:
      states: seq_id -> SeqState, shared with the engine (the owner of a
        sequence's engine-side state).
      free_seq(seq): frees a finished sequence's blocks and slot.
      fork_seq(group, parent, child, seed): adds a child sharing the parent's blocks.
      new_seq_id(): a fresh sequence id.
      block_table(seq), set_block_tables({seq: table}): a sequence's device
        block table, and new tables for some sequences (their blocks shared
        by reference count: jpaged.block_manager ``retable``).
    """

    def __init__(self, tokenizer, detokenizer, eos_token_ids, max_model_len: int, states,
                 stats, free_seq, fork_seq, new_seq_id, block_size: int, block_table,
                 set_block_tables):
        self.tokenizer = tokenizer
        self.detokenizer = detokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.states = states
        self.stats = stats
        self.free_seq = free_seq
        self.fork_seq = fork_seq
        self.new_seq_id = new_seq_id
        self.block_size = block_size
        self.block_table = block_table
        self.set_block_tables = set_block_tables
        # request_id -> the finished pool: (score, ended beam) best first
        self.finished_beams: dict[str, list] = {}

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
            if live:
                self._beam_window(g, live, result)
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
    def _beam_window(self, g, entries, result) -> None:
        """A window of a beam group's steps (entries: (seq, column, steps) of
        its running beams), decided on the device and replayed here with
        jpaged.beam_search.replay_step: ending proposals join the finished
        pool, the search may end; then every beam that continues takes its
        history (tokens and block table), the group's first step forks the
        new beams, and the ranks that got no proposal end."""
        sp = g.sampling_params
        width = sp.actual_best_of
        pool = self.finished_beams.setdefault(g.request_id, [])
        by_rank = {}
        for seq, col, _ in entries:
            seq.drop_placeholders()
            by_rank[self.states[seq.seq_id].beam_rank] = (seq, col)
        first, col0 = by_rank[min(by_rank)]
        out_len, length = first.get_output_len(), first.get_len()
        grow = len(by_rank) < width and out_len == 0  # the device held rank 0 alone
        hyps = {r: beam_search.Hyp(r, (), (), s.cumulative_logprob, self.states[s.seq_id].cum32,
                                   tuple(self.block_table(s)))
                for r, (s, _) in by_rank.items()}
        done = False
        for k in range(entries[0][2]):
            ids = result.topk_token_ids[k, col0, :2 * width].tolist()
            lps = result.topk_logprobs[k, col0, :2 * width].tolist()
            proposals = [(*beam_search.unpack(p), lp) for p, lp in zip(ids, lps) if p >= 0]
            hyps, done = beam_search.replay_step(
                hyps, proposals, width, (out_len + k, length + k), sp, self.eos_token_ids,
                self.max_model_len, self.block_size, pool, grow=grow and k == 0)
            for r, h in hyps.items():
                if r in by_rank:
                    assert result.token_ids[k, by_rank[r][1]] == h.tokens[-1], \
                        "the host's beam replay differs from the device's choice"
            if done:
                break
        for i, (score, entry) in enumerate(pool):  # ended this window: a sequence each
            if isinstance(entry, tuple):
                h, how = entry
                trial = self._extended(by_rank[h.origin][0].fork(self.new_seq_id()), h,
                                       count=False)
                trial.status = (SequenceStatus.FINISHED_STOPPED if how == "stop"
                                else SequenceStatus.FINISHED_LENGTH_CAPPED)
                pool[i] = (score, trial)
        forks = {}
        for r, h in hyps.items():  # new ranks fork their origin before it changes
            if r not in by_rank:
                origin = by_rank[h.origin][0]
                child = origin.fork(self.new_seq_id())
                self.fork_seq(g, origin, child, self.states[origin.seq_id].seed)
                state = self.states[child.seq_id]
                state.beam_group, state.beam_rank = self.states[origin.seq_id].beam_group, r
                forks[r] = child
        snapshot = {r: (list(s.output_token_ids), list(s.output_logprobs), s.cumulative_logprob)
                    for r, (s, _) in by_rank.items()}
        tables = {}
        for r, h in hyps.items():
            seq = forks.get(r) or by_rank[r][0]
            if r in by_rank and h.origin != r:  # another beam's history
                seq.output_token_ids, seq.output_logprobs, seq.cumulative_logprob = (
                    list(snapshot[h.origin][0]), list(snapshot[h.origin][1]),
                    snapshot[h.origin][2])
            self._extended(seq, h)
            self.states[seq.seq_id].cum32 = h.cum32
            if r in by_rank and list(h.table) != self.block_table(seq):
                tables[seq] = list(h.table)
        self.set_block_tables(tables)
        for r, (seq, _) in by_rank.items():
            if done or r not in hyps:  # the search ended, or the rank got no proposal
                seq.status = SequenceStatus.FINISHED_ABORTED
                self.free_seq(seq)
                if not done:  # nothing reads it again (the group would grow)
                    g.remove(seq.seq_id)
                    del self.states[seq.seq_id]
        if done:
            g.finished_time = time.monotonic()

    def _extended(self, seq, h, count: bool = True):
        """seq with the replayed beam h's new tokens appended (counted as
        generated unless it is a finished pool's copy)."""
        for t, lp in zip(h.tokens, h.logprobs):
            seq.append_token_id(t, lp, {t: lp})
        if count:
            self.stats.num_generated_tokens += len(h.tokens)
        return seq

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
            seqs = [s for _, s in self.finished_beams.pop(g.request_id, [])[:sp.n]]
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
