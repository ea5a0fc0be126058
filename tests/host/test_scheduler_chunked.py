"""The scheduler with chunked prefill: one token budget per step, decodes
first, then prompt chunks (the prefills under way oldest first, then new
groups), a long prompt over several steps (host core only)."""
import itertools

import pytest

from jpaged.block_manager import BlockSpaceManager
from jpaged.config import SchedulerConfig
from jpaged.sampling_params import SamplingParams
from jpaged.scheduler import Scheduler
from jpaged.sequence import Sequence, SequenceGroup, SequenceStatus as S

BS = 4


class Chunked:
    """A scheduler with chunked prefill and a step that applies what the
    engine would: a row that ends its prefill (or decodes) gets a token."""

    def __init__(self, num_gpu_blocks=64, budget=8, max_num_seqs=4, max_model_len=64,
                 long_prefill=0, between=0, **kw):
        self.bm = BlockSpaceManager(BS, num_gpu_blocks, 16, watermark=0.0, **kw)
        self.sched = Scheduler(SchedulerConfig(
            max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_model_len=max_model_len,
            preemption_mode=None, enable_chunked_prefill=True,
            long_prefill_token_threshold=long_prefill,
            decode_window_between_chunks=between), self.bm)
        self.ids = itertools.count()

    def add(self, rid, prompt_len, params=None):
        seq = Sequence(next(self.ids), None, list(range(3, 3 + prompt_len)), BS)
        g = SequenceGroup(rid, [seq], params or SamplingParams(max_tokens=50), 0.0)
        self.sched.add_seq_group(g)
        return g

    def step(self):
        out = self.sched.schedule()
        self.bm.check_invariants()
        assert out.num_batched_tokens <= self.sched.config.max_num_batched_tokens
        for sg in out.scheduled_seq_groups:
            self.sched.mark_computed(sg)
            for seq in sg.seq_group.get_seqs(S.RUNNING):
                if sg.decode or sg.num_computed_tokens.get(seq.seq_id) == seq.get_len():
                    seq.append_token_id(1, 0.0)
        return out

    @staticmethod
    def chunks(out):
        return [(sg.seq_group.request_id, "decode" if sg.decode else sg.token_chunk_size)
                for sg in out.scheduled_seq_groups]


def test_a_prompt_longer_than_the_budget_runs_in_chunks_then_decodes():
    h = Chunked(budget=8)
    g = h.add("a", 20)  # > budget, <= max_model_len: accepted
    seq = g.get_seqs()[0]
    sizes = []
    for _ in range(3):
        out = h.step()
        assert out.is_prefill
        sizes.append(h.chunks(out))
    assert sizes == [[("a", 8)], [("a", 8)], [("a", 4)]]
    assert seq.num_computed_tokens == 20 and seq.get_output_len() == 1  # sampled at the end
    out = h.step()  # nothing else waits: a plain decode step
    assert not out.is_prefill and h.chunks(out) == [("a", "decode")]


def test_decodes_first_then_chunks_oldest_first_within_the_budget():
    """A new prompt may start beside other prompt work only if it ends in
    the step (else it would miss the prefix-cache hits of their blocks)."""
    h = Chunked(budget=8)
    h.add("a", 3)
    h.step()  # a prefilled, sampled
    h.add("b", 10)
    h.add("c", 6)
    out = h.step()
    assert h.chunks(out) == [("a", "decode"), ("b", 7)]
    out = h.step()
    # b's rest; c (6 tokens) would not end in the 4 left: it waits for the next step
    assert h.chunks(out) == [("a", "decode"), ("b", 3)]
    out = h.step()
    assert h.chunks(out) == [("a", "decode"), ("b", "decode"), ("c", 6)]
    out = h.step()
    assert not out.is_prefill
    assert h.chunks(out) == [("a", "decode"), ("b", "decode"), ("c", "decode")]


def test_a_decode_step_when_every_admissible_prompt_ran_and_others_wait_for_room():
    """With every slot taken, admitting each step the one or two prompts
    the last step's finished sequences made room for would make every step
    a mixed one (one token per decoding sequence, no decode windows): after
    a step that ran all the prompt work it could while requests still wait
    for room, the decodes get a step of their own. A prompt the budget cuts
    into chunks goes on at once, and with nothing waiting a prompt that
    arrives into room is admitted at once."""
    h = Chunked(budget=8, max_num_seqs=2)
    a, b = h.add("a", 3), h.add("b", 3)
    assert h.chunks(h.step()) == [("a", 3), ("b", 3)]
    h.step()
    h.add("c", 20)
    d = h.add("d", 3)
    finish(h, a)  # room for c; d waits
    sizes = [h.chunks(h.step()) for _ in range(3)]
    assert sizes == [[("b", "decode"), ("c", 7)]] * 2 + [[("b", "decode"), ("c", 6)]]
    finish(h, b)  # room for d, but the decodes' turn comes first
    out = h.step()
    assert not out.is_prefill and h.chunks(out) == [("c", "decode")]
    assert h.chunks(h.step()) == [("c", "decode"), ("d", 3)]
    finish(h, d)
    h.add("e", 3)  # arrives into room, nothing else waits: admitted at once
    assert h.chunks(h.step()) == [("c", "decode"), ("e", 3)]


def test_long_prefill_token_threshold_caps_each_prompt_chunk():
    """vLLM's long_prefill_token_threshold: one group's chunk is at most
    that many tokens a step, and the rest of the budget still takes the
    decodes and other prompts (a new one only if it ends in the step,
    unless it is the step's first prompt work)."""
    h = Chunked(budget=8, long_prefill=3)
    a = h.add("a", 10)
    assert h.chunks(h.step()) == [("a", 3)]
    h.add("b", 2)  # ends within the cap: beside a's chunk
    assert h.chunks(h.step()) == [("a", 3), ("b", 2)]
    h.add("c", 5)  # would not end in this step: waits while a prefills
    assert h.chunks(h.step()) == [("b", "decode"), ("a", 3)]
    assert h.chunks(h.step()) == [("b", "decode"), ("a", 1)]
    assert a.get_seqs()[0].get_output_len() == 1
    sizes = [h.chunks(h.step()) for _ in range(2)]
    assert sizes == [[("a", "decode"), ("b", "decode"), ("c", 3)],
                     [("a", "decode"), ("b", "decode"), ("c", 2)]]
    with pytest.raises(ValueError, match="long_prefill_token_threshold must be an int >= 0"):
        Chunked(long_prefill=-1)


def test_decode_window_between_chunks_alternates_with_a_long_prompt():
    """decode_window_between_chunks: a step that leaves a prefill under way
    with more than the budget still to run is followed by a window of the
    decodes alone (the prefill's sequence has no active slot yet), then the
    next chunk; a prefill that ends in the next step is not held up; once
    the prompt's last chunk ran, windows are the decodes' usual ones."""
    h = Chunked(budget=8, between=4)
    b = h.add("b", 2)

    def step(max_window=8):
        out = h.sched.schedule(max_window)
        h.bm.check_invariants()
        for sg in out.scheduled_seq_groups:
            h.sched.mark_computed(sg)
            for seq in sg.seq_group.get_seqs(S.RUNNING):
                if sg.decode:
                    for _ in range(out.num_steps):
                        seq.append_token_id(1, 0.0)
                elif sg.num_computed_tokens.get(seq.seq_id) == seq.get_len():
                    seq.append_token_id(1, 0.0)
        return h.chunks(out), out.num_steps

    assert step() == ([("b", 2)], 1)
    a = h.add("a", 20)
    plan = [step() for _ in range(5)]
    assert plan == [([("b", "decode"), ("a", 7)], 1),  # 13 of a left, more than the budget
                    ([("b", "decode")], 4),
                    ([("b", "decode"), ("a", 7)], 1),  # 6 left: one more step, no window
                    ([("b", "decode"), ("a", 6)], 1),  # a's last chunk: its first token
                    ([("b", "decode"), ("a", "decode")], 8)]
    assert a.get_seqs()[0].get_output_len() == 1 + 8
    assert b.get_seqs()[0].get_output_len() == 1 + 3 + 4 + 8
    # the window between chunks is at most the step's max_window (1 while a
    # beam group takes its first token)
    h2 = Chunked(budget=8, between=4)
    h2.add("b", 2)
    h2.step()
    h2.add("a", 20)
    h2.step()
    out = h2.sched.schedule(2)
    assert h2.chunks(out) == [("b", "decode")] and out.num_steps == 2


def finish(h, group):
    for seq in group.get_seqs(S.RUNNING):
        seq.status = S.FINISHED_LENGTH_CAPPED
        h.sched.free_seq(seq)


def test_a_chunk_boundary_that_does_not_divide_the_prompt():
    h = Chunked(budget=6)
    g = h.add("a", 17)
    computed = []
    while g.get_seqs()[0].get_output_len() == 0:
        h.step()
        computed.append(g.get_seqs()[0].num_computed_tokens)
    assert computed == [6, 12, 17]


def test_preempting_a_chunked_prompt_recomputes_it_from_the_start():
    # 6 blocks of 4 tokens: a (8 tokens) and b (12) fill them; a's growth
    # preempts b, the youngest, in the middle of its chunks.
    h = Chunked(num_gpu_blocks=7, budget=4, max_num_seqs=4)
    a = h.add("a", 7)
    h.step()
    h.step()  # a: 4 + 3, sampled
    b = h.add("b", 16)
    h.step()
    bseq = b.get_seqs()[0]
    assert bseq.num_scheduled_tokens == 3 and bseq.is_prefilling()
    for _ in range(12):
        out = h.step()
        if out.recomputed:
            break
    assert out.recomputed == [b] and bseq.status == S.WAITING
    assert (bseq.num_computed_tokens, bseq.num_scheduled_tokens, bseq.prefill_end) == (0, 0, 0)
    h.sched.abort_seq_group("a")
    for _ in range(8):
        h.step()
    assert bseq.get_output_len() >= 1 and bseq.num_computed_tokens >= 16  # prefilled again
    assert a.is_finished()


def test_a_multi_sequence_group_prefills_all_but_its_last_tokens_then_decodes_together():
    h = Chunked(budget=8, max_num_seqs=4)
    seqs = [Sequence(next(h.ids), None, list(range(3, 13)), BS) for _ in range(2)]
    g = SequenceGroup("m", seqs, SamplingParams(n=2, temperature=1.0, max_tokens=20), 0.0)
    h.sched.add_seq_group(g)  # as after a recompute preemption: two 10-token sequences
    out = h.step()
    assert h.chunks(out) == [("m", 8)]  # 8 of the 2 x 9 prompt tokens
    out = h.step()
    assert h.chunks(out) == [("m", 8)]
    out = h.step()
    assert h.chunks(out) == [("m", 2)]
    assert [s.num_computed_tokens for s in seqs] == [9, 9]
    assert all(s.get_output_len() == 0 for s in seqs)  # no row sampled yet
    out = h.step()  # both rows decode their last prompt token together
    assert h.chunks(out) == [("m", "decode")] and out.scheduled_seq_groups[0].token_chunk_size == 2


def test_a_request_too_long_for_the_model_is_still_rejected():
    h = Chunked(budget=8, max_model_len=32)
    h.add("long", 33)
    h.add("ok", 5)
    out = h.step()
    assert [g.request_id for g, _ in out.ignored_seq_groups] == ["long"]
    assert h.chunks(out) == [("ok", 5)]


def test_prefix_cache_hits_count_before_the_first_chunk():
    h = Chunked(budget=8, enable_prefix_caching=True)
    a = h.add("a", 13)
    while a.get_seqs()[0].get_output_len() == 0:
        h.step()
    b = h.add("b", 13)  # the same tokens: 3 full blocks cached
    out = h.step()
    assert [c for c in h.chunks(out) if c[0] == "b"] == [("b", 1)]
    assert b.get_seqs()[0].num_computed_tokens == 13


@pytest.mark.parametrize("budget", [4, 7, 64])
def test_every_block_is_free_at_the_end(budget):
    h = Chunked(num_gpu_blocks=24, budget=max(budget, 4), max_num_seqs=4)
    groups = [h.add(str(i), n, SamplingParams(max_tokens=m))
              for i, (n, m) in enumerate([(20, 5), (3, 9), (33, 2), (9, 12), (16, 1), (40, 3)])]
    for _ in range(200):
        h.step()
        for g in groups:
            for seq in g.get_seqs(S.RUNNING):
                if seq.get_output_len() >= g.sampling_params.max_tokens:
                    seq.status = S.FINISHED_LENGTH_CAPPED
                    h.sched.free_seq(seq)
        if not h.sched.has_unfinished_seqs():
            break
    assert not h.sched.has_unfinished_seqs()
    assert all(g.get_seqs()[0].get_output_len() == g.sampling_params.max_tokens for g in groups)
    assert h.bm.get_num_free_gpu_blocks() == h.bm.get_num_total_gpu_blocks()
