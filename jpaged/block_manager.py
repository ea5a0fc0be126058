"""BlockSpaceManager: the block tables of every sequence, on device or host.

A sequence's block table maps its logical block i (tokens ``[i*block_size,
(i+1)*block_size)``) to a physical block id. Tables only grow while a
sequence runs; sharing is by reference count:

- the sequences of a group that wait for the same prefill share the blocks
  they have in common (a fresh group: all of them);
- ``fork`` gives a child every block of its parent (refcounts up);
- a sequence that writes into a shared last block first gets a private copy
  (copy-on-write): ``append_slots`` returns the (src, dst) pair to copy;
- a beam that continues another beam's history takes that beam's blocks
  (``retable``: the device has switched its table already);
- with prefix caching, a full block whose K/V have been computed is
  registered under ``hash((previous block's hash, tuple(its token ids)))``
  and reused by later sequences with the same prefix; freed, it stays cached
  (counted as free) until evicted least-recently-used.

Every method that allocates has a ``can_*`` twin; call it first (the
allocators report an empty pool with None, and the manager turns a call made
without checking into a RuntimeError). Host core: stdlib only.
"""
from __future__ import annotations

import collections
import enum

from jpaged.block_allocator import BlockAllocator
from jpaged.config import EngineConfig
from jpaged.sequence import Sequence, SequenceGroup, SequenceStatus


class AllocStatus(enum.Enum):
    """Whether a group's blocks can be allocated: now, later, or never.

    Truthy only for OK, so ``if manager.can_allocate(group):`` reads right.
    """
    OK = enum.auto()
    LATER = enum.auto()
    NEVER = enum.auto()

    def __bool__(self) -> bool:
        return self is AllocStatus.OK


def _num_blocks(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def tokens_to_cover(seq: Sequence, num_lookahead: int, max_len: int | None) -> int:
    """Tokens a sequence's table must cover: all it holds, and up to
    num_lookahead more that a decode window may write (never past max_len)."""
    n = seq.get_len()
    if not num_lookahead:
        return n
    ahead = n + num_lookahead
    return max(n, ahead if max_len is None else min(ahead, max_len))


class BlockSpaceManager:
    """Block tables of all sequences, over a device pool and a host swap pool.

    Args:
      block_size: tokens per block.
      num_gpu_blocks: blocks in the device pool, null block 0 included.
      num_cpu_blocks: blocks in the host swap pool (0: no swapping).
      watermark: fraction of device blocks admission keeps free, in [0, 1),
        so running sequences can grow without immediate preemption.
      enable_prefix_caching: reuse computed full blocks across requests.
    (The defaults are EngineConfig's.)
    """

    # The device pool's allocator, built as BlockAllocator is: (device,
    # block_size, num_blocks, reserve_null_block, enable_caching). A subclass
    # with its own allocation policy names its own (the reservation
    # baseline's contiguous runs, jpaged.bench.reservation).
    gpu_allocator_cls = BlockAllocator

    def __init__(self, block_size: int, num_gpu_blocks: int, num_cpu_blocks: int,
                 watermark: float = EngineConfig.watermark,
                 enable_prefix_caching: bool = EngineConfig.enable_prefix_caching):
        if not isinstance(watermark, (int, float)) or not 0 <= watermark < 1:
            raise ValueError(f"watermark must be in [0, 1), got {watermark!r}")
        if not isinstance(num_gpu_blocks, int) or num_gpu_blocks < 2:
            raise ValueError(f"num_gpu_blocks must be an int >= 2 (block 0 is the null block), "
                             f"got {num_gpu_blocks!r}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.gpu_allocator = self._new_gpu_allocator(num_gpu_blocks)
        self.cpu_allocator = BlockAllocator("cpu", block_size, num_cpu_blocks, reserve_null_block=False)
        self.watermark_blocks = int(watermark * num_gpu_blocks)
        self._gpu_tables: dict[int, list[int]] = {}
        self._cpu_tables: dict[int, list[int]] = {}
        self._block_hashes: dict[int, list[int]] = {}   # seq_id -> hashes of its full blocks
        self._num_marked: dict[int, int] = {}           # seq_id -> leading blocks offered to the cache
        self._num_cached_tokens: dict[int, int] = {}    # seq_id -> prompt tokens hit at allocate

    def _new_gpu_allocator(self, num_blocks: int) -> BlockAllocator:
        return self.gpu_allocator_cls("gpu", self.block_size, num_blocks, reserve_null_block=True,
                                      enable_caching=self.enable_prefix_caching)

    # -- allocation for a prefill -----------------------------------------

    def can_allocate(self, seq_group: SequenceGroup) -> AllocStatus:
        """Can the group's WAITING sequences get their blocks? NEVER when they
        need more blocks than the pool holds."""
        num_unique, num_taken = self._walk(seq_group, commit=False)
        if num_unique > self.gpu_allocator.num_usable_blocks:
            return AllocStatus.NEVER
        return self._fits(num_taken)

    def allocate(self, seq_group: SequenceGroup) -> None:
        """Gives every WAITING sequence of the group a table covering all its
        tokens. Sequences share the blocks they have in common; with prefix
        caching, leading computed blocks are taken from the cache (see
        ``get_num_cached_tokens``)."""
        for seq in seq_group.get_seqs(SequenceStatus.WAITING):
            if seq.seq_id in self._gpu_tables or seq.seq_id in self._cpu_tables:
                raise RuntimeError(f"sequence {seq.seq_id} already has a block table")
        self._walk(seq_group, commit=True)

    def get_num_cached_tokens(self, seq: Sequence) -> int:
        """Leading tokens of seq whose K/V came from the prefix cache at allocate."""
        return self._num_cached_tokens.get(seq.seq_id, 0)

    def _walk(self, seq_group: SequenceGroup, commit: bool) -> tuple[int, int]:
        """Plans (commit=False) or makes the tables of the group's WAITING seqs.

        Returns (distinct blocks the tables hold, blocks taken from the free
        pool); a cache hit on a block in use takes none, on a cached free block one.
        """
        bs = self.block_size
        gpu = self.gpu_allocator
        params = seq_group.sampling_params
        # Prompt logprobs need every prompt token computed, and penalties every
        # token in the prefill's input (it fills the device's counts): no cache hits then.
        use_cache = (self.enable_prefix_caching and getattr(params, "prompt_logprobs", None) is None
                     and not seq_group.has_penalties())
        local: dict = {}          # content key -> block (shared inside the group)
        cached_keys: set = set()  # keys whose block came from the cache
        num_unique = num_taken = 0
        for seq in seq_group.get_seqs(SequenceStatus.WAITING):
            token_ids = seq.get_token_ids()
            hashes = self._seq_hashes(seq)
            # NOTE: the block of the last token is never a hit: its logits are needed.
            max_hits = (len(token_ids) - 1) // bs if use_cache else 0
            table, num_hit_blocks, in_prefix = [], 0, True
            for i in range(_num_blocks(len(token_ids), bs)):
                if i < len(hashes):
                    key = hashes[i]
                else:  # the partial last block: shared only by identical sequences
                    key = ("partial", hash((hashes[-1] if hashes else None, tuple(token_ids[i * bs:]))))
                if key in local:
                    block = local[key]
                    if commit:
                        gpu.incref(block)
                else:
                    num_unique += 1
                    block = None
                    if in_prefix and i < max_hits:
                        if commit:
                            block = gpu.get_cached_block(key)
                        else:
                            block = gpu.lookup(key)
                            if block is not None and gpu.get_ref_count(block) == 0:
                                num_taken += 1
                        if block is not None:
                            cached_keys.add(key)
                    if block is None:
                        num_taken += 1
                        if commit:
                            block = gpu.allocate()
                            if block is None:
                                raise RuntimeError("device block pool exhausted in allocate(); "
                                                   "call can_allocate() first")
                        else:
                            block = ("new", num_unique)
                    local[key] = block
                in_prefix = in_prefix and i < max_hits and key in cached_keys
                num_hit_blocks += in_prefix
                table.append(block)
            if commit:
                self.install_table(seq, table, num_hit_blocks)
        return num_unique, num_taken

    def install_table(self, seq: Sequence, table: list[int], num_cached_blocks: int = 0) -> None:
        """Makes `table` (device block ids, each already allocated for seq)
        seq's block table; its first num_cached_blocks blocks hold cached
        K/V. The one way a table comes to be (allocate, or a subclass's own
        allocation policy: the reservation baseline's contiguous runs)."""
        self._gpu_tables[seq.seq_id] = table
        self._num_cached_tokens[seq.seq_id] = num_cached_blocks * self.block_size
        self._num_marked[seq.seq_id] = num_cached_blocks

    def _seq_hashes(self, seq: Sequence) -> list[int]:
        """Chained hashes of seq's full blocks (extended as the sequence grows)."""
        bs = self.block_size
        hashes = self._block_hashes.setdefault(seq.seq_id, [])
        num_full = seq.get_len() // bs
        if len(hashes) < num_full:
            token_ids = seq.get_token_ids()
            prev = hashes[-1] if hashes else None
            for i in range(len(hashes), num_full):
                prev = hash((prev, tuple(token_ids[i * bs:(i + 1) * bs])))
                hashes.append(prev)
        return hashes

    def _fits(self, num_taken: int) -> AllocStatus:
        free = self.gpu_allocator.get_num_free_blocks()
        if free - num_taken >= self.watermark_blocks:
            return AllocStatus.OK
        # An idle pool admits anything that fits, or a big request would wait forever.
        if num_taken <= free == self.gpu_allocator.num_usable_blocks:
            return AllocStatus.OK
        return AllocStatus.LATER

    # -- decode: one more slot per sequence -------------------------------

    def can_append_slots(self, seq_group: SequenceGroup, num_lookahead: int = 0,
                         max_len: int | None = None) -> bool:
        """Can every RUNNING sequence of the group get slots for its last
        token and `num_lookahead` more (never past `max_len` tokens)?"""
        seqs = seq_group.get_seqs(SequenceStatus.RUNNING)
        need = self._append_cost(seqs, self._gpu_tables, self.gpu_allocator,
                                 num_lookahead, max_len)
        return need <= self.gpu_allocator.get_num_free_blocks()

    def can_append_slots_all(self, seq_groups: list[SequenceGroup], num_lookahead: int = 0,
                             max_len=None) -> bool:
        """can_append_slots for all the groups at once (their costs add up);
        max_len: a callable group -> its max_len, or None."""
        free = self.gpu_allocator.get_num_free_blocks()
        # A sequence's next slot takes at most one block (a new one, or a
        # copy of a shared last block), num_lookahead more slots at most
        # ceil(num_lookahead / block_size) more: this bound settles most
        # steps cheaply.
        per_seq = 1 + _num_blocks(num_lookahead, self.block_size)
        if sum(g.num_seqs(SequenceStatus.RUNNING) for g in seq_groups) * per_seq <= free:
            return True
        need = 0
        for g in seq_groups:
            need += self._append_cost(g.get_seqs(SequenceStatus.RUNNING), self._gpu_tables,
                                      self.gpu_allocator, num_lookahead,
                                      max_len(g) if max_len is not None else None)
            if need > free:
                return False
        return True

    def window_costs(self, seq_groups: list[SequenceGroup], windows: list[int],
                     max_len) -> list[int]:
        """Device blocks append_slots takes for every RUNNING sequence of the
        groups, for each decode window size K in `windows` (num_lookahead K -
        1), exact, in one pass; max_len: a callable group -> its max_len."""
        bs, tables, gpu = self.block_size, self._gpu_tables, self.gpu_allocator
        needs = [0] * len(windows)
        writers: collections.Counter = collections.Counter()
        running = SequenceStatus.RUNNING
        for g in seq_groups:
            limit = max_len(g)
            for seq in g.seqs_dict.values():
                if seq.status != running:
                    continue
                table = tables[seq.seq_id]
                n, have = seq.get_len(), len(table)
                last = (n - 1) // bs
                if last < have and gpu.get_ref_count(table[last]) > 1:
                    writers[table[last]] += 1
                for i, k in enumerate(windows):
                    blocks = -(-max(n, min(n + k - 1, limit)) // bs)
                    if blocks > have:
                        needs[i] += blocks - have
        # k writers of a block held r times copy min(k, r - 1) times: the last one writes in place.
        copies = sum(min(k, gpu.get_ref_count(b) - 1) for b, k in writers.items())
        return [n + copies for n in needs]

    def append_slots(self, seq: Sequence, num_lookahead: int = 0,
                     max_len: int | None = None) -> list[tuple[int, int]]:
        """Makes seq's table cover all its tokens and `num_lookahead` more
        (at most `max_len` tokens in all), and its last token's block private.

        Returns the copy-on-write copies to run before the step, as
        (src_block, dst_block) device block ids (at most one).
        """
        gpu = self.gpu_allocator
        table = self._gpu_tables[seq.seq_id]
        while len(table) < _num_blocks(tokens_to_cover(seq, num_lookahead, max_len), self.block_size):
            table.append(self._allocate_gpu("append_slots", "can_append_slots"))
        last = (seq.get_len() - 1) // self.block_size
        src = table[last]
        if gpu.get_ref_count(src) == 1:
            return []
        dst = self._allocate_gpu("append_slots", "can_append_slots")
        gpu.free(src)
        table[last] = dst
        return [(src, dst)]

    def _append_cost(self, seqs: list[Sequence], tables: dict[int, list[int]],
                     allocator: BlockAllocator, num_lookahead: int = 0,
                     max_len: int | None = None) -> int:
        """Device blocks that append_slots on each of seqs takes (exact)."""
        need = 0
        writers: collections.Counter = collections.Counter()
        for seq in seqs:
            table = tables[seq.seq_id]
            last = (seq.get_len() - 1) // self.block_size
            num_needed = _num_blocks(tokens_to_cover(seq, num_lookahead, max_len), self.block_size)
            if len(table) < num_needed:
                need += num_needed - len(table)
            if last < len(table):
                writers[table[last]] += 1
        # k writers of a block held r times copy min(k, r - 1) times: the last one writes in place.
        for block, k in writers.items():
            need += min(k, allocator.get_ref_count(block) - 1)
        return need

    def _allocate_gpu(self, where: str, check: str) -> int:
        block = self.gpu_allocator.allocate()
        if block is None:
            raise RuntimeError(f"device block pool exhausted in {where}(); call {check}() first")
        return block

    # -- fork and free -------------------------------------------------------

    def fork(self, parent_seq: Sequence, child_seq: Sequence) -> None:
        """The child shares every block of the parent (refcounts up)."""
        if child_seq.seq_id in self._gpu_tables:
            raise RuntimeError(f"sequence {child_seq.seq_id} already has a block table")
        table = list(self._gpu_tables[parent_seq.seq_id])
        for block in table:
            self.gpu_allocator.incref(block)
        self._gpu_tables[child_seq.seq_id] = table
        pid, cid = parent_seq.seq_id, child_seq.seq_id
        self._block_hashes[cid] = list(self._block_hashes.get(pid, []))
        self._num_marked[cid] = self._num_marked.get(pid, 0)
        self._num_cached_tokens[cid] = self._num_cached_tokens.get(pid, 0)

    def retable(self, tables: dict[int, list[int]]) -> None:
        """New device tables for some sequences (seq_id -> table), made of
        blocks in use: a beam that continues another beam's history (the
        device changed its table already). Refcounts follow; blocks no
        table holds any more are freed. Their hashes are recomputed from
        the new tokens; their computed full blocks are offered again."""
        gpu = self.gpu_allocator
        for table in tables.values():
            for block in table:
                gpu.incref(block)
        for seq_id, table in tables.items():
            old = self._gpu_tables[seq_id]
            self._gpu_tables[seq_id] = list(table)
            for block in reversed(old):
                gpu.free(block)
            self._block_hashes.pop(seq_id, None)
            self._num_marked[seq_id] = 0

    def free(self, seq: Sequence) -> None:
        """Drops seq's references to its blocks (device or host); no-op without a table."""
        table = self._gpu_tables.pop(seq.seq_id, None)
        if table is not None:
            # Tail first: freed cached blocks enter the LRU so that a prefix's
            # later blocks are evicted before its earlier ones.
            for block in reversed(table):
                self.gpu_allocator.free(block)
        table = self._cpu_tables.pop(seq.seq_id, None)
        if table is not None:
            for block in reversed(table):
                self.cpu_allocator.free(block)
        self._block_hashes.pop(seq.seq_id, None)
        self._num_marked.pop(seq.seq_id, None)
        self._num_cached_tokens.pop(seq.seq_id, None)

    # -- swapping ------------------------------------------------------------

    def can_swap_out(self, seq_group: SequenceGroup) -> bool:
        """Does the host pool have room for the group's RUNNING sequences' blocks?"""
        blocks = {b for s in seq_group.get_seqs(SequenceStatus.RUNNING) for b in self._gpu_tables[s.seq_id]}
        return len(blocks) <= self.cpu_allocator.get_num_free_blocks()

    def swap_out(self, seq_group: SequenceGroup) -> list[tuple[int, int]]:
        """Moves the RUNNING sequences' blocks to the host pool, all or nothing.

        A block shared inside the group moves once and stays shared. Returns
        the (gpu_block, cpu_block) copies to run before the step.
        """
        if not self.can_swap_out(seq_group):
            raise RuntimeError("host block pool too small in swap_out(); call can_swap_out() first")
        mapping: dict[int, int] = {}
        for seq in seq_group.get_seqs(SequenceStatus.RUNNING):
            table = self._gpu_tables.pop(seq.seq_id)
            self._cpu_tables[seq.seq_id] = self._move(table, mapping, self.cpu_allocator)
            for block in reversed(table):
                self.gpu_allocator.free(block)
            self._num_marked[seq.seq_id] = 0
        return list(mapping.items())

    def can_swap_in(self, seq_group: SequenceGroup) -> AllocStatus:
        """Can the SWAPPED sequences come back (and each append one slot)?

        Truthy only for OK; NEVER when they need more blocks than the pool holds.
        """
        seqs = seq_group.get_seqs(SequenceStatus.SWAPPED)
        blocks = {b for s in seqs for b in self._cpu_tables[s.seq_id]}
        need = len(blocks) + self._append_cost(seqs, self._cpu_tables, self.cpu_allocator)
        if need > self.gpu_allocator.num_usable_blocks:
            return AllocStatus.NEVER
        return self._fits(need)

    def swap_in(self, seq_group: SequenceGroup) -> list[tuple[int, int]]:
        """Moves the SWAPPED sequences' blocks back to the device pool.

        Returns the (cpu_block, gpu_block) copies to run before the step.
        """
        seqs = seq_group.get_seqs(SequenceStatus.SWAPPED)
        blocks = {b for s in seqs for b in self._cpu_tables[s.seq_id]}
        if len(blocks) > self.gpu_allocator.get_num_free_blocks():
            raise RuntimeError("device block pool exhausted in swap_in(); call can_swap_in() first")
        mapping: dict[int, int] = {}
        for seq in seqs:
            table = self._cpu_tables.pop(seq.seq_id)
            self._gpu_tables[seq.seq_id] = self._move(table, mapping, self.gpu_allocator)
            for block in reversed(table):
                self.cpu_allocator.free(block)
            self._num_marked[seq.seq_id] = 0
        return list(mapping.items())

    @staticmethod
    def _move(table: list[int], mapping: dict[int, int], dst: BlockAllocator) -> list[int]:
        new_table = []
        for block in table:
            if block in mapping:
                dst.incref(mapping[block])
            else:
                mapping[block] = dst.allocate()
                assert mapping[block] is not None, "checked by the caller"
            new_table.append(mapping[block])
        return new_table

    # -- prefix caching ------------------------------------------------------

    def mark_blocks_as_computed(self, seq_group: SequenceGroup) -> None:
        """Registers the full blocks of the group's sequences whose K/V are
        computed (the first ``num_computed_tokens`` tokens) in the prefix cache.

        Only registered blocks give cache hits, so requests admitted in the
        same step never read each other's uncomputed blocks. Idempotent.
        """
        if not self.enable_prefix_caching:
            return
        for seq in seq_group.get_seqs():
            table = self._gpu_tables.get(seq.seq_id)
            if table is None:
                continue
            num_full = min(seq.num_computed_tokens, seq.get_len()) // self.block_size
            start = self._num_marked.get(seq.seq_id, 0)
            if start >= num_full:
                continue
            hashes = self._seq_hashes(seq)
            for i in range(start, num_full):
                self.gpu_allocator.register(table[i], hashes[i])
            self._num_marked[seq.seq_id] = num_full

    def reset_prefix_cache(self) -> bool:
        """Forgets every cached block (cached free blocks become plain free ones)."""
        self.gpu_allocator.reset_cache()
        for seq_id in self._num_marked:
            self._num_marked[seq_id] = 0
        return True

    # -- queries -------------------------------------------------------------

    def get_block_table(self, seq: Sequence) -> list[int]:
        """Device block ids of seq, logical order (a copy)."""
        return list(self._gpu_tables[seq.seq_id])

    def block_table(self, seq: Sequence) -> list[int]:
        """seq's device block table itself, not a copy: read it, never change it."""
        return self._gpu_tables[seq.seq_id]

    def get_cpu_block_table(self, seq: Sequence) -> list[int]:
        """Host block ids of a swapped-out seq, logical order (a copy)."""
        return list(self._cpu_tables[seq.seq_id])

    def has_block_table(self, seq: Sequence) -> bool:
        return seq.seq_id in self._gpu_tables or seq.seq_id in self._cpu_tables

    def has_gpu_block_table(self, seq: Sequence) -> bool:
        return seq.seq_id in self._gpu_tables

    def reset(self) -> None:
        """Forgets every table and cached block: both pools start empty (the
        engine's last resort after a failure inside the scheduler, once every
        sequence has been freed or rolled back)."""
        self.gpu_allocator = self._new_gpu_allocator(self.gpu_allocator.num_blocks)
        self.cpu_allocator = BlockAllocator("cpu", self.block_size, self.cpu_allocator.num_blocks,
                                            reserve_null_block=False)
        for d in (self._gpu_tables, self._cpu_tables, self._block_hashes, self._num_marked,
                  self._num_cached_tokens):
            d.clear()

    def get_num_free_gpu_blocks(self) -> int:
        return self.gpu_allocator.get_num_free_blocks()

    def get_num_free_cpu_blocks(self) -> int:
        return self.cpu_allocator.get_num_free_blocks()

    def get_num_total_gpu_blocks(self) -> int:
        """Device blocks that can hold tokens (the null block excluded)."""
        return self.gpu_allocator.num_usable_blocks

    def get_block_usage(self) -> tuple[int, int]:
        """(block-table entries over all device tables, distinct device blocks
        they hold): the difference is what sharing saves."""
        entries = sum(len(t) for t in self._gpu_tables.values())
        return entries, len({b for t in self._gpu_tables.values() for b in t})

    def check_invariants(self) -> None:
        """Raises AssertionError unless: every block's refcount equals the
        number of tables holding it (cached free blocks: 0), no block is both
        free and used, ids lie in their pool, block 0 is in no table."""
        if self._gpu_tables.keys() & self._cpu_tables.keys():
            raise AssertionError("a sequence has both a device and a host table")
        for allocator, tables in ((self.gpu_allocator, self._gpu_tables),
                                  (self.cpu_allocator, self._cpu_tables)):
            allocator.check_invariants()
            counts = collections.Counter(b for t in tables.values() for b in t)
            for block in counts:
                if not allocator.first_block_id <= block < allocator.num_blocks:
                    raise AssertionError(f"{allocator.device} block {block} in a table is outside "
                                         f"[{allocator.first_block_id}, {allocator.num_blocks})")
            free = allocator.get_free_block_ids()
            if free & counts.keys():
                raise AssertionError(f"{allocator.device} blocks both free and in a table: "
                                     f"{sorted(free & counts.keys())}")
            for block in range(allocator.first_block_id, allocator.num_blocks):
                if allocator.get_ref_count(block) != counts.get(block, 0):
                    raise AssertionError(f"{allocator.device} block {block}: refcount "
                                         f"{allocator.get_ref_count(block)} but held by "
                                         f"{counts.get(block, 0)} tables")
