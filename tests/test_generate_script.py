"""scripts/generate.py end to end on a tiny random-weight model (CPU): JSONL
out, the closing summary, prompts from a JSONL file, and the same tokens
with async scheduling on and off."""
import importlib.util
import json
import pathlib

from tiny import ENGINE_FLAGS as ENGINE, LLAMA

REPO = pathlib.Path(__file__).resolve().parents[1]


def _generate_module():
    spec = importlib.util.spec_from_file_location("generate_script", REPO / "scripts" / "generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_random_weights_batch_jsonl_and_summary(tmp_path, capsys):
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(LLAMA))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt_token_ids": ids})
                                 for ids in ([5, 6, 7], [9] * 20, list(range(3, 40)))))
    common = ["--model", str(cfg), "--random-weights", "--num-random-prompts", "5",
              "--random-prompt-len", "12", "--prompts-file", str(prompts),
              "--max-tokens", "9", "--ignore-eos", "--n", "2", "--temperature", "0.8",
              "--sampling-seed", "4", "--logprobs", "2", *ENGINE]
    gen = _generate_module()
    recs, summaries = {}, {}
    for name, extra in (("async", []), ("sync", ["--no-async-scheduling"])):
        out = tmp_path / f"{name}.jsonl"
        gen.main(common + extra + ["--output", str(out)])
        summaries[name] = capsys.readouterr().err
        recs[name] = [json.loads(line) for line in out.read_text().splitlines()]
    a = recs["async"]
    assert len(a) == 8 and all(r["error"] is None for r in a)
    assert all(len(r["outputs"]) == 2 for r in a)
    assert all(len(c["token_ids"]) == 9 and c["finish_reason"] == "length"
               for r in a for c in r["outputs"])
    assert a == recs["sync"]
    s = summaries["async"]
    assert "requests: 8 (0 rejected)" in s and "generated tokens: 144" in s
    assert "tokens/s" in s and "0 after" in s and "ms/step" in s
    ahead = int(s.split(" dispatched ahead")[0].rsplit("(", 1)[1])
    assert ahead > 0
    assert "(0 dispatched ahead)" in summaries["sync"]
