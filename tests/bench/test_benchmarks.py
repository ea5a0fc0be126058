"""The bench scripts end to end on a tiny random model and workload (CPU):
each writes its JSON with the right fields and sane values; plot.py draws
them. No speed assertions."""
import importlib.util
import json
import math
import pathlib

import pytest

from jpaged.bench.workloads import Workload, save_workload, synthetic_alpaca
from tiny import ENGINE_FLAGS as ENGINE_ARGS, LLAMA

REPO = pathlib.Path(__file__).resolve().parents[2]
ORCA = ("orca-max", "orca-pow2", "orca-oracle")


def script(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    (d / "tiny.json").write_text(json.dumps(LLAMA))
    w = synthetic_alpaca(16, 320, seed=0, max_prompt_len=12, max_total_len=28)
    save_workload(Workload("tiny", w.requests), d / "w.json")
    return d


def header_ok(res, argv):
    assert res["device"] and res["platform"] == "cpu"
    assert res["commit"] is None or len(res["commit"]) >= 40
    assert res["command"].startswith("python scripts/") and argv[-1] in res["command"]
    assert res["random_weights"] is True
    assert res["engine"]["compiles_after_warmup"] == 0
    assert res["engine"]["compiles_at_warmup"] > 0 and res["engine"]["warmup_seconds"] > 0


def test_bench_throughput(files, capsys):
    out = files / "throughput.json"
    argv = ["--model", str(files / "tiny.json"), "--workload", str(files / "w.json"),
            "--num-requests", "16", "--systems", "jpaged,orca-max,orca-pow2,orca-oracle,"
            "jpaged-sync,jpaged-nochunk,jpaged-between8,hf-generate,hf-generate-batch", *ENGINE_ARGS,
            "--profile-device", str(files / "throughput-traces"), "--out", str(out)]
    script("bench_throughput").main(argv)
    res = json.loads(out.read_text())
    header_ok(res, argv)
    assert "wrote" in capsys.readouterr().out
    expected = sum(r["output_len"] for r in json.loads((files / "w.json").read_text())["requests"])
    systems = res["systems"]
    assert set(systems) == {"jpaged", *ORCA, "jpaged-sync", "jpaged-nochunk", "jpaged-between8",
                            "hf-generate", "hf-generate-batch"}
    assert res["engine"]["enable_chunked_prefill"] is True  # the default; nochunk turns it off
    for name in ("jpaged-sync", "jpaged-nochunk", "jpaged-between8"):
        assert systems["jpaged"]["output_tokens"] == systems[name]["output_tokens"]
    assert systems["jpaged"]["steps_dispatched_ahead"] > 0
    assert systems["jpaged-sync"]["steps_dispatched_ahead"] == 0
    for name in ("jpaged", *ORCA):
        r = systems[name]
        assert r["num_rejected"] == 0 and r["output_tokens"] == expected
        assert r["output_tokens_per_s"] > 0 and r["requests_per_s"] > 0
        assert 1 <= r["peak_concurrent_seqs"] <= 8
        assert 0 <= r["kv_waste_pct_at_peak"] <= 100
        assert r["kv_waste_pct_at_peak"] + r["kv_filled_pct_at_peak"] \
            + r["kv_free_pct_at_peak"] == pytest.approx(100)
        assert r["num_steps"] > 0 and r["host_ms_per_step"] > 0
        for k in ("preemptions", "swaps_out", "swaps_in", "jpaged_speedup"):
            assert k in r
    for name in ORCA:
        assert systems[name]["preemptions"] == 0
    # the jpaged run's trace (CPU: the host plane's XLA thunks), only that run's
    t = systems["jpaged"]["device_profile"]
    assert t["device_ms"] > 0 and t["modules"]
    tl = t["timeline"]
    assert 0 < tl["busy_ms"] <= tl["span_ms"] and 0 < tl["busy_pct"] <= 100
    idle_ms = sum(g["ms"] for g in tl["gaps"].values())
    assert tl["busy_ms"] + idle_ms == pytest.approx(tl["span_ms"])
    assert all("device_profile" not in systems[n] for n in systems if n != "jpaged")
    # Orca-Max reserves 64 tokens for requests of at most 28
    assert systems["orca-max"]["kv_waste_pct_at_peak"] > systems["jpaged"]["kv_waste_pct_at_peak"]
    for name in ("hf-generate", "hf-generate-batch"):  # CI has no torch / no CUDA
        assert "skipped" in systems[name] or "output_tokens_per_s" in systems[name]


@pytest.mark.parametrize("chunked", [True, False])
def test_bench_long_prompt(files, chunked):
    """Chunked: the long prompt in chunks beside the decodes; off: one
    prefill step that stalls them (its TPOT still counts only tokens that
    reached the host)."""
    out = files / f"long-{chunked}.json"
    # (max_model_len 64, as in ENGINE_ARGS: the steps compiled for the
    # throughput test's engine (off) and test_chunked_prefill's budget of 16 (on))
    budget = ["--max-num-batched-tokens", "16", "--long-prefill-thresholds", "0,5",
              "--decode-windows-between-chunks", "0,2"] if chunked \
        else ["--no-enable-chunked-prefill", "--max-num-batched-tokens", "64"]
    argv = ["--model", str(files / "tiny.json"), "--dtype", "float32", "--block-size", "4",
            "--max-num-seqs", "8", "--max-model-len", "64", *budget,
            "--num-gpu-blocks", "200", "--max-decode-window", "8", "--no-progress",
            "--num-seqs", "4", "--context", "6", "--long-prompt", "50",
            "--base-seconds", "0.2", "--profile-host", str(files / f"long-{chunked}.txt"),
            "--out", str(out)]
    script("bench_long_prompt").main(argv)
    res = json.loads(out.read_text())
    header_ok(res, argv)
    assert res["long_prompt"] == 50 and res["engine"]["enable_chunked_prefill"] == chunked
    if chunked:  # 50 tokens in chunks of at most 16 - 4 decodes; then of at most 5
        assert res["engine"]["max_num_batched_tokens"] == 16 and res["steps_during"] >= 4
        assert [(r["long_prefill_token_threshold"], r["decode_window_between_chunks"])
                for r in res["runs"]] == [(0, 0), (0, 2), (5, 0), (5, 2)]
        assert res["runs"][2]["steps_during"] >= 10
        # windows between the chunks: as many chunk steps, and a window after
        # each that leaves more than the budget (16) of the prompt: 6 of them
        assert res["runs"][3]["steps_during"] >= 10 + 6
        assert res["runs"][0]["steps_during"] == res["steps_during"]
    else:  # its prefill step, and a step that brings its token and the decodes' to the host
        assert [r["long_prefill_token_threshold"] for r in res["runs"]] == [0]
        assert res["steps_during"] >= 2
    assert res["tpot_alone_ms"] > 0 and res["tpot_during_ms"] > 0
    assert res["tpot_ratio"] == pytest.approx(res["tpot_during_ms"] / res["tpot_alone_ms"])
    assert 0 < res["longest_step_ms_during"] <= 1e3 * res["long_prompt_ttft_s"]
    assert res["long_prompt_ttft_s"] > 0 and res["long_prompt_prefill_tok_per_s"] > 0
    for r in res["runs"]:  # the engine's split of each step's time, per phase
        for phase in ("alone", "during"):
            assert r[f"host_ms_per_step_{phase}"] > 0
            assert 0 < r[f"dispatch_ms_per_step_{phase}"] <= r[f"host_ms_per_step_{phase}"]
            assert r[f"device_ms_per_step_{phase}"] >= 0
            assert r[f"steps_dispatched_ahead_{phase}"] >= 0
    assert "engine.py" in (files / f"long-{chunked}.txt").read_text()  # the step's profile


def test_bench_latency(files):
    out = files / "latency.json"
    argv = ["--model", str(files / "tiny.json"), "--workload", str(files / "w.json"),
            "--rates", "20,200", "--duration", "0.4", "--min-requests", "6",
            "--max-requests", "16", "--systems", "jpaged,jpaged-window1," + ",".join(ORCA),
            *ENGINE_ARGS, "--out", str(out)]
    script("bench_latency").main(argv)
    res = json.loads(out.read_text())
    header_ok(res, argv)
    assert res["warmup_requests"] == 16  # (the workload's all: fewer than the default 32)
    assert set(res["systems"]) == {"jpaged", "jpaged-window1", *ORCA}
    for pt in res["systems"]["jpaged-window1"]["points"]:  # one decode step per call
        assert pt["windows_before_first_token"] == [0] * pt["num_finished"]
    # the default bound: 2 x jpaged's latency at the lowest rate
    first = res["systems"]["jpaged"]["points"][0]["mean_normalized_latency"]
    assert res["latency_bound"] == pytest.approx(2 * first)
    assert res["systems"]["jpaged"]["sustained_rate"] in (20, 200)
    for s in res["systems"].values():
        assert "sustained_rate" in s and s["label"]
        assert 1 <= len(s["points"]) <= 2
        for pt in s["points"]:
            assert pt["rate"] in (20, 200) and pt["num_finished"] == pt["num_requests"]
            assert len(pt["ttft_ms"]) == len(pt["windows_before_first_token"]) == \
                len(pt["arrived_idle"]) == pt["num_finished"]
            assert min(pt["ttft_ms"]) > 0 and min(pt["windows_before_first_token"]) >= 0
            assert min(pt["calls_to_first_token"]) >= 1
            assert 0 <= pt["behind_window_share"] <= 1
            assert math.isfinite(pt["mean_normalized_latency"]) and pt["mean_normalized_latency"] > 0
            assert pt["p90_normalized_latency"] >= pt["p50_normalized_latency"] > 0
            assert pt["sim_seconds"] > 0


def test_bench_sharing_and_plots(files):
    out = files / "sharing.json"
    argv = ["--model", str(files / "tiny.json"), "--workload", str(files / "w.json"),
            "--num-requests", "4", "--num-prefix-requests", "8", "--parallel", "2,4",
            "--beams", "2", "--prefix-scale", "0.1", "--usable-kv-gib", "0.0001",
            *ENGINE_ARGS, "--profile-host", str(files / "host"),
            "--profile-device", str(files / "traces"), "--out", str(out)]
    script("bench_sharing").main(argv)
    res = json.loads(out.read_text())
    header_ok(res, argv)
    # the beam runs' host profiles, each of the engine's steps
    for kind in ("beam", "unshared"):
        text = (files / f"host.{kind}").read_text()
        assert "function calls" in text and "engine.py" in text and "(step)" in text
    # and their device time (CPU: the host plane's XLA thunks), per jitted function
    for name, t in res["beam_search"]["2"]["device_profile"].items():
        assert name in ("beam2", "beam2-unshared") and t["device_ms"] > 0
        assert t["kernels"] and sum(m["ms"] for m in t["modules"]) == pytest.approx(t["device_ms"])
    # 1280-byte blocks (2 layers x K,V x 2 heads x 4 slots x 10 dims x f32):
    # 0.0001 GiB holds 83, plus the null block
    assert res["engine"]["usable_blocks"] == 84 and res["engine"]["num_gpu_blocks"] == 200
    for e in res["parallel_sampling"].values():
        assert 0 < e["shared"]["peak_blocks_used"] <= 83
    assert set(res["parallel_sampling"]) == {"2", "4"} and set(res["beam_search"]) == {"2"}
    for e in [*res["parallel_sampling"].values(), *res["beam_search"].values()]:
        assert 0 < e["blocks_saved_pct"] < 100
        assert e["throughput_gain"] > 0
        assert e["unshared"]["blocks_saved_pct"] == 0  # n=1 requests share nothing
        assert e["shared"]["output_tokens"] == e["unshared"]["output_tokens"]
    assert res["parallel_sampling"]["4"]["blocks_saved_pct"] > \
        res["parallel_sampling"]["2"]["blocks_saved_pct"]
    for shots, e in res["shared_prefix"].items():
        assert e["with_caching"]["cached_prompt_tokens"] > 0
        assert e["without_caching"]["cached_prompt_tokens"] == 0
        assert e["throughput_gain"] > 0
    assert set(res["shared_prefix"]) == {"1-shot", "5-shot"}

    pngs = script("plot").main([str(files / f) for f in
                                ("throughput.json", "latency.json", "sharing.json")
                                if (files / f).exists()] + ["--out-dir", str(files / "png")])
    assert pngs and all(pathlib.Path(p).stat().st_size > 1000 for p in pngs)
    with pytest.raises(ValueError, match="not a bench"):
        (files / "other.json").write_text("{}")
        script("plot").main([str(files / "other.json")])


def test_bad_flags_are_reported():
    with pytest.raises(SystemExit):
        script("bench_throughput").main(["--systems", "jpaged,vllm"])
    with pytest.raises(SystemExit):
        script("bench_latency").main(["--rates", "8,4"])
    with pytest.raises(SystemExit):
        script("bench_sharing").main(["--shots", "3"])
