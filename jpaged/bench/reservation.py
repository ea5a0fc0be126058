"""The contiguous-reservation baseline (the paper's Orca variants).

Orca-style systems give each request one contiguous KV region, sized when
the request is admitted and never grown:

- ``max``    (Orca-Max):    max_model_len tokens;
- ``pow2``   (Orca-Pow2):   the next power of two of the request's true
                            length (prompt + output), at most max_model_len;
- ``oracle`` (Orca-Oracle): exactly the true length.

The true length is known here because benchmark requests generate a fixed
number of tokens (``max_tokens`` with ``ignore_eos``). The baseline runs
inside the same engine, model code and kernels as jpaged: it is a
BlockSpaceManager whose device pool hands out runs of consecutive block ids
(first fit, so external fragmentation happens as it would with contiguous
memory) and that allocates nothing on append, so it never preempts.

KV waste (``kv_slot_usage``): slots of allocated blocks that hold no token's
K/V, as a share of the pool. Host core: stdlib only.
"""
from __future__ import annotations

from jpaged.block_manager import tokens_to_cover, AllocStatus, BlockSpaceManager
from jpaged.config import EngineConfig
from jpaged.sequence import Sequence, SequenceGroup, SequenceStatus

POLICIES = ("max", "pow2", "oracle")


def reserved_len(policy: str, true_len: int, max_model_len: int) -> int:
    """Tokens a request of true_len tokens (prompt + output) reserves."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if not isinstance(true_len, int) or true_len < 1:
        raise ValueError(f"true_len must be an int >= 1, got {true_len!r}")
    if policy == "max":
        return max_model_len
    if policy == "pow2":
        return min(max_model_len, 1 << (true_len - 1).bit_length())
    return min(max_model_len, true_len)


class ContiguousBlockAllocator:
    """A device pool that hands out runs of consecutive block ids (first fit).

    The BlockAllocator interface that BlockSpaceManager uses, over its own
    free map, built with BlockAllocator's arguments (the manager's
    ``gpu_allocator_cls``). Block 0 stays the null block. No prefix
    caching. ``allocate()`` is a run of one, so the manager's generic paths
    (swap-in) still work.
    """

    def __init__(self, device: str, block_size: int, num_blocks: int, reserve_null_block: bool,
                 enable_caching: bool = False):
        if device != "gpu" or not reserve_null_block:
            raise ValueError("a contiguous pool is the device pool, with block 0 the null block")
        if enable_caching:
            raise ValueError("the reservation baseline has no prefix caching")
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be an int >= 1, got {num_blocks!r}")
        self.device, self.block_size, self.num_blocks = device, block_size, num_blocks
        self.first_block_id = 1
        self.num_usable_blocks = num_blocks - 1
        self._ref_counts = [0] * num_blocks
        self._free_map = bytearray(b"\x00") + bytearray(b"\x01") * (num_blocks - 1)  # 1 = free
        self._num_free = num_blocks - 1

    def allocate_range(self, num: int) -> list[int] | None:
        """num consecutive free block ids (lowest first fit), refcount 1, or None."""
        if num < 1:
            raise ValueError(f"a run must hold at least one block, got {num}")
        start = self._free_map.find(b"\x01" * num, 1)
        if start < 0:
            return None
        self._free_map[start:start + num] = b"\x00" * num
        for b in range(start, start + num):
            self._ref_counts[b] = 1
        self._num_free -= num
        return list(range(start, start + num))

    def has_free_run(self, num: int) -> bool:
        return self._free_map.find(b"\x01" * num, 1) >= 0

    def allocate(self) -> int | None:
        run = self.allocate_range(1)
        return run[0] if run else None

    def free(self, block_id: int) -> None:
        self._check_id(block_id)
        if self._ref_counts[block_id] <= 0:
            raise ValueError(f"double free of gpu block {block_id}")
        self._ref_counts[block_id] -= 1
        if self._ref_counts[block_id] == 0:
            self._free_map[block_id] = 1
            self._num_free += 1

    def incref(self, block_id: int) -> None:
        self._check_id(block_id)
        if self._ref_counts[block_id] <= 0:
            raise ValueError(f"incref of free gpu block {block_id}")
        self._ref_counts[block_id] += 1

    def get_ref_count(self, block_id: int) -> int:
        self._check_id(block_id)
        return self._ref_counts[block_id]

    def get_num_free_blocks(self) -> int:
        return self._num_free

    def get_free_block_ids(self) -> set[int]:
        return {i for i, f in enumerate(self._free_map) if f}

    def get_num_cached_blocks(self) -> int:
        return 0  # (no prefix caching)

    def reset_cache(self) -> None:
        """Nothing is cached (the engine calls it after losing its KV pool)."""

    def check_invariants(self) -> None:
        if self._free_map[0] or self._ref_counts[0]:
            raise AssertionError("the null block 0 was handed out or freed")
        if self._num_free != sum(self._free_map):
            raise AssertionError("free count disagrees with the free map")
        for b in range(1, self.num_blocks):
            if bool(self._free_map[b]) == (self._ref_counts[b] > 0):
                raise AssertionError(f"gpu block {b}: free map {self._free_map[b]} but "
                                     f"refcount {self._ref_counts[b]}")

    def _check_id(self, block_id: int) -> None:
        if not 1 <= block_id < self.num_blocks:
            raise ValueError(f"gpu block id {block_id} outside [1, {self.num_blocks})")


class ReservationBlockManager(BlockSpaceManager):
    """BlockSpaceManager that reserves each request's whole KV region at admission.

    Args: as BlockSpaceManager, plus
      policy: "max", "pow2" or "oracle" (see ``reserved_len``).
      max_model_len: the engine's context limit (Orca-Max's reservation).
    Serves single-sequence requests only (no parallel sampling or beam
    search: the baseline has no sharing); others raise ValueError.
    """

    gpu_allocator_cls = ContiguousBlockAllocator

    def __init__(self, block_size: int, num_gpu_blocks: int, num_cpu_blocks: int,
                 watermark: float = EngineConfig.watermark,
                 enable_prefix_caching: bool = EngineConfig.enable_prefix_caching, *,
                 policy: str, max_model_len: int):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if enable_prefix_caching:
            raise ValueError("the reservation baseline has no prefix caching")
        if not isinstance(max_model_len, int) or max_model_len < 1:
            raise ValueError(f"max_model_len must be an int >= 1, got {max_model_len!r}")
        super().__init__(block_size, num_gpu_blocks, num_cpu_blocks, watermark, False)
        self.policy = policy
        self.max_model_len = max_model_len

    def num_reserved_blocks(self, seq: Sequence, seq_group: SequenceGroup) -> int:
        """Blocks seq's region takes: its policy's reservation, never less than it holds."""
        max_tokens = seq_group.sampling_params.max_tokens
        true_len = (seq.get_prompt_len() + max_tokens if max_tokens is not None
                    else self.max_model_len)
        tokens = max(reserved_len(self.policy, true_len, self.max_model_len), seq.get_len())
        return -(-tokens // self.block_size)

    def _single(self, seq_group: SequenceGroup) -> Sequence:
        if seq_group.get_max_num_running_seqs() > 1:
            raise ValueError(f"request {seq_group.request_id!r}: the reservation baseline "
                             "serves one sequence per request (n = best_of = 1, no beam search)")
        return seq_group.get_seqs(SequenceStatus.WAITING)[0]

    def can_allocate(self, seq_group: SequenceGroup) -> AllocStatus:
        seq = self._single(seq_group)
        num = self.num_reserved_blocks(seq, seq_group)
        if num > self.gpu_allocator.num_usable_blocks:
            return AllocStatus.NEVER
        return AllocStatus.OK if self.gpu_allocator.has_free_run(num) else AllocStatus.LATER

    def allocate(self, seq_group: SequenceGroup) -> None:
        seq = self._single(seq_group)
        if self.has_block_table(seq):
            raise RuntimeError(f"sequence {seq.seq_id} already has a block table")
        table = self.gpu_allocator.allocate_range(self.num_reserved_blocks(seq, seq_group))
        if table is None:
            raise RuntimeError("no contiguous run free in allocate(); call can_allocate() first")
        self.install_table(seq, table)

    def can_append_slots(self, seq_group: SequenceGroup, num_lookahead: int = 0,
                         max_len: int | None = None) -> bool:
        return all(self._covers(s, num_lookahead, max_len)
                   for s in seq_group.get_seqs(SequenceStatus.RUNNING))

    def can_append_slots_all(self, seq_groups: list[SequenceGroup], num_lookahead: int = 0,
                             max_len=None) -> bool:
        """Reservations never grow: every group's must cover its next tokens."""
        return all(self.can_append_slots(g, num_lookahead,
                                         max_len(g) if max_len is not None else None)
                   for g in seq_groups)

    def window_costs(self, seq_groups: list[SequenceGroup], windows: list[int],
                     max_len) -> list[int]:
        """0 for a window every reservation covers, else more than the pool."""
        never = self.gpu_allocator.num_usable_blocks + 1
        return [0 if self.can_append_slots_all(seq_groups, k - 1, max_len) else never
                for k in windows]

    def append_slots(self, seq: Sequence, num_lookahead: int = 0,
                     max_len: int | None = None) -> list[tuple[int, int]]:
        """Never allocates: the reservation already covers the new tokens."""
        if not self._covers(seq, num_lookahead, max_len):
            raise RuntimeError(f"sequence {seq.seq_id} outgrew its reservation; "
                               "call can_append_slots() first")
        return []

    def fork(self, parent_seq: Sequence, child_seq: Sequence) -> None:
        raise ValueError("the reservation baseline does not fork sequences (no sharing)")

    def _covers(self, seq: Sequence, num_lookahead: int = 0, max_len: int | None = None) -> bool:
        return len(self.block_table(seq)) * self.block_size >= tokens_to_cover(
            seq, num_lookahead, max_len)


def kv_slot_usage(block_manager: BlockSpaceManager, seqs: list[Sequence]) -> tuple[int, int, int]:
    """(device slots in use, slots holding a computed token's K/V, pool slots).

    Slots in use = blocks allocated (not free) x block_size; a block shared by
    several sequences counts once, filled up to the furthest of them. The
    waste is ``(in_use - filled) / pool``. `seqs`: every sequence holding
    device blocks (the RUNNING ones of the running groups).
    """
    bs = block_manager.block_size
    fill: dict[int, int] = {}
    for seq in seqs:
        table = block_manager.get_block_table(seq)
        n = min(seq.num_computed_tokens, len(table) * bs)
        for i in range(-(-n // bs)):
            b = table[i]
            fill[b] = max(fill.get(b, 0), min(bs, n - i * bs))
    total = block_manager.get_num_total_gpu_blocks()
    used = total - block_manager.get_num_free_gpu_blocks()
    return used * bs, sum(fill.values()), total * bs
