#!/usr/bin/env bash
# GPU steps of issue 16 (one H200), any subset in one device call:
#   JPAGED_COMMIT=<hash> BUDGET=250 bash benchmarks/gpu/issue16.sh sweep
# Steps:
#   sweep   bench_kernels.py's prefill sweep alone (no checks, no decode shapes): 3 batches
#           x head_dim 128/64 x GQA 4/8/1 (32 query heads), the Triton and Mosaic GPU
#           ragged kernels and cuDNN's dense attention at default settings, the bf16
#           matmul rate of the same run; no new shape starts after 200 s
set -uo pipefail
RUN_TAIL=${RUN_TAIL:-30}
. "$(dirname "$0")/run_step.sh"
nvidia-smi -L
for s in "$@"; do
    case $s in
    sweep) run sweep 240 python3 scripts/bench_kernels.py --commit "${JPAGED_COMMIT:-unknown}" \
        --no-check --shapes none --no-ragged --reps 7 --time-limit 200 \
        --out "$OUT/kernels-prefill.json" ;;
    *) echo "unknown step $s" ;;
    esac
done
echo "== done $(date +%T)"
