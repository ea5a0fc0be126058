"""BlockAllocator: a fixed pool of KV block ids with reference counts.

One allocator per pool: the device ("gpu") pool, whose block 0 is the null
block and is never handed out, and the host ("cpu") swap pool. A block's
reference count is the number of block tables that hold it.

With prefix caching, a block holding a computed full block can be registered
under its content hash. When such a block's count drops to 0 it is not
returned to the free list but kept in an LRU evictor: it still counts as free,
a cache hit revives it, and ``allocate`` evicts the least recently freed one
only once the plain free list is empty. Host core: stdlib only.
"""
from __future__ import annotations

import collections

DEVICES = ("gpu", "cpu")


class BlockAllocator:
    """Refcounted free list of block ids ``[0, num_blocks)``.

    Args:
      device: "gpu" (the device pool) or "cpu" (the host swap pool).
      block_size: tokens per block (kept for callers; the allocator counts blocks).
      num_blocks: blocks in the pool, the null block included.
      reserve_null_block: keep block 0 out of circulation (the device pool).
      enable_caching: keep freed registered blocks in an LRU evictor.
    """

    def __init__(self, device: str, block_size: int, num_blocks: int, reserve_null_block: bool,
                 enable_caching: bool = False):
        if device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
        low = 1 if reserve_null_block else 0
        if not isinstance(num_blocks, int) or num_blocks < low:
            raise ValueError(f"num_blocks of the {device} pool must be an int >= {low}, got {num_blocks!r}")
        self.device = device
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.reserve_null_block = reserve_null_block
        self.enable_caching = enable_caching
        self.first_block_id = 1 if reserve_null_block else 0
        self._ref_counts = [0] * num_blocks
        self._free_ids = collections.deque(range(self.first_block_id, num_blocks))
        # block id -> None, least recently freed first (cached, refcount 0)
        self._evictor: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._hash_to_block: dict[int, int] = {}
        self._block_to_hash: dict[int, int] = {}
        self.num_evictions = 0

    @property
    def num_usable_blocks(self) -> int:
        """Blocks that can ever be handed out (the null block excluded)."""
        return self.num_blocks - self.first_block_id

    def allocate(self) -> int | None:
        """A fresh block with refcount 1, or None when the pool is exhausted."""
        if self._free_ids:
            block_id = self._free_ids.popleft()
        elif self._evictor:
            block_id, _ = self._evictor.popitem(last=False)
            del self._hash_to_block[self._block_to_hash.pop(block_id)]
            self.num_evictions += 1
        else:
            return None
        self._ref_counts[block_id] = 1
        return block_id

    def free(self, block_id: int) -> None:
        """Drops one reference; at 0 the block is free again (or cached, if registered)."""
        self._check_id(block_id)
        if self._ref_counts[block_id] <= 0:
            raise ValueError(f"double free of {self.device} block {block_id}")
        self._ref_counts[block_id] -= 1
        if self._ref_counts[block_id] == 0:
            if block_id in self._block_to_hash:
                self._evictor[block_id] = None
            else:
                self._free_ids.append(block_id)

    def incref(self, block_id: int) -> None:
        """One more reference to a block in use (fork, sharing)."""
        self._check_id(block_id)
        if self._ref_counts[block_id] <= 0:
            raise ValueError(f"incref of free {self.device} block {block_id}")
        self._ref_counts[block_id] += 1

    def get_ref_count(self, block_id: int) -> int:
        self._check_id(block_id)
        return self._ref_counts[block_id]

    def get_num_free_blocks(self) -> int:
        """Blocks allocate() can still hand out (cached free blocks included)."""
        return len(self._free_ids) + len(self._evictor)

    def get_free_block_ids(self) -> set[int]:
        return set(self._free_ids) | set(self._evictor)

    # -- prefix caching -------------------------------------------------

    def lookup(self, block_hash: int) -> int | None:
        """The block registered under block_hash, or None; changes nothing."""
        return self._hash_to_block.get(block_hash)

    def get_cached_block(self, block_hash: int) -> int | None:
        """Takes one reference to the block registered under block_hash (reviving
        it from the evictor if it was free), or returns None on a miss."""
        block_id = self._hash_to_block.get(block_hash)
        if block_id is None:
            return None
        if self._ref_counts[block_id] == 0:
            del self._evictor[block_id]
        self._ref_counts[block_id] += 1
        return block_id

    def register(self, block_id: int, block_hash: int) -> bool:
        """Registers a block in use as holding the computed content block_hash.

        Returns False (and changes nothing) when caching is off, the hash is
        already registered (a duplicate computed twice) or the block already
        has a hash.
        """
        self._check_id(block_id)
        if self._ref_counts[block_id] <= 0:
            raise ValueError(f"cannot register free {self.device} block {block_id}")
        if (not self.enable_caching or block_hash in self._hash_to_block
                or block_id in self._block_to_hash):
            return False
        self._hash_to_block[block_hash] = block_id
        self._block_to_hash[block_id] = block_hash
        return True

    def get_num_cached_blocks(self) -> int:
        """Registered blocks, in use or free."""
        return len(self._hash_to_block)

    def reset_cache(self) -> None:
        """Forgets every hash; cached free blocks return to the free list."""
        self._free_ids.extend(self._evictor)
        self._evictor.clear()
        self._hash_to_block.clear()
        self._block_to_hash.clear()

    def check_invariants(self) -> None:
        """Raises AssertionError when the allocator's own bookkeeping is inconsistent."""
        free = list(self._free_ids) + list(self._evictor)
        if len(free) != len(set(free)):
            raise AssertionError(f"{self.device}: a block is twice on the free lists")
        for block_id in free:
            if not self.first_block_id <= block_id < self.num_blocks:
                raise AssertionError(f"{self.device}: free block {block_id} outside the pool")
            if self._ref_counts[block_id] != 0:
                raise AssertionError(f"{self.device}: free block {block_id} has refcount "
                                     f"{self._ref_counts[block_id]}")
        free_set = set(free)
        for block_id in range(self.first_block_id, self.num_blocks):
            if self._ref_counts[block_id] == 0 and block_id not in free_set:
                raise AssertionError(f"{self.device}: block {block_id} is neither used nor free")
        if self.reserve_null_block and (self._ref_counts[0] != 0 or 0 in free):
            raise AssertionError("the null block 0 was handed out or freed")
        for block_id in self._evictor:
            if block_id not in self._block_to_hash:
                raise AssertionError(f"{self.device}: evictor block {block_id} has no hash")
        if len(self._hash_to_block) != len(self._block_to_hash) or any(
                self._block_to_hash.get(b) != h for h, b in self._hash_to_block.items()):
            raise AssertionError(f"{self.device}: hash maps disagree")

    def _check_id(self, block_id: int) -> None:
        if not self.first_block_id <= block_id < self.num_blocks:
            raise ValueError(f"{self.device} block id {block_id} outside "
                             f"[{self.first_block_id}, {self.num_blocks})")
