import pytest

from jpaged.block_allocator import BlockAllocator


def test_gpu_pool_never_hands_out_the_null_block():
    a = BlockAllocator("gpu", 16, 4, reserve_null_block=True)
    assert a.num_blocks == 4 and a.num_usable_blocks == 3 and a.get_num_free_blocks() == 3
    got = [a.allocate() for _ in range(3)]
    assert sorted(got) == [1, 2, 3]
    assert a.allocate() is None  # reported, not raised
    assert a.get_num_free_blocks() == 0
    a.check_invariants()


def test_cpu_pool_uses_every_block_and_may_be_empty():
    a = BlockAllocator("cpu", 16, 2, reserve_null_block=False)
    assert sorted([a.allocate(), a.allocate()]) == [0, 1] and a.allocate() is None
    empty = BlockAllocator("cpu", 16, 0, reserve_null_block=False)
    assert empty.get_num_free_blocks() == 0 and empty.allocate() is None


def test_refcounts_free_and_errors():
    a = BlockAllocator("gpu", 4, 3, reserve_null_block=True)
    b = a.allocate()
    a.incref(b)
    assert a.get_ref_count(b) == 2
    a.free(b)
    assert a.get_ref_count(b) == 1 and a.get_num_free_blocks() == 1
    a.free(b)
    assert a.get_ref_count(b) == 0 and a.get_num_free_blocks() == 2
    with pytest.raises(ValueError, match="double free of gpu block"):
        a.free(b)
    with pytest.raises(ValueError, match="incref of free gpu block"):
        a.incref(b)
    with pytest.raises(ValueError, match="outside"):
        a.free(0)
    with pytest.raises(ValueError, match="outside"):
        a.get_ref_count(3)
    a.check_invariants()


@pytest.mark.parametrize("args, match", [
    (("tpu", 16, 4, True), "device"),
    (("gpu", 0, 4, True), "block_size"),
    (("gpu", 16, 0, True), "num_blocks of the gpu pool must be an int >= 1"),
    (("cpu", 16, -1, False), "num_blocks of the cpu pool must be an int >= 0"),
])
def test_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        BlockAllocator(*args)


def test_cached_blocks_count_as_free_and_revive():
    a = BlockAllocator("gpu", 4, 4, reserve_null_block=True, enable_caching=True)
    b = a.allocate()
    assert a.register(b, 111) and not a.register(b, 222) and a.lookup(111) == b
    a.free(b)
    assert a.get_num_free_blocks() == 3 and a.get_num_cached_blocks() == 1
    assert a.get_cached_block(111) == b and a.get_ref_count(b) == 1
    assert a.get_cached_block(111) == b and a.get_ref_count(b) == 2  # a hit on a block in use
    assert a.get_cached_block(999) is None
    a.check_invariants()


def test_allocate_prefers_plain_free_blocks_then_evicts_lru():
    a = BlockAllocator("gpu", 4, 4, reserve_null_block=True, enable_caching=True)
    blocks = [a.allocate() for _ in range(3)]
    for h, b in enumerate(blocks):
        a.register(b, 100 + h)
    a.free(blocks[1])
    a.free(blocks[0])   # freed later: more recently used
    assert a.get_num_free_blocks() == 2 and a.num_evictions == 0
    got = a.allocate()
    assert got == blocks[1] and a.lookup(101) is None and a.num_evictions == 1   # LRU first
    a.free(blocks[2])
    assert a.allocate() == blocks[0] and a.lookup(100) is None
    assert a.lookup(102) == blocks[2]
    a.check_invariants()
    # A fresh block is handed out before any cached one is evicted.
    c = BlockAllocator("gpu", 4, 3, reserve_null_block=True, enable_caching=True)
    x = c.allocate()
    c.register(x, 5)
    c.free(x)
    assert c.allocate() != x and c.lookup(5) == x


def test_caching_off_and_reset():
    off = BlockAllocator("gpu", 4, 3, reserve_null_block=True)
    b = off.allocate()
    assert not off.register(b, 1) and off.lookup(1) is None
    on = BlockAllocator("gpu", 4, 3, reserve_null_block=True, enable_caching=True)
    b = on.allocate()
    on.register(b, 1)
    on.free(b)
    on.reset_cache()
    assert on.lookup(1) is None and on.get_num_free_blocks() == 2 and on.get_num_cached_blocks() == 0
    on.check_invariants()
    with pytest.raises(ValueError, match="cannot register free"):
        on.register(b, 2)
