"""scripts/bench_generate.py on a tiny model (CPU): every part runs and
records what it measured, the ceiling (the model alone) included."""
import importlib.util
import json
import pathlib

import pytest

from tiny import ENGINE, LLAMA

REPO = pathlib.Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("script_bench_generate",
                                                  REPO / "scripts" / "bench_generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_generate_records_the_engine_and_its_ceiling(tmp_path, capsys):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(LLAMA))
    out = tmp_path / "generate.json"
    # tiny.ENGINE's shapes and a 200-block pool: the steps the other tests compile
    shapes = [f"--{k.replace('_', '-')}={ENGINE[k]}" for k in (
        "block_size", "max_num_seqs", "max_model_len", "max_num_batched_tokens",
        "max_decode_window")]
    _script().main(["--model", str(config), "--dtype", "float32", "--num-prompts", "10",
                    "--prompt-len", "8", "--max-tokens", "4", *shapes, "--num-gpu-blocks", "200",
                    "--swap-blocks", "12", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["pallas_vs_reference"]["greedy_16_equal"] is True
    gen = res["generate"]
    assert gen["num_gpu_blocks"] == 200
    assert gen["output_tokens"] == 10 * 4 and gen["sync"]["output_tokens"] == 10 * 4
    assert gen["requests_with_equal_tokens_async_vs_sync"] == 10
    assert gen["compiles_after_warmup"] == 0
    assert res["swap"]["round_trip_bit_exact"] and res["swap"]["all_finished"]
    ceiling = res["ceiling"]
    # auto: min(10 prompts, 8 seqs) sequences at 8 + 4 // 2 tokens
    assert (ceiling["num_seqs"], ceiling["context"]) == (8, 10) and ceiling["tok_per_s"] > 0
    assert gen["vs_ceiling"] == pytest.approx(gen["output_tokens_per_s"] / ceiling["tok_per_s"])
    assert "model alone (8 seqs at 10" in capsys.readouterr().out


def test_bench_generate_ceiling_flag():
    with pytest.raises(SystemExit):
        _script().main(["--ceiling", "256"])
