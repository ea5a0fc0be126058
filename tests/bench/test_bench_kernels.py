"""scripts/bench_kernels.py on CPU: the prefill sweep in its --tiny form (the
Triton kernel in interpret mode; Mosaic GPU and cuDNN skipped, with the
reason) lands in the JSON and the printed table; the GPU sweep's shape list.
No speed assertions beyond positive rates."""
import importlib.util
import json
import math
import pathlib

import jax.numpy as jnp
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bk():
    spec = importlib.util.spec_from_file_location("script_bench_kernels",
                                                  REPO / "scripts" / "bench_kernels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_prefill_sweep_tiny(bk, tmp_path, capsys):
    out = tmp_path / "kernels.json"
    # reps are cheap here (compiles dominate); a slope that noise makes no time is measured again
    bk.main(["--tiny", "--shapes", "none", "--no-ragged", "--reps", "9", "--out", str(out)])
    res = json.loads(out.read_text())
    rows = res["prefill_sweep"]
    assert [r["name"] for r in rows] == [s[0] for s in bk.prefill_sweep_shapes(True)]
    assert {r["shape"]["head_dim"] for r in rows} == {64, 128}
    assert {r["shape"]["group"] for r in rows} == {1, 4, 8}
    assert {len(r["shape"]["q_lens"]) for r in rows} == {1, 8}
    assert any(any(r["shape"]["cached"]) for r in rows) and not all(any(r["shape"]["cached"]) for r in rows)
    printed = capsys.readouterr().out
    for r in rows:
        s = r["shape"]
        assert r["useful_flops"] == bk.useful_flops(s["q_lens"], s["cached"], s["num_heads"],
                                                    s["head_dim"]) > 0
        (t,) = r["triton"]
        assert t["tuning"] == {} and t["us"] > 0 and t["tflops"] > 0
        assert t["err"] <= 3e-2  # bf16 against the f32 reference
        assert math.isfinite(t["x_matmul"]) and "x_cudnn" not in t  # cuDNN did not run
        (m,) = r["mosaic"]
        assert "Hopper" in m["skipped"] and "us" not in m
        assert "CUDA GPU" in r["cudnn"]["skipped"] and "us" not in r["cudnn"]
        assert r["name"] in printed
    assert "xcuDNN" in printed and f"wrote {out}" in printed


def test_quick_has_no_prefill_sweep(bk, tmp_path):
    out = tmp_path / "kernels.json"
    bk.main(["--tiny", "--quick", "--shapes", "none", "--no-ragged", "--reps", "1",
             "--out", str(out)])
    res = json.loads(out.read_text())
    assert "prefill_sweep" not in res and res["decode"] == []
    assert res["matmul_tflops"] > 0 and res["copy_tbps"] > 0


def test_a_slope_that_is_no_time_is_an_error(bk):
    """A run of more input sets that was no slower (the H200's cuDNN entry
    of 64x128 mixed hd64 g1 once read -147.7 us) is reported, never timed."""
    assert bk.slope([(2e-3, 5e-3), (2e-3, 6e-3), (3e-3, 5e-3)], 2, 4) == pytest.approx(1.5e-3)
    with pytest.raises(bk.TimingError, match=r"4 input sets ran no slower than 2 .*-147\.7 us"):
        bk.slope([(1.0e-3, 0.7046e-3)] * 3, 2, 4)


def test_a_noisy_slope_is_measured_again(bk):
    """A round whose slope is no time (noise larger than the work) is
    measured again with its reps kept; only ROUNDS such rounds are an error."""
    rounds = iter([[(2e-3, 1e-3)] * 3, [(2e-3, 6e-3)] * 4])
    calls = []
    measure = lambda: calls.append(1) or next(rounds)
    # 3 bad pairs then 4 good: the median of the 7 is a good one (2 ms over 2 sets)
    assert bk.measured_slope(measure, 2, 4) == pytest.approx(2e-3) and len(calls) == 2
    bad = lambda: calls.append(1) or [(2e-3, 1e-3)] * 3
    calls.clear()
    with pytest.raises(bk.TimingError, match=r"over 9 reps"):
        bk.measured_slope(bad, 2, 4, rounds=3)
    assert len(calls) == 3


def test_mosaic_skip_reason_names_the_shape(bk):
    """A head_dim the Mosaic GPU kernel does not take: its own ValueError."""
    q = jnp.zeros((4, 4, 80), jnp.bfloat16)
    pool = jnp.zeros((2, 3, 2, 16, 80), jnp.bfloat16)
    bt, lens = jnp.asarray([[1]], jnp.int32), jnp.asarray([4], jnp.int32)
    qsl = jnp.asarray([0, 4], jnp.int32)
    reason = bk.mosaic_skip_reason(q, pool, bt, lens, qsl, interpret=False)
    assert "does not take this shape" in reason and "head_dim" in reason


def test_gpu_sweep_shapes(bk):
    """3 batches x head_dim 128/64 x GQA 4/8/1 over 32 query heads, today's
    ragged shape (8 x 512 over 0-1536 cached, hd 128, GQA 4) first."""
    shapes = bk.prefill_sweep_shapes(False)
    assert len(shapes) == 18 and len({s[0] for s in shapes}) == 18
    assert shapes[0][0] == "8x512_c0-1536_hd128_g4"
    assert {(hq, hkv) for _, _, _, hq, hkv, _, _ in shapes} == {(32, 32), (32, 8), (32, 4)}
    assert {d for *_, d, _ in shapes} == {64, 128}
    batches = {(len(q), q[0], min(c), max(c)) for _, q, c, *_ in shapes}
    assert batches == {(1, 4096, 0, 0), (8, 512, 0, 1536), (64, 128, 0, 1920)}
    # 1 x 4096 causal: 4096 * 4097 / 2 pairs
    assert bk.useful_flops([4096], [0], 32, 128) == 4 * 128 * 32 * 4096 * 4097 // 2


def test_topk_tiny(bk, tmp_path):
    """--topk times exact_top_k beside lax.top_k on the same rows; ours is
    checked against a stable sort of those rows."""
    out = tmp_path / "kernels.json"
    bk.main(["--tiny", "--quick", "--shapes", "none", "--no-ragged", "--topk", "--reps", "5",
             "--out", str(out)])
    rows = json.loads(out.read_text())["topk"]
    assert [r["name"] for r in rows] == [s[0] for s in bk.TOPK_SHAPES_TINY]
    for r in rows:
        assert r["exact"]["equal_to_stable_sort"] is True, r
        assert r["exact"]["us"] > 0 and r["lax"]["us"] > 0 and r["x_lax"] > 0
