"""scripts/check_tp.py on 2 virtual CPU devices, and the tensor- and
data-parallel flags of scripts/bench_throughput.py (and its scaling figures).

jax fixes its CPU device count when its backend starts, so check_tp runs in
a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=2; those
runs are queued (`start_early`) in tests/background.py's lane as soon as the
session's tests are collected, and their tests wait for them.
"""
import importlib.util
import json
import pathlib
import sys
import tempfile

import numpy as np
import pytest

import background

REPO = pathlib.Path(__file__).resolve().parents[2]
# 6 query / 3 KV heads: at tp 2 the KV heads are replicated to lcm(3, 2) = 6.
LLAMA = {"architectures": ["LlamaForCausalLM"], "hidden_size": 48, "intermediate_size": 96,
         "num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 3,
         "vocab_size": 320, "max_position_embeddings": 256, "eos_token_id": 2}
NUM_PROMPTS, MAX_TOKENS = 4, 8


def script(name):
    spec = importlib.util.spec_from_file_location(f"script_{name}",
                                                  REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# 9 query / 3 KV heads (SmolLM2's counts): at tp 2 each group of 3 query heads
# is padded with a zero head (12 heads) and each KV head stored twice (6).
LLAMA_9_HEADS = dict(LLAMA, hidden_size=72, num_attention_heads=9)


# The check_tp runs the tests assert on: name -> (model config, flags).
RUNS = {
    "tp2": (LLAMA, ["--num-prompts", str(NUM_PROMPTS), "--min-prompt-len", "3",
                    "--max-prompt-len", "20", "--max-tokens", str(MAX_TOKENS), "--block-size", "4",
                    "--max-num-seqs", "4", "--max-model-len", "64",
                    "--max-num-batched-tokens", "64"]),
    "nine_heads": (LLAMA_9_HEADS, ["--num-prompts", "2", "--min-prompt-len", "5",
                                   "--max-prompt-len", "12", "--max-tokens", str(MAX_TOKENS),
                                   "--block-size", "4", "--max-num-seqs", "2",
                                   "--max-model-len", "32", "--max-num-batched-tokens", "32"]),
    "cannot_split": (dict(LLAMA_9_HEADS, intermediate_size=95), []),
}
TESTS = {"test_check_tp_json_and_tokens_equal_at_tp2": "tp2",
         "test_check_tp_splits_nine_query_heads_two_ways": "nine_heads",
         "test_check_tp_reports_a_model_it_cannot_split": "cannot_split"}
_JOBS = {}


def _check_tp(name):
    """check_tp.py on 2 virtual CPU devices, run `name` of RUNS, in a
    temporary directory: (exit status, JSON, stdout, stderr, model path)."""
    config, flags = RUNS[name]
    with tempfile.TemporaryDirectory(prefix=f"check-tp-{name}-") as tmp:
        d = pathlib.Path(tmp)
        (d / "model.json").write_text(json.dumps(config))
        env = background.cpu_env(2, JPAGED_XLA_CACHE="off")
        cmd = [sys.executable, str(REPO / "scripts" / "check_tp.py"), "--model",
               str(d / "model.json"), "--tp", "1,2", "--out", str(d / "out.json"), *flags]
        (proc,) = background.run_processes([(cmd, dict(env=env, cwd=REPO))], timeout=300)
        out = d / "out.json"
        res = json.loads(out.read_text()) if out.exists() else None
        return proc.returncode, res, proc.stdout, proc.stderr, str(d / "model.json")


def _job(name):
    if name not in _JOBS:
        _JOBS[name] = background.submit(_check_tp, name)
    return _JOBS[name]


def start_early(items):
    """Queues the runs that the selected tests assert on."""
    for item in items:
        if item.originalname in TESTS:
            _job(TESTS[item.originalname])


def run_check_tp(name):
    """(exit status, JSON, stdout, model path) of run `name`, once it is done."""
    rc, res, stdout, stderr, model = _job(name).result()
    assert rc in (0, 1) and res is not None, stderr[-4000:]
    return rc, res, stdout, model


@pytest.fixture(scope="module")
def check_run():
    rc, res, stdout, name = run_check_tp("tp2")
    assert rc == 0, stdout
    return res, stdout, name


def test_check_tp_json_and_tokens_equal_at_tp2(check_run):
    res, stdout, name = check_run
    assert res["platform"] == "cpu" and res["devices"] == ["cpu", "cpu"]
    assert res["command"].startswith("python scripts/check_tp.py") and "--tp 1,2" in res["command"]
    assert res["dtype"] == "float32" and res["matmul_precision"] == "highest"
    assert res["engine"]["warm_up"] is False
    model = res["models"][name]
    assert model["config"]["num_kv_heads"] == 3
    lens = model["prompt_lens"]
    assert len(lens) == NUM_PROMPTS and lens[0] == 20 and lens[-1] == 3
    one, two = model["runs"]["1"], model["runs"]["2"]
    assert one["kv_pool_devices"] == 1 and two["kv_pool_devices"] == 2
    for run in (one, two):
        assert len(run["tokens"]) == NUM_PROMPTS
        assert all(len(t) == MAX_TOKENS for t in run["tokens"])
        assert run["compiles"] >= 2 and run["seconds"] > 0 and run["num_preemptions"] == 0
    assert "vs_tp1" not in one
    v = two["vs_tp1"]
    assert two["tokens"] == one["tokens"]  # f32 on CPU: the all-reduce order cannot flip them
    assert v["all_equal"] and v["num_equal"] == v["num_requests"] == NUM_PROMPTS
    assert v["first_divergence"] == [None] * NUM_PROMPTS
    assert 0 <= v["prefill_logits_max_abs_diff"] < 1e-4 * one["prefill_logits_max_abs"]
    assert v["prefill_argmax_equal_frac"] == 1.0
    assert res["all_equal"] is True
    assert "all equal: True" in stdout and f"{NUM_PROMPTS}/{NUM_PROMPTS}" in stdout


def test_check_tp_splits_nine_query_heads_two_ways():
    rc, res, stdout, name = run_check_tp("nine_heads")
    assert rc == 0, stdout
    model = res["models"][name]
    assert model["config"]["num_heads"] == 9 and model["config"]["num_kv_heads"] == 3
    one, two = model["runs"]["1"], model["runs"]["2"]
    assert two["kv_pool_devices"] == 2
    assert all(len(t) == MAX_TOKENS for t in one["tokens"])
    assert two["tokens"] == one["tokens"]
    v = two["vs_tp1"]
    assert v["all_equal"] and v["num_equal"] == v["num_requests"] == 2
    assert 0 <= v["prefill_logits_max_abs_diff"] < 1e-5 * one["prefill_logits_max_abs"]
    assert res["all_equal"] is True and "all equal: True" in stdout


def test_check_tp_reports_a_model_it_cannot_split():
    rc, res, stdout, name = run_check_tp("cannot_split")
    assert rc == 1
    model = res["models"][name]
    assert "must divide the MLP width (95)" in model["runs"]["2"]["error"]
    assert "skipped" in model and "1" not in model["runs"]  # nothing was run
    assert res["all_equal"] is False and "skipped" in stdout


def test_compare_finds_first_divergence():
    compare = script("check_tp").compare
    ref = dict(tokens=[[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    run = dict(tokens=[[1, 2, 3], [4, 0, 6], [0, 8, 0]])
    logits = np.array([[0.0, 1.0], [2.0, 0.5]])
    v = compare(run, ref, logits + [[0.0, 0.25], [0.0, 2.0]], logits)
    assert v["first_divergence"] == [None, 1, 0]
    assert v["num_equal"] == 1 and v["num_requests"] == 3 and not v["all_equal"]
    assert v["prefill_logits_max_abs_diff"] == 2.0
    assert v["prefill_argmax_equal_frac"] == 0.5  # row 1's argmax moved from 0 to 1


def test_check_tp_bad_flags(capsys):
    mod = script("check_tp")
    for argv, message in ((["--tp", "2,4"], "include 1"), (["--tp", "1,x"], "not a valid int"),
                          (["--num-prompts", "0"], "must be an int >= 1"),
                          (["--max-prompt-len", "500"], "must fit in --max-model-len")):
        with pytest.raises(SystemExit):
            mod.parse_args(argv)
        assert message in capsys.readouterr().err
    assert mod.parse_args(["--tp", "2,1,2"]).tp == [1, 2]


def test_bench_throughput_parallel_flags(capsys):
    mod = script("bench_throughput")
    assert mod.parse_args([]).tensor_parallel_size == 1
    assert mod.parse_args(["--tensor-parallel-size", "2"]).tensor_parallel_size == 2
    assert mod.parse_args([]).data_parallel_size == 1
    assert mod.parse_args(["--data-parallel-size", "2"]).data_parallel_size == 2
    for flag in ("--tensor-parallel-size", "--data-parallel-size"):
        for bad in ("0", "-2", "two"):
            with pytest.raises(SystemExit):
                mod.parse_args([flag, bad])
            err = capsys.readouterr().err
            assert flag in err
            assert ("must be an int >= 1" if bad != "two" else "is not an int") in err


def test_bench_throughput_scaling_vs_baseline(tmp_path):
    mod = script("bench_throughput")
    engine = dict(num_gpu_blocks=100, max_num_seqs=8, max_num_batched_tokens=64)
    base = dict(model="m", dtype="bfloat16", workload=dict(name="w"), engine=engine,
                tensor_parallel_size=1, commit="abc",
                systems=dict(jpaged=dict(output_tokens_per_s=1000.0)))
    (tmp_path / "tp1.json").write_text(json.dumps(base))
    mine = dict(base, tensor_parallel_size=2, data_parallel_size=1,
                engine=dict(engine, num_gpu_blocks=200),
                systems=dict(jpaged=dict(output_tokens_per_s=1500.0)))
    s = mod.scaling(mine, str(tmp_path / "tp1.json"))
    assert s["baseline_tp"] == 1 and s["baseline_dp"] == 1 and s["baseline_commit"] == "abc"
    assert s["systems"]["jpaged"]["speedup"] == 1.5
    assert s["systems"]["jpaged"]["efficiency"] == 0.75
    assert s["differs"] == ["engine.num_gpu_blocks"]
    # data parallelism: 2 replicas x 2 devices against the 1-device baseline (a
    # baseline written before data_parallel_size existed counts as dp 1)
    mine = dict(base, tensor_parallel_size=2, data_parallel_size=2,
                systems=dict(jpaged=dict(output_tokens_per_s=3000.0)))
    s = mod.scaling(mine, str(tmp_path / "tp1.json"))
    assert s["systems"]["jpaged"]["speedup"] == 3.0
    assert s["systems"]["jpaged"]["efficiency"] == 0.75
    assert "differs" not in s
    with pytest.raises(SystemExit):
        mod.parse_args(["--scaling-baseline", str(tmp_path / "missing.json")])
