import pytest

from jpaged.sampling_params import SamplingParams
from jpaged.sequence import Sequence, SequenceGroup, SequenceStatus as S


def test_status_finished_and_reasons():
    assert [S.get_finished_reason(s) for s in (S.FINISHED_STOPPED, S.FINISHED_LENGTH_CAPPED,
                                               S.FINISHED_ABORTED, S.FINISHED_IGNORED, S.RUNNING)] \
        == ["stop", "length", "abort", "length", None]
    seq = Sequence(1, None, [1], block_size=2)
    finished = []
    for status in S:  # the finished statuses come last (is_finished compares)
        seq.status = status
        finished.append(seq.is_finished())
    assert finished == [s.name.startswith("FINISHED") for s in S]


def test_append_and_lengths():
    seq = Sequence(7, "hi", [5, 6, 7], block_size=4)
    assert (seq.get_len(), seq.get_prompt_len(), seq.get_output_len()) == (3, 3, 0)
    assert seq.get_last_token_id() == 7 and seq.status == S.WAITING and seq.num_computed_tokens == 0
    seq.append_token_id(9, -0.5, {9: -0.5, 1: -1.2})
    seq.append_token_id(3, -0.25)
    assert seq.get_token_ids() == [5, 6, 7, 9, 3] and seq.output_token_ids == [9, 3]
    assert seq.cumulative_logprob == -0.75 and seq.output_logprobs == [{9: -0.5, 1: -1.2}, None]
    assert seq.get_last_token_id() == 3 and seq.get_len() == 5


def test_empty_prompt_and_bad_block_size_are_rejected():
    with pytest.raises(ValueError, match="at least one token"):
        Sequence(0, None, [], block_size=4)
    with pytest.raises(ValueError, match="block_size"):
        Sequence(0, None, [1], block_size=0)


def test_fork_is_an_independent_deep_copy():
    seq = Sequence(1, None, [1, 2], block_size=2)
    seq.append_token_id(3, -1.0, {3: -1.0})
    seq.status = S.RUNNING
    child = seq.fork(2)
    child.append_token_id(4, -2.0)
    child.output_logprobs[0][3] = 0.0
    assert child.seq_id == 2 and child.get_token_ids() == [1, 2, 3, 4] and child.status == S.RUNNING
    assert seq.get_token_ids() == [1, 2, 3] and seq.output_logprobs == [{3: -1.0}]
    assert child.cumulative_logprob == -3.0 and seq.cumulative_logprob == -1.0


def test_group_queries_add_remove():
    a, b = Sequence(1, "p", [1, 2], 2), Sequence(2, "p", [1, 2], 2)
    g = SequenceGroup("r", [a], SamplingParams(), arrival_time=1.5)
    g.add(b)
    assert g.get_seqs() == [a, b] and g.num_seqs() == 2 and g.prompt == "p" and g.prompt_token_ids == [1, 2]
    b.status = S.RUNNING
    assert g.get_seqs(S.RUNNING) == [b] and g.num_seqs(S.WAITING) == 1
    a.status = S.FINISHED_STOPPED
    assert g.get_unfinished_seqs() == [b] and not g.is_finished()
    b.status = S.FINISHED_ABORTED
    assert g.is_finished()
    g.remove(1)
    assert g.get_seqs() == [b]
    with pytest.raises(ValueError, match="already has sequence 2"):
        g.add(Sequence(2, None, [1], 2))
    with pytest.raises(ValueError, match="has no sequence 9"):
        g.remove(9)
    with pytest.raises(ValueError, match="at least one sequence"):
        SequenceGroup("x", [], SamplingParams(), 0.0)
    assert (g.arrival_time, g.first_scheduled_time, g.first_token_time, g.last_token_time,
            g.finished_time, g.num_preemptions) == (1.5, None, None, None, None, 0)


def test_max_num_running_seqs_reserves_best_of():
    # Parallel sampling: one sequence until the prompt step, then best_of of them.
    seq = Sequence(1, None, [1, 2, 3], 2)
    g = SequenceGroup("r", [seq], SamplingParams(n=2, best_of=3), 0.0)
    assert g.get_max_num_running_seqs() == 3
    seq.status = S.RUNNING
    for i in (2, 3):
        g.add(seq.fork(i))
    assert g.get_max_num_running_seqs() == 3
    g.seqs_dict[2].status = S.FINISHED_STOPPED
    assert g.get_max_num_running_seqs() == 2
    # Beam search keeps its width even as beams finish.
    beam = SequenceGroup("b", [Sequence(9, None, [1], 2)], SamplingParams(n=2, best_of=4, use_beam_search=True,
                                                                          temperature=0.0), 0.0)
    assert beam.get_max_num_running_seqs() == 4
    # No sampling params (host-core tests): the unfinished sequences.
    assert SequenceGroup("s", [Sequence(5, None, [1], 2)], None, 0.0).get_max_num_running_seqs() == 1
