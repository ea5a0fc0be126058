"""scripts/generate.py end to end on a tiny random-weight model (CPU): JSONL
out, written as requests finish; the closing summary; bad input lines that
get their own error records while the good ones run; the input format given,
not guessed; Ctrl-C keeping finished results; --chat.

One engine serves the whole module in both scheduling modes (its warm-up
is most of the cost): `load_llm` is cached, and `load_model` gives the random
model a tiny byte-level tokenizer with a chat template, so text prompts run.
"""
import dataclasses
import importlib.util
import io
import json
import pathlib
import sys

import pytest

from tiny import ENGINE_FLAGS as ENGINE, LLAMA, tiny_tokenizer

REPO = pathlib.Path(__file__).resolve().parents[2]


def _generate_module():
    spec = importlib.util.spec_from_file_location("generate_script", REPO / "scripts" / "generate.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def gen():
    mod = _generate_module()
    real_load_model, real_load_llm = mod.load_model, mod.load_llm
    tok = tiny_tokenizer()
    mod.load_model = lambda args: dataclasses.replace(real_load_model(args), tokenizer=tok)
    engines = {}

    def load_llm(args, max_num_seqs, freeze=False):
        assert not freeze, "main(argv) freezes no heap (a test process builds engines)"
        # NOTE: every test passes the same engine flags (`_flags`), so one
        # engine is the engine each run would build, in the run's scheduling
        # mode (switched on the idle engine: LLMEngine.use_block_manager).
        if "llm" not in engines:
            engines["llm"] = real_load_llm(args, max_num_seqs)
        llm = engines["llm"]
        llm.engine.use_block_manager(async_scheduling=not args.no_async_scheduling)
        return llm

    mod.load_llm = load_llm
    mod.engines = engines
    yield mod
    # The module stays in sys.modules (dataclasses need it): drop its engines.
    engines.clear()
    del sys.modules["generate_script"]


@pytest.fixture(scope="module")
def model_cfg(tmp_path_factory):
    cfg = tmp_path_factory.mktemp("model") / "tiny.json"
    cfg.write_text(json.dumps(LLAMA))
    return str(cfg)


def _flags(model_cfg, *extra):
    return ["--model", model_cfg, "--random-weights", *ENGINE, *extra]


def _run(gen, argv, out):
    gen.main(argv + ["--output", str(out)])
    return [json.loads(line) for line in out.read_text().splitlines()]


def _by_index(recs):
    return {r["index"]: r for r in recs}


def _tokens(outputs):
    """What must not change with the batch around a request (its float32
    logprobs may, in the last digits)."""
    return [(c["text"], c["token_ids"], c["finish_reason"]) for c in outputs]


def test_random_weights_batch_jsonl_and_summary(gen, model_cfg, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt_token_ids": ids})
                                 for ids in ([5, 6, 7], [9] * 20, list(range(3, 40)))))
    common = _flags(model_cfg, "--num-random-prompts", "5", "--random-prompt-len", "12",
                    "--prompts-file", str(prompts), "--max-tokens", "9", "--ignore-eos",
                    "--n", "2", "--temperature", "0.8", "--sampling-seed", "4", "--logprobs", "2")
    recs, summaries = {}, {}
    for name, extra in (("async", []), ("sync", ["--no-async-scheduling"])):
        recs[name] = _run(gen, common + extra, tmp_path / f"{name}.jsonl")
        summaries[name] = capsys.readouterr().err
    a = sorted(recs["async"], key=lambda r: r["index"])
    assert [r["index"] for r in a] == list(range(8))
    assert [(r["source"], r["line"]) for r in a] == \
        [(str(prompts), 1), (str(prompts), 2), (str(prompts), 3)] + [("random", None)] * 5
    assert all(r["error"] is None and r["request_id"] == str(r["index"]) for r in a)
    assert all(len(r["outputs"]) == 2 for r in a)
    assert all(len(c["token_ids"]) == 9 and c["finish_reason"] == "length"
               for r in a for c in r["outputs"])
    assert a == sorted(recs["sync"], key=lambda r: r["index"])
    s = summaries["async"]
    assert "requests: 8 (0 rejected)" in s and "generated tokens: 144" in s
    assert "tokens/s" in s and "0 after" in s and "ms/step" in s
    ahead = int(s.split(" dispatched ahead")[0].rsplit("(", 1)[1])
    assert ahead > 0
    assert "(0 dispatched ahead)" in summaries["sync"]


@pytest.mark.parametrize("where", ["missing/out.jsonl", "."])
def test_bad_output_path_fails_before_loading(gen, model_cfg, tmp_path, monkeypatch, where):
    def never(*_):
        raise AssertionError("the model was loaded before the output path was checked")
    monkeypatch.setattr(gen, "load_llm", never)
    monkeypatch.setattr(gen, "read_inputs", never)
    out = tmp_path / where
    with pytest.raises(SystemExit) as e:
        gen.main(_flags(model_cfg, "--prompt", "hi", "--output", str(out)))
    assert f"--output {out}: cannot write there" in str(e.value.code)


BAD_AND_GOOD = [  # (line text, the error's words, or None for a good line)
    ('{"prompt_token_ids": [5, 6, 7]}', None),
    ('{"prompt_token_ids": [5, 6, "prompt": "x"}', "line 2: invalid JSON"),
    ("", "blank: skipped"),
    ('{"text": "no prompt key"}', 'needs "prompt" (a string) or "prompt_token_ids"'),
    ('{"prompt": ""}', "the prompt is empty"),
    ('{"prompt_token_ids": [5, 999, 6]}', "outside the vocabulary [0, 320)"),
    ('{"prompt": 5}', '"prompt" must be a string, got 5'),
    ('{"prompt_token_ids": [5, 6.5]}', '"prompt_token_ids" must be a list of ints'),
    ("[1, 2]", "expected a JSON object"),
    ('{"prompt": "h\\u00e9llo {world}"}', None),
    ('{"prompt_token_ids": ' + json.dumps([9] * 70) + "}", "max_model_len"),
    ('{"prompt_token_ids": [11, 12, 13, 14]}', None),
]


def test_bad_lines_get_error_records_and_good_lines_still_run(gen, model_cfg, tmp_path, capsys):
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_bytes("\n".join(line for line, _ in BAD_AND_GOOD).encode() + b"\n\xff\xfe\n")
    recs = _run(gen, _flags(model_cfg, "--prompts-file", str(mixed), "--max-tokens", "6"),
                tmp_path / "out.jsonl")
    assert "requests: 12 (9 rejected)" in capsys.readouterr().err
    by_line = {r["line"]: r for r in recs}
    expected = {i: why for i, (_, why) in enumerate(BAD_AND_GOOD, 1) if why != "blank: skipped"}
    expected[len(BAD_AND_GOOD) + 1] = "not UTF-8 text"
    assert sorted(by_line) == sorted(expected)
    assert sorted(r["index"] for r in recs) == list(range(len(expected)))
    for lineno, why in expected.items():
        r = by_line[lineno]
        assert r["source"] == str(mixed)
        if why is None:
            assert r["error"] is None and len(r["outputs"][0]["token_ids"]) == 6
        else:
            assert why in r["error"], (lineno, r["error"])
            assert not any(c["token_ids"] for c in r["outputs"])
    assert by_line[2]["error"].startswith(f"{mixed} line 2: invalid JSON")
    assert "(column 37)" in by_line[2]["error"]
    assert by_line[10]["prompt"] == "h\u00e9llo {world}"

    # The good lines alone (without the bad ones around them) give the same tokens.
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(line for line, why in BAD_AND_GOOD if why is None))
    alone = _run(gen, _flags(model_cfg, "--prompts-file", str(good), "--max-tokens", "6"),
                 tmp_path / "alone.jsonl")
    assert [_tokens(r["outputs"]) for r in sorted(alone, key=lambda r: r["index"])] == \
        [_tokens(by_line[i]["outputs"]) for i in (1, 10, 12)]
    single = _run(gen, _flags(model_cfg, "--prompt", "h\u00e9llo {world}", "--max-tokens", "6"),
                  tmp_path / "single.jsonl")
    assert _tokens(single[0]["outputs"]) == _tokens(by_line[10]["outputs"])
    assert single[0]["source"] == "--prompt"


def test_the_input_format_is_given_not_guessed(gen, model_cfg, tmp_path, monkeypatch):
    lines = ['{"prompt": "x"}', "plain text", "  {not json either"]
    txt = tmp_path / "p.txt"
    txt.write_text("\n".join(lines) + "\n")
    recs = _by_index(_run(gen, _flags(model_cfg, "--prompts-file", str(txt), "--max-tokens", "2"),
                          tmp_path / "a.jsonl"))
    assert [recs[i]["prompt"] for i in range(3)] == lines  # verbatim, braces and all
    assert all(r["error"] is None and r["outputs"] for r in recs.values())
    assert [recs[i]["line"] for i in range(3)] == [1, 2, 3]

    # --stdin is text unless told jsonl; --input-format jsonl reads a .txt file as JSONL.
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(txt.read_bytes())))
    stdin = _by_index(_run(gen, _flags(model_cfg, "--stdin", "--max-tokens", "2"),
                           tmp_path / "b.jsonl"))
    assert [(r["source"], r["prompt"]) for r in stdin.values()] == [("<stdin>", p) for p in lines]
    as_jsonl = _by_index(_run(gen, _flags(model_cfg, "--prompts-file", str(txt), "--max-tokens",
                                          "2", "--input-format", "jsonl"), tmp_path / "c.jsonl"))
    assert as_jsonl[0]["prompt"] == "x" and as_jsonl[0]["error"] is None
    assert "line 2: invalid JSON" in as_jsonl[1]["error"]
    assert "line 3: invalid JSON" in as_jsonl[2]["error"]


def test_ctrl_c_keeps_the_finished_results(gen, model_cfg, tmp_path, monkeypatch, capsys):
    # 40-token prompts: one prefill per step (64 tokens a step), and with one
    # output token each request ends in its prefill, so they finish apart.
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt_token_ids": [3 + i] * 40}) for i in range(4)))
    argv = _flags(model_cfg, "--prompts-file", str(prompts), "--max-tokens", "1")
    gen.main(argv + ["--output", str(tmp_path / "warm.jsonl")])  # builds the engine
    eng = gen.engines["llm"].engine
    real_step, finished = eng.step, []

    def step():
        if finished:
            raise KeyboardInterrupt
        outs = real_step()
        finished.extend(outs)
        return outs
    monkeypatch.setattr(eng, "step", step)
    out = tmp_path / "out.jsonl"
    with pytest.raises(SystemExit) as e:
        gen.main(argv + ["--output", str(out)])
    assert e.value.code == 130
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert 1 <= len(recs) < 4 and len(recs) == len(finished)
    assert all(r["error"] is None and len(r["outputs"][0]["token_ids"]) == 1 for r in recs)
    assert f"interrupted: {len(recs)} of 4 results written to {out}" in capsys.readouterr().err
    assert not eng.has_unfinished_requests()  # the rest were aborted


def test_chat_templates_each_prompt(gen, model_cfg, tmp_path):
    prompts = ["Name a prime.", "Say hi."]
    chat = _by_index(_run(gen, _flags(model_cfg, "--chat", "--prompt", prompts[0], "--prompt",
                                      prompts[1], "--max-tokens", "4"), tmp_path / "chat.jsonl"))
    templated = [f"<|user|>{p}<|end|><|assistant|>" for p in prompts]
    assert [chat[i]["prompt"] for i in range(2)] == templated
    plain = _by_index(_run(gen, _flags(model_cfg, "--prompt", templated[0], "--prompt",
                                       templated[1], "--max-tokens", "4"), tmp_path / "plain.jsonl"))
    assert [_tokens(chat[i]["outputs"]) for i in range(2)] == \
        [_tokens(plain[i]["outputs"]) for i in range(2)]
