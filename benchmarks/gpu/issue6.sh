#!/usr/bin/env bash
# The paper's throughput and latency comparisons in one H100 call (<10 min):
#   bash benchmarks/gpu/issue6.sh            (results under $OUT)
# Both scripts build the same engine (llama-1.1b shape, random bf16 weights,
# 2 GiB KV pool), so the second loads the first's compiled steps from the
# XLA cache. Time limits keep each step bounded; a failed step doesn't stop the next.
set -uo pipefail
OUT=${OUT:-/tmp/jpaged-out}
mkdir -p "$OUT"
export PYTHONPATH=. JPAGED_XLA_CACHE=${JPAGED_XLA_CACHE:-/tmp/jpaged-xla}
W=benchmarks/workloads/sharegpt-1000.json
COMMON="--model llama-1.1b --workload $W --kv-cache-gib 2 --no-progress"
nvidia-smi -L
date
timeout 320 python3 scripts/bench_throughput.py $COMMON --num-requests 600 \
    --hf-num-requests 64 --hf-timeout 170 --out "$OUT/throughput.json" 2>&1 | tail -40 \
    || echo "FAILED bench_throughput"
date
timeout 230 python3 scripts/bench_latency.py $COMMON --time-limit 150 \
    --out "$OUT/latency.json" 2>&1 | tail -20 || echo "FAILED bench_latency"
date
