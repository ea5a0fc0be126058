"""Writes the tiny Hugging Face fixtures and golden logits under tests/golden/.

Each fixture is a random-initialised float32 model built from a config with
transformers' own PyTorch implementation, saved with ``save_pretrained`` into
``tests/golden/tiny_<name>/``, plus ``golden.npz`` holding:

  prompt_ids     i32[prompt_len]          the fixed prompt
  prefill_logits f32[prompt_len, vocab]   HF logits of the prompt
  decode_ids     i32[num_decode]          greedy tokens, fed back one by one
  decode_logits  f32[num_decode, vocab]   HF logits after feeding decode_ids[i]
                                          with HF's own KV cache

Needs torch, so it runs outside CI (the tests only read its output):

  /tmp/golden311/bin/python scripts/make_golden.py --out tests/golden
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil

import numpy as np
import torch
import transformers

PROMPT_LEN = 11
NUM_DECODE = 6

_LLAMA_BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96,
                   num_hidden_layers=2, max_position_embeddings=128,
                   rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
_OPT_BASE = dict(vocab_size=256, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=64,
                 pad_token_id=1, bos_token_id=2, eos_token_id=2,
                 dropout=0.0, attention_dropout=0.0)

# name -> (config class, config kwargs, how to save)
FIXTURES = {
    # GQA group of 3 with an explicit head_dim (6 * 16 != hidden 48), untied.
    "llama_gqa": ("LlamaConfig", dict(_LLAMA_BASE, hidden_size=48,
                                      num_attention_heads=6,
                                      num_key_value_heads=2, head_dim=16,
                                      rope_parameters={"rope_type": "default",
                                                       "rope_theta": 10000.0}),
                  "safetensors"),
    # SmolLM2's 9 / 3 heads, tied embeddings, linear rope scaling.
    "llama_tied_linear": ("LlamaConfig", dict(_LLAMA_BASE, hidden_size=72,
                                              num_attention_heads=9,
                                              num_key_value_heads=3,
                                              tie_word_embeddings=True,
                                              rope_parameters={"rope_type": "linear",
                                                               "factor": 2.0,
                                                               "rope_theta": 100000.0}),
                          "safetensors"),
    # Llama 3 rope scaling with a short original context so all three
    # frequency bands occur; attention and MLP biases.
    "llama3_bias": ("LlamaConfig", dict(_LLAMA_BASE, num_attention_heads=4,
                                        num_key_value_heads=4, attention_bias=True,
                                        mlp_bias=True,
                                        rope_parameters={"rope_type": "llama3",
                                                         "factor": 8.0,
                                                         "low_freq_factor": 1.0,
                                                         "high_freq_factor": 4.0,
                                                         "original_max_position_embeddings": 16,
                                                         "rope_theta": 500000.0}),
                    "safetensors"),
    # GQA group of 4, saved as sharded safetensors with an index.
    "llama_sharded": ("LlamaConfig", dict(_LLAMA_BASE, num_attention_heads=4,
                                          num_key_value_heads=1),
                      "sharded"),
    # Saved as pytorch_model.bin (the loader needs torch for it).
    "llama_bin": ("LlamaConfig", dict(_LLAMA_BASE, num_attention_heads=4,
                                      num_key_value_heads=2),
                  "bin"),
    # Qwen2: bias on q/k/v but not on o_proj.
    "qwen2": ("Qwen2Config", dict(_LLAMA_BASE, num_attention_heads=4,
                                  num_key_value_heads=2, tie_word_embeddings=False,
                                  use_sliding_window=False),
              "safetensors"),
    "opt_pre": ("OPTConfig", dict(_OPT_BASE, do_layer_norm_before=True), "safetensors"),
    # OPT-350m style: post-layer-norm and project_in / project_out.
    "opt_post_proj": ("OPTConfig", dict(_OPT_BASE, do_layer_norm_before=False,
                                        word_embed_proj_dim=32), "safetensors"),
    "opt_pre_proj": ("OPTConfig", dict(_OPT_BASE, do_layer_norm_before=True,
                                       word_embed_proj_dim=32), "safetensors"),
}


def _model_class(config_class: str):
    return {"LlamaConfig": transformers.LlamaForCausalLM,
            "Qwen2Config": transformers.Qwen2ForCausalLM,
            "OPTConfig": transformers.OPTForCausalLM}[config_class]


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """HF zero-inits biases and ones-inits norms; randomise them so they count."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(p + 0.1 * torch.randn(p.shape, generator=gen))


def _golden(model, prompt_ids: np.ndarray) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = model(input_ids=torch.tensor(prompt_ids[None]), use_cache=True)
        prefill = out.logits[0].float().numpy()
        cache = out.past_key_values
        next_id = int(prefill[-1].argmax())
        decode_ids, decode_logits = [], []
        for _ in range(NUM_DECODE):
            decode_ids.append(next_id)
            out = model(input_ids=torch.tensor([[next_id]]), past_key_values=cache,
                        use_cache=True)
            cache = out.past_key_values
            logits = out.logits[0, -1].float().numpy()
            decode_logits.append(logits)
            next_id = int(logits.argmax())
    return dict(prompt_ids=prompt_ids.astype(np.int32), prefill_logits=prefill,
                decode_ids=np.array(decode_ids, np.int32),
                decode_logits=np.stack(decode_logits))


def make_fixture(out_dir: pathlib.Path, name: str, seed: int) -> None:
    config_class, kwargs, how = FIXTURES[name]
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(**kwargs)
    config._attn_implementation = "eager"
    model = _model_class(config_class)(config).eval().float()
    _randomise(model, seed)
    path = out_dir / f"tiny_{name}"
    shutil.rmtree(path, ignore_errors=True)
    if how == "bin":
        path.mkdir(parents=True)
        config.save_pretrained(path)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        torch.save(state, path / "pytorch_model.bin")
    elif how == "sharded":
        model.save_pretrained(path, max_shard_size="100KB")
    else:
        model.save_pretrained(path)
    rng = np.random.default_rng(seed)
    prompt_ids = rng.integers(3, config.vocab_size, size=PROMPT_LEN)
    np.savez_compressed(path / "golden.npz", **_golden(model, prompt_ids))
    (path / "README").write_text(
        f"Generated by scripts/make_golden.py (seed {seed}, transformers "
        f"{transformers.__version__}, torch {torch.__version__}).\n")
    print(name, sorted(p.name for p in path.iterdir()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="tests/golden",
                        help="directory that receives the tiny_<name>/ fixtures")
    parser.add_argument("--only", nargs="*", choices=sorted(FIXTURES),
                        help="fixtures to (re)generate; all when omitted")
    parser.add_argument("--seed", type=int, default=0,
                        help="base seed; fixture i uses seed + i")
    args = parser.parse_args()
    out_dir = pathlib.Path(args.out)
    for i, name in enumerate(FIXTURES):
        if not args.only or name in args.only:
            make_fixture(out_dir, name, args.seed + i)
    print(json.dumps({"transformers": transformers.__version__,
                      "torch": torch.__version__}))


if __name__ == "__main__":
    main()
