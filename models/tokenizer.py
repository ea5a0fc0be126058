"""Tokenizers for converted models, built from GGUF metadata without torch.

transformers' own GGUF tokenizer loading imports torch, so the GPT-2-style
byte-level BPE stored in a GGUF file (`tokenizer.ggml.model = gpt2`) is
rebuilt here with the `tokenizers` library: vocabulary, merges, the
pre-tokenizer named by `tokenizer.ggml.pre`, special tokens and the chat
template. A converted checkpoint directory carries it as tokenizer.json
(`save_pretrained`), which `load_tokenizer` reads back.
"""

import pathlib

import tokenizers
from tokenizers import decoders, pre_tokenizers, processors
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast

from models.gguf import metadata, open_gguf

# llama.cpp's token types (gguf.TokenType): 3 = control, 4 = user-defined.
_CONTROL, _USER_DEFINED = 3, 4


def _byte_level() -> pre_tokenizers.PreTokenizer:
    # GPT-2's regex split, with no space added in front of the text.
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


# tokenizer.ggml.pre -> the pre-tokenizer llama.cpp applies for it.
_PRE_TOKENIZERS = {
    "default": _byte_level,
    "gpt2": _byte_level,
    "gpt-2": _byte_level,
    # StarCoder-style (SmolLM2): every digit is its own pre-token, then GPT-2's split.
    "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _byte_level()]),
    "starcoder": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _byte_level()]),
}


def tokenizer_from_gguf(path: str | pathlib.Path) -> PreTrainedTokenizerFast:
    """The tokenizer stored in a GGUF file's metadata.

    Args:
      path: a .gguf file whose tokenizer is a byte-level BPE (tokenizer.ggml.model = "gpt2").
    Returns:
      a transformers PreTrainedTokenizerFast with the vocabulary, merges, special
      tokens (bos/eos/unk/pad from the metadata ids) and chat template of the file.
    Raises:
      FileNotFoundError / ValueError for a missing or corrupt file, or a
      tokenizer kind or pre-tokenizer this function does not build.
    """
    reader = open_gguf(path)
    kind = metadata(reader, "tokenizer.ggml.model")
    if kind is None:
        raise ValueError(f"{path} holds no tokenizer (GGUF metadata key 'tokenizer.ggml.model' is missing)")
    if kind != "gpt2":
        raise ValueError(f"{path}: unsupported GGUF tokenizer model {kind!r}; only byte-level BPE ('gpt2') is built")
    pre = metadata(reader, "tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise ValueError(f"{path}: unsupported GGUF pre-tokenizer {pre!r}; supported: {sorted(_PRE_TOKENIZERS)}")
    tokens = metadata(reader, "tokenizer.ggml.tokens")
    merges = metadata(reader, "tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise ValueError(f"{path}: GGUF metadata lacks tokenizer.ggml.tokens or tokenizer.ggml.merges")
    token_types = metadata(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)

    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"{path}: tokenizer.ggml.tokens has duplicate entries")
    # Byte-level tokens never contain a plain space (it is mapped to 'Ġ'), so one split is exact.
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = tokenizers.Tokenizer(BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = _PRE_TOKENIZERS[pre]()
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([
        tokenizers.AddedToken(tokens[i], special=True, normalized=False)
        for i, ty in enumerate(token_types) if ty == _CONTROL
    ])
    backend.add_tokens([
        tokenizers.AddedToken(tokens[i], special=False, normalized=False)
        for i, ty in enumerate(token_types) if ty == _USER_DEFINED
    ])

    def special(key: str) -> str | None:
        token_id = metadata(reader, f"tokenizer.ggml.{key}_token_id")
        return None if token_id is None or not 0 <= token_id < len(tokens) else tokens[token_id]

    bos, eos = special("bos"), special("eos")
    add_bos = bool(metadata(reader, "tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(metadata(reader, "tokenizer.ggml.add_eos_token", False)) and eos is not None
    single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
    pair = single + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=pair,
        special_tokens=[(t, vocab[t]) for t in {bos, eos} if t is not None and (add_bos or add_eos)],
    )
    context_length = metadata(reader, f"{metadata(reader, 'general.architecture')}.context_length")
    kwargs = dict(
        tokenizer_object=backend,
        bos_token=bos, eos_token=eos, unk_token=special("unknown"), pad_token=special("padding"),
        clean_up_tokenization_spaces=False,
        add_bos_token=add_bos, add_eos_token=add_eos,
    )
    if context_length:
        kwargs["model_max_length"] = int(context_length)
    chat_template = metadata(reader, "tokenizer.chat_template")
    if chat_template:
        kwargs["chat_template"] = chat_template
    return PreTrainedTokenizerFast(**{k: v for k, v in kwargs.items() if v is not None})


def load_tokenizer(path: str | pathlib.Path) -> PreTrainedTokenizerFast:
    """A tokenizer from a .gguf file or from a directory holding tokenizer.json (save_pretrained's output)."""
    path = pathlib.Path(path)
    if path.is_file():
        return tokenizer_from_gguf(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no tokenizer at {path}: expected a .gguf file or a directory with tokenizer.json")
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path} has no tokenizer.json; save one there with tokenizer.save_pretrained({str(path)!r})")
    return PreTrainedTokenizerFast.from_pretrained(str(path))
