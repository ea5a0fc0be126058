"""Converts a model once and saves it with orbax, so later starts are fast.

  python scripts/convert.py --model smollm2-135m --out converted/smollm2
  python scripts/convert.py --model path/to/hf_dir --out converted/x --dtype bfloat16

The output directory is accepted by ``models.load_model(out)`` (and by
everything that loads models by path). It is written atomically (into a
hidden sibling renamed into place) with the size and CRC-32 of every file,
which loading checks.
"""
from __future__ import annotations

import argparse
import time

import jax

import models
from models import base, checkpoint


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="what to convert: a registered name "
                             f"({', '.join(models.DEFAULT_MODELS)}), a Hugging Face "
                             "directory (config.json + safetensors or pytorch_model.bin), "
                             "or a .gguf file")
    parser.add_argument("--out", required=True,
                        help="directory to write (created; replaced atomically if it "
                             "already holds a converted checkpoint, refused if it holds "
                             "anything else)")
    parser.add_argument("--dtype", default="float32", choices=sorted(base.DTYPES),
                        help="dtype the params are stored in (default: float32)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    model = models.load_model(args.model, dtype=args.dtype, attention_backend="reference")
    loaded = time.perf_counter()
    out = checkpoint.save_converted(args.out, model.params, model.hf_config, model.tokenizer,
                                    architecture=model.architecture)
    saved = time.perf_counter()
    num_params = sum(x.size for x in jax.tree.leaves(model.params))
    print(f"{model.architecture}: {num_params / 1e6:.1f}M params in {args.dtype}, "
          f"tokenizer: {'yes' if model.tokenizer is not None else 'no'}")
    print(f"read + convert {loaded - start:.2f} s, save {saved - loaded:.2f} s -> {out}")


if __name__ == "__main__":
    main()
