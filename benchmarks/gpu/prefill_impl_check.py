"""GPU check that the facade's Mosaic GPU prefill kernel runs inside the
models (bf16, random weights): logits of a 300-token prompt and 16 greedy
tokens through the Pallas kernels with the prefill kernel the facade picks
("auto": Mosaic GPU on Hopper) and with the Triton one forced, each against
the pure-jnp reference path with the same weights. Prints one JSON line per
model. Usage: PYTHONPATH=. python3 benchmarks/gpu/prefill_impl_check.py [MODEL...]
"""
import json
import sys

import numpy as np

import kernels_pallas.gpu as kgpu
import models


def main(names):
    for name in names or ["llama-1.1b", "smollm2-135m-shape"]:
        ids = np.random.default_rng(0).integers(0, 32000 if "llama" in name else 49152,
                                                300).tolist()
        ref = models.random_model(name, dtype="bfloat16", seed=0, attention_backend="reference",
                                  fast_init=True)
        want = ref.logits(ids)
        want_greedy = ref.generate_greedy(ids, 16, stop_at_eos=False)
        del ref
        row = dict(model=name, logit_scale=float(np.max(np.abs(want))))
        for impl in ("auto", "triton"):
            real = kgpu._on_hopper
            if impl == "triton":
                kgpu._on_hopper = lambda: False
            try:
                m = models.random_model(name, dtype="bfloat16", seed=0, fast_init=True)
                got = m.logits(ids)
                row[impl] = dict(picked=kgpu.ragged_impl(
                                     np.zeros((1, m.config.num_heads, m.config.head_dim),
                                              "bfloat16"),
                                     np.zeros((2, 1, m.config.num_kv_heads, 16,
                                               m.config.head_dim), "bfloat16")),
                                 max_abs_diff=float(np.max(np.abs(got - want))),
                                 argmax_equal=float(np.mean(got.argmax(-1) == want.argmax(-1))),
                                 greedy_16_equal=m.generate_greedy(ids, 16, stop_at_eos=False)
                                 == want_greedy)
                del m
            finally:
                kgpu._on_hopper = real
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
