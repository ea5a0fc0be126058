"""The tiny random model and engine settings several test files share (one
set of compiled shapes, so the persistent XLA cache serves them all)."""

# 6 query / 2 KV heads (GQA), head_dim 10.
LLAMA = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 2,
         "vocab_size": 320, "max_position_embeddings": 256, "eos_token_id": 2}
# Small bucket sets keep compile time down: windows 1..8, prefill 16..64; windows
# whether or not requests arrive (decode_window_idle_s 0), so tests exercise them.
ENGINE = dict(block_size=4, max_num_seqs=8, max_model_len=64, max_num_batched_tokens=64,
              swap_space=0.002, max_decode_window=8, decode_window_idle_s=0.0)
# The same engine as command-line flags of the scripts, with a 200-block pool.
ENGINE_FLAGS = ["--dtype", "float32", "--block-size", "4", "--max-num-seqs", "8",
                "--max-model-len", "64", "--max-num-batched-tokens", "64",
                "--num-gpu-blocks", "200", "--swap-space", "0.002", "--max-decode-window", "8",
                "--no-progress"]

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def tiny_tokenizer():
    """Byte-level, no merges: 256 byte tokens, then <|end|> (id 256, EOS)
    and special tokens <|s257|> .. <|s319|>, so every id of LLAMA's 320 decodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tk = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|end|>",
                                  chat_template=CHAT_TEMPLATE)
    tok.add_special_tokens({"additional_special_tokens":
                            [f"<|s{i}|>" for i in range(257, LLAMA["vocab_size"])]})
    assert len(tok) == LLAMA["vocab_size"]
    return tok


def lazy_llm(model, **config):
    """LLM(model, **config) whose engine compiles each step on first use
    (LLMEngine(warm_up=False)) instead of every bucket, window and sampler
    mode at warm-up: for a model, or an EOS set (a constant of the decode
    step), that no other test compiles, where a warm-up would compile ~28
    steps for the few a test runs."""
    import functools
    from unittest import mock

    import jpaged.llm
    from jpaged import LLM
    from jpaged.engine import LLMEngine
    with mock.patch.object(jpaged.llm, "LLMEngine", functools.partial(LLMEngine, warm_up=False)):
        return LLM(model, use_tqdm_warmup=False, **config)
