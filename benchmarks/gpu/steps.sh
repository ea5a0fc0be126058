#!/usr/bin/env bash
# GPU steps of issues 5 and 6, any subset in one device call (<10 min):
#   JPAGED_COMMIT=<hash> bash benchmarks/gpu/steps.sh throughput generate
# (<hash> written out here: the GPU machine's copied .git can be stale, so
# $(git rev-parse HEAD) run there names the wrong commit)
# Steps: throughput, latency, sharing (the paper's evaluation: llama-1.1b
# shape, random bf16 weights, a 2 GiB KV pool; they share compiled steps
# through the XLA cache), generate (scripts/generate.py itself on 300
# random prompts of SmolLM2's shape), generate-sync (the same with
# --no-async-scheduling, for the side-by-side ratio).
# SYSTEMS=jpaged,orca-max,... limits the throughput step's systems.
# BUDGET=<seconds> caps the whole call: a step gets at most what is left.
# Each bench script writes its JSON after every run and prints a flushed
# line per run, so a step stopped by its time limit keeps what finished.
set -uo pipefail
OUT=${OUT:-/tmp/jpaged-out}
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1 JPAGED_XLA_CACHE=${JPAGED_XLA_CACHE:-/tmp/jpaged-xla}
W=benchmarks/workloads/sharegpt-1000.json
COMMON="--model llama-1.1b --kv-cache-gib 2 --no-progress"
GEN="--random-weights --model smollm2-135m-shape --num-random-prompts 300 --random-prompt-len 128
     --max-tokens 128 --ignore-eos --max-model-len 1024 --no-progress"
START=$SECONDS
. "$(dirname "$0")/run_step.sh"
nvidia-smi -L
for s in "$@"; do
    case $s in
    throughput) run throughput 300 python3 scripts/bench_throughput.py $COMMON --workload $W \
        --num-requests 300 --hf-num-requests 32 --hf-timeout 150 ${SYSTEMS:+--systems $SYSTEMS} \
        --out "$OUT/throughput.json" ;;
    latency) run latency 230 python3 scripts/bench_latency.py $COMMON --workload $W \
        --rates 2,8,16,32 --duration 6 --min-requests 20 --time-limit 140 \
        --out "$OUT/latency.json" ;;
    sharing) run sharing 240 python3 scripts/bench_sharing.py $COMMON --usable-kv-gib 0.25 \
        --num-requests 60 --num-prefix-requests 120 --out "$OUT/sharing.json" ;;
    generate) run generate 200 python3 scripts/generate.py $GEN \
        --output "$OUT/generate.jsonl" ;;
    generate-sync) run generate-sync 100 python3 scripts/generate.py $GEN --no-async-scheduling \
        --output "$OUT/generate-sync.jsonl" ;;
    *) echo "unknown step $s" ;;
    esac
done
echo "== done $(date +%T)"
