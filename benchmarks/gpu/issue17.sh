#!/usr/bin/env bash
# GPU steps of issue 17 (chunked prefill; one H200), any subset in one device call:
#   JPAGED_COMMIT=<hash> BUDGET=560 bash benchmarks/gpu/issue17.sh latency throughput long
# Steps:
#   latency     bench_latency.py at 2-32 req/s, chunked prefill on and off (TTFT, TPOT)
#   throughput  ShareGPT-1000, 2 GiB pool, chunked prefill on and off in the same run
#   long        a 32k-token prompt beside 64 decoding sequences (a small-width random Llama
#               with max_model_len 32768, chunks of 2048): their TPOT during its prefill
#   long-off    the same with chunked prefill off (one 32k-token prefill step)
#   long-capped the long prompt's chunks capped (long_prefill_token_threshold 0, 128, 256,
#               512, one after another on one engine)
#   long-between  decode windows of 0, 8 and 16 steps between the long prompt's chunks
#               (decode_window_between_chunks, one after another on one engine)
#   throughput-between  ShareGPT-1000, 2 GiB pool: jpaged, jpaged-between16 in the same run
#   latency-between  bench_latency.py at 2-32 req/s: jpaged and jpaged-between16
#   long-profile  caps 0 and 128 with the steps beside the long prompt under cProfile
#               (long-host.txt), and the same with windows of one step (long-window1.json:
#               the decodes' TPOT alone at one token a step)
set -uo pipefail
W=benchmarks/workloads/sharegpt-1000.json
COMMON="--model llama-1.1b --no-progress"
LONG="--model benchmarks/models/llama-small-32k.json --no-progress --max-model-len 32768 --kv-cache-gib 8 --num-seqs 64 --context 512 --long-prompt 32000"
. "$(dirname "$0")/run_step.sh"
nvidia-smi -L
for s in "$@"; do
    case $s in
    latency) run latency 240 python3 scripts/bench_latency.py $COMMON --kv-cache-gib 2 \
        --workload $W --rates 2,8,16,32 --duration 6 --min-requests 20 --time-limit 150 \
        --systems jpaged,jpaged-nochunk --out "$OUT/latency.json" ;;
    throughput) run throughput 240 python3 scripts/bench_throughput.py $COMMON --kv-cache-gib 2 \
        --workload $W --num-requests 1000 --systems jpaged,jpaged-nochunk \
        --out "$OUT/throughput.json" ;;
    long) run long 200 python3 scripts/bench_long_prompt.py $LONG --out "$OUT/long.json" ;;
    long-off) run long-off 200 python3 scripts/bench_long_prompt.py $LONG \
        --no-enable-chunked-prefill --max-num-batched-tokens 32768 --out "$OUT/long-off.json" ;;
    long-capped) run long-capped 240 python3 scripts/bench_long_prompt.py $LONG \
        --base-seconds 2 --long-prefill-thresholds 0,128,256,512 --out "$OUT/long-capped.json" ;;
    long-between) run long-between 200 python3 scripts/bench_long_prompt.py $LONG \
        --base-seconds 2 --decode-windows-between-chunks 0,8,16 --out "$OUT/long-between.json" ;;
    throughput-between) run throughput-between 240 python3 scripts/bench_throughput.py $COMMON \
        --kv-cache-gib 2 --workload $W --num-requests 1000 --systems jpaged,jpaged-between16 \
        --out "$OUT/throughput-between.json" ;;
    latency-between) run latency-between 240 python3 scripts/bench_latency.py $COMMON \
        --kv-cache-gib 2 --workload $W --rates 2,8,16,32 --duration 6 --min-requests 20 \
        --time-limit 150 --systems jpaged,jpaged-between16 --out "$OUT/latency-between.json" ;;
    long-profile) run long-profile 150 python3 scripts/bench_long_prompt.py $LONG \
        --base-seconds 2 --long-prefill-thresholds 0,128 --profile-host "$OUT/long-host.txt" \
        --out "$OUT/long-profile.json"
        run long-window1 120 python3 scripts/bench_long_prompt.py $LONG --base-seconds 2 \
        --long-prefill-thresholds 128 --max-decode-window 1 --out "$OUT/long-window1.json" ;;
    *) echo "unknown step $s" ;;
    esac
done
echo "== done $(date +%T)"
