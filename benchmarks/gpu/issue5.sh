#!/usr/bin/env bash
# Engine checks and the sharing experiments in one H100 call (<10 min):
#   bash benchmarks/gpu/issue5.sh            (results under $OUT)
# 1. bench_sharing.py (llama-1.1b shape; the 2 GiB pool of issue6.sh, of
#    which 0.25 GiB is handed out so memory bounds the batch).
# 2. bench_generate.py: Pallas vs reference logits, async vs sync scheduling
#    side by side, swap round trip and a swap-mode run (SmolLM2 shape).
# 3. scripts/generate.py itself on 300 random prompts of SmolLM2's shape.
set -uo pipefail
OUT=${OUT:-/tmp/jpaged-out}
mkdir -p "$OUT"
export PYTHONPATH=. JPAGED_XLA_CACHE=${JPAGED_XLA_CACHE:-/tmp/jpaged-xla}
nvidia-smi -L
date
timeout 230 python3 scripts/bench_sharing.py --model llama-1.1b --kv-cache-gib 2 \
    --usable-kv-gib 0.25 --num-requests 150 --num-prefix-requests 300 --no-progress \
    --out "$OUT/sharing.json" 2>&1 | tail -20 || echo "FAILED bench_sharing"
date
timeout 200 python3 scripts/bench_generate.py --num-prompts 512 --max-tokens 128 \
    --out "$OUT/generate.json" > "$OUT/generate.log" 2>&1 || echo "FAILED bench_generate"
tail -5 "$OUT/generate.log"
date
timeout 140 python3 scripts/generate.py --random-weights --model smollm2-135m-shape \
    --num-random-prompts 300 --random-prompt-len 128 --max-tokens 128 --ignore-eos \
    --max-model-len 1024 --no-progress --output "$OUT/generate-script.jsonl" \
    2> "$OUT/generate-script.log" || echo "FAILED generate.py"
tail -3 "$OUT/generate-script.log"
date
