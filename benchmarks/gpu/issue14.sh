#!/usr/bin/env bash
# GPU steps of issues 14, 15 and 19 (one H200), any subset in one device call:
#   JPAGED_COMMIT=<hash> BUDGET=560 bash benchmarks/gpu/issue14.sh steady throughput generate
# (<hash> written out here: the GPU machine's copied .git can be stale)
# Steps:
#   steady      engine steady decode at 256 seqs x 512 vs the model alone (bench_steady.py)
#   throughput  ShareGPT-1000, 2 GiB pool: jpaged, jpaged-nooverlap, Orca-Max, + the ceiling
#               (bench_throughput.py)
#   step-parts  host time per part of a step and per kind (window, ragged) on the 2 GiB run
#               (benchmarks/gpu/time_step_parts.py)
#   generate8k  the README main job with a token budget of 8192 a step (vLLM's offline default
#               is larger than its server's)
#   throughput40  the same, 40 GiB pool, jpaged only
#   throughput-profile  the 2 GiB jpaged run under cProfile (host-profile.txt)
#   throughput-trace  the 2 GiB jpaged run under jax.profiler: device time per program and
#               kernel, busy and idle time (gaps by length) in throughput-trace.json
#   throughput-cmdbuf  the 2 GiB jpaged run with XLA's command buffers also taking while
#               loops and conditionals (the decode window's loop as one CUDA graph)
#   generate    the README main job: generate.py, SmolLM2 shape, 300 x 128 -> 128
#   step        bench_step.py: 1.1B and SmolLM2 shapes, 256 x 512, K=16, three variants
#   profile     profile_step.py on the 1.1B shape
#   sharing     bench_sharing.py (parallel n, beams, prefix caching): 300 / 600 requests in a
#               0.25 GiB pool, so memory bounds the batch (the paper's setting)
#   sharing-small  the same at 60 / 120 requests (every sequence fits at once: the runs last
#               as long as the longest request, whatever is shared; the figures before 2026-12-02 (5))
#   sharing-profile  beam width 4 alone, shared and unshared, under cProfile (beam-host.*)
#               and jax.profiler (device time per jitted function and kernel, in the JSON)
#   topk        bench_kernels.py --topk: exact_top_k against lax.top_k (vocabularies, beam candidates)
#   latency     bench_latency.py at 2-32 req/s: windows on and off (TTFT, TPOT)
#   latency-arrivals  bench_latency.py at 2-32 req/s, at least 40 requests a rate: jpaged,
#               jpaged-window1 (at 9a2128d also jpaged-idlearrivals: the rule of 2026-12-04 (2))
#   generate-nooverlap  the README main job with overlap_ragged_updates off
#   throughput-w16  the 2 GiB run with windows of up to 16 steps
#   serving     bench_serving.py over HTTP (needs the .whl wheels: starlette, uvicorn, ...)
# BUDGET=<seconds> caps the whole call: a step gets at most what is left.
set -uo pipefail
W=benchmarks/workloads/sharegpt-1000.json
COMMON="--model llama-1.1b --no-progress"
RUN_TAIL=12
. "$(dirname "$0")/run_step.sh"
nvidia-smi -L
for s in "$@"; do
    case $s in
    steady) run steady 200 python3 scripts/bench_steady.py $COMMON --num-seqs 256 --context 512 \
        --decode-tokens 448 --max-model-len 1024 --out "$OUT/steady.json" ;;
    throughput) run throughput 240 python3 scripts/bench_throughput.py $COMMON --kv-cache-gib 2 \
        --workload $W --num-requests 1000 --systems jpaged,jpaged-nooverlap,orca-max \
        --ceiling 256:512 --out "$OUT/throughput.json" ;;
    throughput-profile) run throughput-profile 200 python3 scripts/bench_throughput.py $COMMON \
        --kv-cache-gib 2 --workload $W --num-requests 1000 --systems jpaged \
        --profile-host "$OUT/host-profile.txt" --out "$OUT/throughput-profile.json" ;;
    throughput-trace) run throughput-trace 200 python3 scripts/bench_throughput.py $COMMON \
        --kv-cache-gib 2 --workload $W --num-requests 1000 --systems jpaged \
        --profile-device /tmp/jpaged-traces --out "$OUT/throughput-trace.json" ;;
    throughput-cmdbuf) XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL,WHILE" \
        JPAGED_XLA_CACHE=/tmp/jpaged-xla-cmdbuf run throughput-cmdbuf 200 \
        python3 scripts/bench_throughput.py $COMMON --kv-cache-gib 2 --workload $W \
        --num-requests 1000 --systems jpaged --ceiling 256:512 --out "$OUT/throughput-cmdbuf.json" ;;
    step-parts) run step-parts 200 python3 benchmarks/gpu/time_step_parts.py $COMMON \
        --kv-cache-gib 2 --workload $W ;;
    generate8k) run generate8k 150 python3 scripts/generate.py --random-weights \
        --model smollm2-135m-shape --num-random-prompts 300 --random-prompt-len 128 \
        --max-tokens 128 --ignore-eos --max-model-len 1024 --no-progress \
        --max-num-batched-tokens 8192 --output "$OUT/generate8k.jsonl" ;;
    throughput40) run throughput40 150 python3 scripts/bench_throughput.py $COMMON \
        --kv-cache-gib 40 --workload $W --num-requests 1000 --systems jpaged \
        --out "$OUT/throughput40.json" ;;
    generate) run generate 150 python3 scripts/generate.py --random-weights \
        --model smollm2-135m-shape --num-random-prompts 300 --random-prompt-len 128 \
        --max-tokens 128 --ignore-eos --max-model-len 1024 --no-progress \
        --output "$OUT/generate.jsonl" ;;
    step) run step 240 python3 scripts/bench_step.py --point llama-1.1b:256:512:16 \
        --point smollm2-135m-shape:256:512:16 --variant full,no-attention,no-attention-no-kv-write \
        --out "$OUT/step.json" ;;
    profile) run profile 200 python3 scripts/profile_step.py --model llama-1.1b --num-seqs 256 \
        --context 512 --steps 4 --prefill-seqs 1 --prefill-len 2048 --out "$OUT/profile.json" ;;
    sharing) run sharing 240 python3 scripts/bench_sharing.py $COMMON --kv-cache-gib 2 \
        --usable-kv-gib 0.25 --num-requests 300 --num-prefix-requests 600 \
        --out "$OUT/sharing.json" ;;
    sharing-small) run sharing-small 200 python3 scripts/bench_sharing.py $COMMON --kv-cache-gib 2 \
        --usable-kv-gib 0.25 --num-requests 60 --num-prefix-requests 120 \
        --out "$OUT/sharing-small.json" ;;
    sharing-profile) run sharing-profile 150 python3 scripts/bench_sharing.py $COMMON \
        --kv-cache-gib 2 --usable-kv-gib 0.25 --num-requests 60 --parallel '' --shots '' \
        --beams 4 --profile-host "$OUT/beam-host" --profile-device /tmp/jpaged-beam-traces \
        --out "$OUT/sharing-profile.json" ;;
    topk) run topk 120 python3 scripts/bench_kernels.py --commit "${JPAGED_COMMIT:-unknown}" \
        --no-check --quick --shapes none --no-ragged --topk --out "$OUT/kernels-topk.json" ;;
    latency) run latency 230 python3 scripts/bench_latency.py $COMMON --kv-cache-gib 2 \
        --workload $W --rates 2,8,16,32 --duration 6 --min-requests 20 --time-limit 150 \
        --systems jpaged,jpaged-window1 --out "$OUT/latency.json" ;;
    latency-arrivals) run latency-arrivals 260 python3 scripts/bench_latency.py $COMMON \
        --kv-cache-gib 2 --workload $W --rates 2,8,16,32 --duration 6 --min-requests 40 \
        --time-limit 200 --systems jpaged,jpaged-window1 \
        --out "$OUT/latency-arrivals.json" ;;
    generate-nooverlap) run generate-nooverlap 150 python3 scripts/generate.py --random-weights \
        --model smollm2-135m-shape --num-random-prompts 300 --random-prompt-len 128 \
        --max-tokens 128 --ignore-eos --max-model-len 1024 --no-progress \
        --no-overlap-ragged-updates --output "$OUT/generate-nooverlap.jsonl" ;;
    throughput-w16) run throughput-w16 150 python3 scripts/bench_throughput.py $COMMON \
        --kv-cache-gib 2 --workload $W --num-requests 1000 --systems jpaged \
        --max-decode-window 16 --out "$OUT/throughput-w16.json" ;;
    serving) run serving 200 python3 scripts/bench_serving.py --random-weights \
        --model smollm2-135m-shape --dtype bfloat16 --max-num-seqs 256 --num-requests 500 \
        --request-rates inf,16 --output "$OUT/serving.json" ;;
    *) echo "unknown step $s" ;;
    esac
done
echo "== done $(date +%T)"
