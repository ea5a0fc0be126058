"""Sequences and sequence groups: the host-side state of requests.

A request is one ``SequenceGroup``; its ``Sequence``s are the samples
(``n``/``best_of``) or the beams. A group starts with one sequence per
prompt; the engine forks it after the prompt step (parallel sampling) or on
every step (beam search). Block tables live in the BlockSpaceManager, keyed by
``seq_id``. Host core: stdlib only, never imports jax.
"""
from __future__ import annotations

import copy
import enum


# A generated token whose value is still on the device: async scheduling
# appends one per token a dispatched step may produce, and replaces them by
# the real tokens when the step's results arrive; the next step reads the
# values on the device.
PLACEHOLDER_TOKEN_ID = -1


class SequenceStatus(enum.IntEnum):
    # NOTE: an IntEnum hashes and compares in C; a plain Enum's Python-level
    # __hash__ showed up in the engine's per-step profile (status checks of
    # every sequence, several per step). The finished statuses come last:
    # Sequence.is_finished compares with the first of them.
    WAITING = enum.auto()
    RUNNING = enum.auto()
    SWAPPED = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH_CAPPED = enum.auto()
    FINISHED_ABORTED = enum.auto()
    FINISHED_IGNORED = enum.auto()

    @staticmethod
    def get_finished_reason(status: "SequenceStatus") -> str | None:
        """OpenAI-style finish reason: "stop", "length", "abort" or None (unfinished).

        An ignored request (prompt too long for the model or the pool) reports
        "length", as vLLM does.
        """
        return _FINISH_REASON.get(status)


_FIRST_FINISHED = SequenceStatus.FINISHED_STOPPED
_FINISH_REASON = {SequenceStatus.FINISHED_STOPPED: "stop",
                  SequenceStatus.FINISHED_LENGTH_CAPPED: "length",
                  SequenceStatus.FINISHED_ABORTED: "abort",
                  SequenceStatus.FINISHED_IGNORED: "length"}


class Sequence:
    """One token sequence: the prompt plus what was generated so far.

    Attributes:
      seq_id: unique over the engine's lifetime (block tables are keyed by it).
      prompt: the prompt text, or None when only token ids were given.
      prompt_token_ids, output_token_ids: token ids.
      output_logprobs: per output token, the engine's logprobs entry (e.g.
        ``{token_id: logprob}`` when ``logprobs`` was asked for) or None.
      cumulative_logprob: sum of the sampled tokens' logprobs.
      num_computed_tokens: leading tokens whose K/V are in the KV pool. The
        next step computes tokens ``[num_computed_tokens, get_len())``; reset
        to 0 by recompute preemption.
      num_scheduled_tokens: leading tokens whose K/V are computed or being
        computed by a dispatched step (the scheduler's count: it runs ahead
        of num_computed_tokens while a step is in flight).
      prefill_end: the prefill under way computes tokens up to here (the
        sequence's length when it was admitted; one less for a sequence of
        a multi-sequence group, whose last token is its group's decode
        step's). The sequence is prefilling while num_scheduled_tokens <
        prefill_end, and decodes one token a step after that.
      stop_reason: the stop string or stop token id that finished it, if any.
      output_text: detokenized output, filled by the engine (with ``tokens``,
        ``prefix_offset``, ``read_offset`` for incremental detokenization).
    """

    def __init__(self, seq_id: int, prompt: str | None, prompt_token_ids: list[int], block_size: int):
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
        if len(prompt_token_ids) == 0:
            raise ValueError(f"sequence {seq_id}: the prompt must hold at least one token")
        self.seq_id = seq_id
        self.prompt = prompt
        self.block_size = block_size
        self.prompt_token_ids: list[int] = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.output_logprobs: list = []
        self.cumulative_logprob = 0.0
        self.status = SequenceStatus.WAITING
        self.stop_reason: int | str | None = None
        self.output_text = ""
        self.tokens: list[str] | None = None
        self.prefix_offset = 0
        self.read_offset = 0
        self.num_computed_tokens = 0
        self.num_scheduled_tokens = 0
        self.prefill_end = 0

    def is_prefilling(self) -> bool:
        """Whether prompt work of the current prefill is still unscheduled."""
        return self.num_scheduled_tokens < self.prefill_end

    def reset_computed(self) -> None:
        """Nothing computed (recompute preemption, a rolled-back step)."""
        self.num_computed_tokens = self.num_scheduled_tokens = self.prefill_end = 0

    def append_token_id(self, token_id: int, logprob: float, logprobs_entry=None) -> None:
        """Appends a generated token; its K/V are computed by the next step."""
        self.output_token_ids.append(token_id)
        self.output_logprobs.append(logprobs_entry)
        self.cumulative_logprob += logprob

    def drop_placeholders(self) -> int:
        """Removes the trailing placeholders (their step's tokens arrive, or
        it was undone); returns how many there were."""
        ids = self.output_token_ids
        n = 0
        while n < len(ids) and ids[-1 - n] == PLACEHOLDER_TOKEN_ID:
            n += 1
        if n:
            del ids[-n:]
            del self.output_logprobs[-n:]
        return n

    def extend_tokens(self, token_ids: list[int], logprobs: list[float]) -> None:
        """Appends generated tokens that carry no logprobs entries (a window's)."""
        self.output_token_ids.extend(token_ids)
        self.output_logprobs.extend([None] * len(token_ids))
        self.cumulative_logprob += sum(logprobs)

    def append_placeholders(self, num: int) -> None:
        """Appends `num` tokens still on the device (a dispatched step's)."""
        self.output_token_ids.extend([PLACEHOLDER_TOKEN_ID] * num)
        self.output_logprobs.extend([None] * num)

    def get_len(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def get_prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    def get_output_len(self) -> int:
        return len(self.output_token_ids)

    def get_token_ids(self) -> list[int]:
        """Prompt + output token ids (a new list)."""
        return self.prompt_token_ids + self.output_token_ids

    def get_last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    def is_finished(self) -> bool:
        return self.status >= _FIRST_FINISHED  # (the finished statuses come last)

    def fork(self, new_seq_id: int) -> "Sequence":
        """An independent copy under a new id (the block manager's fork
        shares the blocks): its lists and logprobs entries are its own.
        Copied field by field: copy.deepcopy was a third of a beam search's
        host time."""
        child = copy.copy(self)
        child.seq_id = new_seq_id
        child.prompt_token_ids = list(self.prompt_token_ids)
        child.output_token_ids = list(self.output_token_ids)
        child.output_logprobs = [dict(e) if isinstance(e, dict) else e
                                 for e in self.output_logprobs]
        if self.tokens is not None:
            child.tokens = list(self.tokens)
        return child

    def __repr__(self) -> str:
        return (f"Sequence(seq_id={self.seq_id}, status={self.status.name}, "
                f"len={self.get_len()}, computed={self.num_computed_tokens})")


class SequenceGroup:
    """The sequences of one request, with its sampling parameters and timings.

    Attributes:
      request_id: the engine-wide id of the request.
      sampling_params: a SamplingParams (may be None in tests of the host core).
      arrival_time: when the request arrived (seconds, any monotonic clock).
      first_scheduled_time, first_token_time, last_token_time, finished_time:
        metrics, None until known; num_preemptions: times it was preempted.
      prompt_logprobs: filled by the engine when asked for.
    """

    def __init__(self, request_id: str, seqs: list[Sequence], sampling_params, arrival_time: float):
        if not seqs:
            raise ValueError(f"request {request_id!r}: a sequence group needs at least one sequence")
        self.request_id = request_id
        self.seqs_dict: dict[int, Sequence] = {}
        for seq in seqs:
            self.add(seq)
        self.sampling_params = sampling_params
        self.prompt_len = len(seqs[0].prompt_token_ids)  # the same for every sequence
        self.arrival_time = arrival_time
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.finished_time: float | None = None
        self.num_preemptions = 0
        self.prompt_logprobs = None

    @property
    def prompt(self) -> str | None:
        return next(iter(self.seqs_dict.values())).prompt

    @property
    def prompt_token_ids(self) -> list[int]:
        return next(iter(self.seqs_dict.values())).prompt_token_ids

    def has_penalties(self) -> bool:
        """Whether sampling reads the sequences' token counts (the device
        keeps them per slot: such a group is recomputed, never swapped)."""
        p = self.sampling_params
        return p is not None and (getattr(p, "presence_penalty", 0) != 0
                                  or getattr(p, "frequency_penalty", 0) != 0
                                  or getattr(p, "repetition_penalty", 1) != 1)

    def get_seqs(self, status: SequenceStatus | None = None) -> list[Sequence]:
        if status is None:
            return list(self.seqs_dict.values())
        return [s for s in self.seqs_dict.values() if s.status == status]

    def get_unfinished_seqs(self) -> list[Sequence]:
        return [s for s in self.seqs_dict.values() if not s.is_finished()]

    def num_seqs(self, status: SequenceStatus | None = None) -> int:
        return len(self.get_seqs(status))

    def add(self, seq: Sequence) -> None:
        if seq.seq_id in self.seqs_dict:
            raise ValueError(f"request {self.request_id!r} already has sequence {seq.seq_id}")
        self.seqs_dict[seq.seq_id] = seq

    def remove(self, seq_id: int) -> None:
        if seq_id not in self.seqs_dict:
            raise ValueError(f"request {self.request_id!r} has no sequence {seq_id}")
        del self.seqs_dict[seq_id]

    def is_finished(self) -> bool:
        for s in self.seqs_dict.values():  # (a plain loop: called per group several times a step)
            if s.status < _FIRST_FINISHED:
                return False
        return True

    def get_max_num_running_seqs(self) -> int:
        """Sequences this group may run at once: what admission must reserve.

        Beam search keeps best_of beams; parallel sampling has one sequence
        until its prompt step and best_of after it.
        """
        params = self.sampling_params
        if params is not None:
            if params.use_beam_search:
                return params.actual_best_of
            if params.actual_best_of > len(self.seqs_dict):
                return params.actual_best_of
        n = 0
        for s in self.seqs_dict.values():
            n += s.status < _FIRST_FINISHED
        return n

    def __repr__(self) -> str:
        return f"SequenceGroup(request_id={self.request_id!r}, seqs={list(self.seqs_dict.values())})"
