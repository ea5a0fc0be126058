"""The contiguous-reservation baseline: what it reserves, that it never
allocates on append, how KV waste is counted, and same greedy tokens."""
import numpy as np
import pytest

from jpaged import SamplingParams
from jpaged.block_manager import AllocStatus, BlockSpaceManager
from jpaged.bench.reservation import (ContiguousBlockAllocator, ReservationBlockManager,
                                      kv_slot_usage, reserved_len)
from jpaged.sequence import Sequence, SequenceGroup, SequenceStatus
from jpaged.stats import EngineStats
from tiny import ENGINE, LLAMA

BS = 4


def group(seq_id, prompt_len, max_tokens, n=1):
    seq = Sequence(seq_id, None, list(range(3, 3 + prompt_len)), BS)
    sp = SamplingParams(n=n, temperature=1.0 if n > 1 else 0.0, max_tokens=max_tokens,
                        ignore_eos=True)
    return SequenceGroup(f"r{seq_id}", [seq], sp, 0.0), seq


def manager(policy, num_blocks=65, max_model_len=64):
    return ReservationBlockManager(BS, num_blocks, 0, policy=policy, max_model_len=max_model_len)


def test_reserved_len():
    assert reserved_len("max", 19, 64) == 64
    assert reserved_len("pow2", 19, 64) == 32
    assert reserved_len("pow2", 32, 64) == 32
    assert reserved_len("pow2", 33, 40) == 40
    assert reserved_len("oracle", 19, 64) == 19
    with pytest.raises(ValueError, match="policy"):
        reserved_len("buddy", 19, 64)


@pytest.mark.parametrize("policy,blocks", [("max", 16), ("pow2", 8), ("oracle", 5)])
def test_reserves_up_front_and_never_allocates_on_append(policy, blocks):
    bm = manager(policy)
    g, seq = group(0, 10, 9)  # true length 19 tokens
    assert bm.can_allocate(g) == AllocStatus.OK
    bm.allocate(g)
    seq.status = SequenceStatus.RUNNING
    table = bm.get_block_table(seq)
    assert len(table) == blocks
    assert table == list(range(table[0], table[0] + blocks))  # one contiguous run
    free = bm.get_num_free_gpu_blocks()
    assert free == 64 - blocks
    for t in range(9):
        seq.num_computed_tokens = seq.get_len()
        assert bm.can_append_slots(g)
        assert bm.append_slots(seq) == []
        seq.append_token_id(7, 0.0)
        assert bm.get_num_free_gpu_blocks() == free
    bm.check_invariants()
    # waste: slots of the reservation not holding a computed token's K/V
    seq.num_computed_tokens = 18
    in_use, filled, pool = kv_slot_usage(bm, [seq])
    assert (in_use, filled, pool) == (blocks * BS, 18, 64 * BS)
    assert bm.reset_prefix_cache()  # (the engine's, after a lost KV pool: nothing cached)
    bm.free(seq)
    assert bm.get_num_free_gpu_blocks() == 64
    bm.check_invariants()


def test_paged_manager_waste_is_only_the_last_block_tail():
    bm = BlockSpaceManager(BS, 65, 0)
    g, seq = group(0, 10, 9)
    bm.allocate(g)
    seq.num_computed_tokens = 10
    assert kv_slot_usage(bm, [seq]) == (3 * BS, 10, 64 * BS)


def test_pool_fills_by_reservation_and_fragments():
    bm = manager("oracle", num_blocks=13)  # 12 usable blocks
    groups = []
    for i in range(3):
        g, seq = group(i, 12, 4)  # 16 tokens = 4 blocks each
        assert bm.can_allocate(g)
        bm.allocate(g)
        groups.append((g, seq))
    g4, _ = group(9, 4, 4)
    assert bm.can_allocate(g4) == AllocStatus.LATER
    bm.free(groups[1][1])  # a hole of 4 blocks in the middle
    big, _ = group(10, 16, 4)  # 20 tokens = 5 blocks: 4 free, none contiguous enough
    assert bm.get_num_free_gpu_blocks() == 4
    assert bm.can_allocate(big) == AllocStatus.LATER
    assert bm.can_allocate(g4) == AllocStatus.OK
    huge, _ = group(11, 40, 10)
    assert bm.can_allocate(huge) == AllocStatus.NEVER


def test_contiguous_allocator_first_fit():
    a = ContiguousBlockAllocator("gpu", BS, 11, reserve_null_block=True)
    assert a.allocate_range(3) == [1, 2, 3]
    assert a.allocate_range(4) == [4, 5, 6, 7]
    for b in (2, 3):
        a.free(b)
    assert a.get_num_free_blocks() == 5 and a.has_free_run(3) and not a.has_free_run(4)
    assert a.allocate_range(3) == [8, 9, 10]
    assert a.allocate_range(3) is None
    assert a.allocate_range(2) == [2, 3]
    a.check_invariants()
    with pytest.raises(ValueError, match="double free"):
        a.free(2) or a.free(2)


def test_multi_sequence_requests_are_refused():
    bm = manager("oracle")
    g, _ = group(0, 10, 9, n=2)
    with pytest.raises(ValueError, match="one sequence per request"):
        bm.can_allocate(g)
    with pytest.raises(ValueError, match="prefix caching"):
        ReservationBlockManager(BS, 65, 0, enable_prefix_caching=True, policy="max",
                                max_model_len=64)


def test_same_greedy_tokens_as_the_paged_engine():
    import functools

    import models
    from jpaged.bench.harness import use_system
    from jpaged.config import EngineConfig
    from jpaged.engine import LLMEngine

    model = models.random_model(LLAMA, dtype="float32", seed=1)
    factory = functools.partial(ReservationBlockManager, policy="pow2", max_model_len=64)
    engine = LLMEngine(EngineConfig(model="tiny", num_gpu_blocks=200, **ENGINE), model=model,
                       progress=False, block_manager_factory=factory)
    assert isinstance(engine.block_manager, ReservationBlockManager)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 320, int(n)).tolist() for n in rng.integers(3, 30, 12)]
    lens = [int(n) for n in rng.integers(2, 20, 12)]

    def run():
        for i, (p, n) in enumerate(zip(prompts, lens)):
            engine.add_request(str(i), None, SamplingParams(temperature=0.0, max_tokens=n,
                                                            ignore_eos=True),
                               prompt_token_ids=p)
        outs = {}
        while engine.has_unfinished_requests():
            for o in engine.step():
                assert o.error is None
                outs[int(o.request_id)] = o.outputs[0].token_ids
        engine.block_manager.check_invariants()
        bm = engine.block_manager
        assert bm.get_num_free_gpu_blocks() == bm.get_num_total_gpu_blocks()
        return [outs[i] for i in range(len(prompts))]

    tokens = {"orca-pow2": run()}
    for system in ("jpaged", "orca-max", "orca-oracle"):
        use_system(engine, system)
        tokens[system] = run()
        if system != "jpaged":
            assert engine.stats.num_preemptions == 0
    assert all(len(t) == n for t, n in zip(tokens["jpaged"], lens))
    for system in ("orca-pow2", "orca-max", "orca-oracle"):
        assert tokens[system] == tokens["jpaged"], system
    # The seam the harness uses: a fresh manager over part of the pool, config
    # changes that need no recompile, zeroed stats; anything else is refused.
    assert engine.stats.num_steps > 0
    engine.use_block_manager(num_blocks=50, async_scheduling=False, max_decode_window=1)
    kept = EngineStats.KEPT_BY_RESET + ("compiles_after_warmup",)  # since it was built
    zeroed = {k: v for k, v in engine.stats.snapshot().items() if k not in kept}
    assert zeroed == {k: v for k, v in EngineStats().snapshot().items() if k not in kept}
    assert engine.stats.compiles_at_warmup > 0 and engine.stats.compiles_after_warmup == 0
    assert engine.block_manager.get_num_total_gpu_blocks() == 49
    assert not engine.config.async_scheduling and engine.config.max_decode_window == 1
    assert type(engine.block_manager).__name__ == "BlockSpaceManager"
    assert run() == tokens["jpaged"] and engine.stats.num_steps_ahead == 0
    with pytest.raises(ValueError, match="cannot change .'block_size'."):
        engine.use_block_manager(block_size=32)
    with pytest.raises(ValueError, match="num_blocks must be in"):
        engine.use_block_manager(num_blocks=10_000)
    with pytest.raises(ValueError, match="max_decode_window must be in"):
        engine.use_block_manager(max_decode_window=10_000)
    engine.add_request("busy", None, SamplingParams(max_tokens=2), prompt_token_ids=[5, 6])
    with pytest.raises(RuntimeError, match="needs an idle engine"):
        engine.use_block_manager()
    engine.abort_request("busy")
    while engine.has_unfinished_requests():
        engine.step()


def test_engine_stats_snapshot_and_reset():
    st = EngineStats()
    st.num_steps += 3
    st.host_seconds += 0.5
    snap = st.snapshot()
    st.num_steps += 1
    assert snap["num_steps"] == 3 and snap["host_seconds"] == 0.5  # a copy
    st.reset()
    assert st.snapshot() == EngineStats().snapshot() and isinstance(st.host_seconds, float)
