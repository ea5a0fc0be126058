"""scripts/bench_generate.py on a tiny model (CPU): every part runs and
records what it measured, the ceiling (the model alone) included."""
import importlib.util
import json
import pathlib

import pytest

from tiny import LLAMA

REPO = pathlib.Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("script_bench_generate",
                                                  REPO / "scripts" / "bench_generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_generate_records_the_engine_and_its_ceiling(tmp_path, capsys):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(dict(LLAMA, num_hidden_layers=1)))
    out = tmp_path / "generate.json"
    _script().main(["--model", str(config), "--dtype", "float32", "--num-prompts", "6",
                    "--prompt-len", "8", "--max-tokens", "4", "--max-num-seqs", "4",
                    "--max-model-len", "32", "--max-num-batched-tokens", "32", "--max-decode-window", "2",
                    "--swap-blocks", "12", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["pallas_vs_reference"]["greedy_16_equal"] is True
    gen = res["generate"]
    assert gen["output_tokens"] == 6 * 4 and gen["sync"]["output_tokens"] == 6 * 4
    assert gen["requests_with_equal_tokens_async_vs_sync"] == 6
    assert gen["compiles_after_warmup"] == 0
    assert res["swap"]["round_trip_bit_exact"] and res["swap"]["all_finished"]
    ceiling = res["ceiling"]
    # auto: min(6 prompts, 4 seqs) sequences at 8 + 4 // 2 tokens
    assert (ceiling["num_seqs"], ceiling["context"]) == (4, 10) and ceiling["tok_per_s"] > 0
    assert gen["vs_ceiling"] == pytest.approx(gen["output_tokens_per_s"] / ceiling["tok_per_s"])
    assert "model alone (4 seqs at 10" in capsys.readouterr().out


def test_bench_generate_ceiling_flag():
    with pytest.raises(SystemExit):
        _script().main(["--ceiling", "256"])
