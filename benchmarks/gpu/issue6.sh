#!/usr/bin/env bash
# The paper's evaluation in one H100 call (<10 min): throughput, latency vs
# rate, sharing. All three build the same engine (llama-1.1b shape, random
# bf16 weights, 2 GiB KV pool), so the later two load the first's compiled
# steps from the XLA cache. Each script writes its JSON after every run and
# prints a flushed line per run, so a step stopped by its time limit keeps
# what finished.
#   bash benchmarks/gpu/issue6.sh            (results and logs under $OUT)
set -uo pipefail
OUT=${OUT:-/tmp/jpaged-out}
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1 JPAGED_XLA_CACHE=${JPAGED_XLA_CACHE:-/tmp/jpaged-xla}
W=benchmarks/workloads/sharegpt-1000.json
COMMON="--model llama-1.1b --kv-cache-gib 2 --no-progress"
step() {  # name, time limit, command...
    local name=$1 limit=$2; shift 2
    echo "== $name ($(date +%T), limit ${limit}s)"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1 || echo "FAILED or stopped: $name (rc $?)"
    grep -v "^\s*$" "$OUT/$name.log" | tail -25
}
nvidia-smi -L
step throughput 240 python3 scripts/bench_throughput.py $COMMON --workload $W \
    --num-requests 300 --hf-num-requests 32 --hf-timeout 80 --out "$OUT/throughput.json"
step latency 140 python3 scripts/bench_latency.py $COMMON --workload $W \
    --rates 2,8,16,32 --duration 6 --min-requests 20 --time-limit 90 --out "$OUT/latency.json"
step sharing 150 python3 scripts/bench_sharing.py $COMMON --usable-kv-gib 0.25 \
    --num-requests 60 --num-prefix-requests 120 --out "$OUT/sharing.json"
echo "== done $(date +%T)"
