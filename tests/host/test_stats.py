import dataclasses

from jpaged.stats import EngineStats


def test_reset_zeroes_the_counters_but_keeps_the_compiles():
    st = EngineStats(num_steps=7, num_generated_tokens=40, peak_blocks_used=9,
                     host_seconds=1.5, num_compiles=30, compiles_at_warmup=28,
                     warmup_seconds=4.0)
    st.reset()
    kept = {"num_compiles": 30, "compiles_at_warmup": 28, "warmup_seconds": 4.0}
    assert set(EngineStats.KEPT_BY_RESET) == set(kept)
    for f in dataclasses.fields(st):
        assert getattr(st, f.name) == kept.get(f.name, f.default), f.name
    assert st.compiles_after_warmup == 2


def test_snapshot_is_a_copy_with_the_derived_count():
    st = EngineStats(num_compiles=5, compiles_at_warmup=5)
    snap = st.snapshot()
    assert snap["compiles_after_warmup"] == 0 and snap["num_compiles"] == 5
    st.num_compiles += 1
    assert snap["num_compiles"] == 5 and st.snapshot()["compiles_after_warmup"] == 1
