"""models.tokenizer: the SmolLM2 tokenizer rebuilt from GGUF metadata, against transformers.

tests/golden/smollm2/tokenizer_ids.json holds, per fixture text, the ids of
transformers' own GGUF tokenizer ("ids") and of the same tokenizer with
llama.cpp's `smollm` pre-tokenizer, which splits off every numeric character
first ("ids_llama_cpp_pre"). transformers ignores tokenizer.ggml.pre, so the
two differ on non-ASCII numerals only; ours follows llama.cpp (and SmolLM2's
original tokenizer) and must equal transformers everywhere else.
"""

import json
import pathlib
import unicodedata

import gguf
import pytest

from models.gguf import find_default_model
from models.tokenizer import load_tokenizer, tokenizer_from_gguf

GOLDEN = json.loads((pathlib.Path(__file__).resolve().parents[1] / "golden" / "smollm2" / "tokenizer_ids.json").read_text())


def _has_non_ascii_numeral(text: str) -> bool:
    return any(not c.isascii() and unicodedata.category(c).startswith("N") for c in text)


@pytest.fixture(scope="module")
def tok():
    return tokenizer_from_gguf(find_default_model("smollm2-135m"))


@pytest.fixture(scope="module")
def reloaded(tok, tmp_path_factory):
    """The tokenizer after save_pretrained -> load_tokenizer, as a converted checkpoint carries it."""
    d = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(d)
    assert (d / "tokenizer.json").is_file()
    return load_tokenizer(d)


def test_vocabulary_and_special_tokens(tok):
    backend = json.loads(tok.backend_tokenizer.to_str())
    assert len(tok) == GOLDEN["vocab_size"] == 49152
    assert len(backend["model"]["merges"]) == 48900
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert (tok.bos_token, tok.bos_token_id) == ("<|im_start|>", 1)
    assert (tok.unk_token_id, tok.pad_token_id) == (0, 2)
    assert tok("Hello")["input_ids"] == [19556]  # no BOS added
    assert len(tok.all_special_ids) >= 3
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def test_fixture_covers_the_pre_tokenizer_difference():
    differing = [e["text"] for e in GOLDEN["texts"] if e["ids"] != e["ids_llama_cpp_pre"]]
    assert differing and all(_has_non_ascii_numeral(t) for t in differing)


@pytest.mark.parametrize("i", range(len(GOLDEN["texts"])))
def test_ids_match_transformers(tok, i):
    entry = GOLDEN["texts"][i]
    ids = tok(entry["text"])["input_ids"]
    assert ids == entry["ids_llama_cpp_pre"]
    if not _has_non_ascii_numeral(entry["text"]):
        assert ids == entry["ids"]
    assert tok.decode(ids) == entry["text"]


@pytest.mark.parametrize("i", range(len(GOLDEN["chats"])))
def test_chat_template_matches_transformers(tok, reloaded, i):
    chat = GOLDEN["chats"][i]
    for t in (tok, reloaded):
        text = t.apply_chat_template(chat["messages"], tokenize=False,
                                     add_generation_prompt=chat["add_generation_prompt"])
        assert text == chat["text"]
        assert t(text)["input_ids"] == chat["ids"]


def test_save_pretrained_round_trip(tok, reloaded):
    assert len(reloaded) == len(tok)
    assert (reloaded.eos_token_id, reloaded.bos_token_id, reloaded.pad_token_id) == (2, 1, 2)
    assert reloaded.chat_template == tok.chat_template
    for entry in GOLDEN["texts"]:
        assert reloaded(entry["text"])["input_ids"] == entry["ids_llama_cpp_pre"]


def _write_tokenizer_gguf(path, model="gpt2", pre="smollm", with_tokens=True):
    w = gguf.GGUFWriter(str(path), "llama")
    if model is not None:
        w.add_tokenizer_model(model)
        w.add_tokenizer_pre(pre)
    if with_tokens:
        w.add_token_list(["a", "b", "ab"])
        w.add_token_merges(["a b"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_tiny_gguf_tokenizer(tmp_path):
    t = tokenizer_from_gguf(_write_tokenizer_gguf(tmp_path / "t.gguf"))
    assert t("abba")["input_ids"] == [2, 1, 0]
    assert t.eos_token is None and t.chat_template is None


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        tokenizer_from_gguf(tmp_path / "missing.gguf")
    with pytest.raises(ValueError, match="holds no tokenizer"):
        tokenizer_from_gguf(_write_tokenizer_gguf(tmp_path / "none.gguf", model=None, with_tokens=False))
    with pytest.raises(ValueError, match="unsupported GGUF tokenizer model 'llama'"):
        tokenizer_from_gguf(_write_tokenizer_gguf(tmp_path / "spm.gguf", model="llama"))
    with pytest.raises(ValueError, match="unsupported GGUF pre-tokenizer 'qwen2'"):
        tokenizer_from_gguf(_write_tokenizer_gguf(tmp_path / "qwen.gguf", pre="qwen2"))
    with pytest.raises(ValueError, match="lacks tokenizer.ggml.tokens"):
        tokenizer_from_gguf(_write_tokenizer_gguf(tmp_path / "empty.gguf", with_tokens=False))
    with pytest.raises(FileNotFoundError, match="no tokenizer at"):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
        load_tokenizer(tmp_path / "empty_dir")
