#!/usr/bin/env bash
# Where a decode step's host time goes on the GPU host, in one device call:
#   JPAGED_COMMIT=<hash> bash benchmarks/gpu/dispatch.sh
# scripts/bench_dispatch.py on the 1.1B and 13B Llama shapes with XLA's
# command buffers (CUDA graphs) at their default and off, then
# scripts/bench_host.py (the engine's Python per step, tiny model).
set -uo pipefail
OUT=${OUT:-/tmp/jpaged-out}
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1 JPAGED_XLA_CACHE=${JPAGED_XLA_CACHE:-/tmp/jpaged-xla}
J="$OUT/dispatch.json"
run() {  # limit, command...
    local limit=$1; shift
    echo "== $* ($(date +%T))"
    timeout "$limit" "$@" 2>&1 | grep -v -e cuda_timer -e "^\s*$" | tail -4 || echo "FAILED (rc $?)"
}
nvidia-smi -L
NOGRAPH=--xla_gpu_enable_command_buffer=
run 120 python3 scripts/bench_dispatch.py --model llama-1.1b --num-seqs 256 --label 1.1b --out "$J"
XLA_FLAGS=$NOGRAPH run 120 python3 scripts/bench_dispatch.py --model llama-1.1b --num-seqs 256 \
    --label 1.1b-no-graphs --out "$J"
run 150 python3 scripts/bench_dispatch.py --model llama-13b --num-seqs 128 --label 13b --out "$J"
XLA_FLAGS=$NOGRAPH run 150 python3 scripts/bench_dispatch.py --model llama-13b --num-seqs 128 \
    --label 13b-no-graphs --out "$J"
run 120 python3 scripts/bench_host.py --num-seqs 256 --max-tokens 64 --top 25
echo "== done $(date +%T)"
