#!/usr/bin/env bash
# Issue 8: tensor parallelism on 2 GPUs, in ONE device call (nvidia-h200-x2),
# under 9 minutes of wall time from a cold start (nothing cached between calls).
#
#   bash benchmarks/gpu/issue8.sh          # repository root as cwd, $OUT set
#
# 1. probe: GPUs, how they are linked, jax devices, XLA flags accepted.
# 2. scripts/check_tp.py: greedy tokens at tp 2 vs tp 1, float32 with
#    "highest" matmul precision, for the 1.1B Llama shape and the SmolLM2
#    shape (random weights), one process -> tp-check-<device>.json.
# 3. scripts/bench_throughput.py: llama-13b shape (random bf16 weights, 26 GB),
#    jpaged only, ShareGPT sample, tp 1 then tp 2 (the tp 2 run records its
#    speedup and scaling efficiency against the tp 1 JSON).
# 4. only if time is left: check_tp again in bfloat16 (how often reduction
#    order alone flips a greedy token) -> tp-check-<device>-bf16.json.
# Every step runs under `timeout`; a failed step is reported and the next
# one still runs. Results go to benchmarks/results/ and are copied to $OUT
# after each step; each step's whole log is in $OUT/logs/.
#
# ISSUE8_CPU_TINY=1 runs the same commands with tiny stand-ins on 2 virtual
# CPU devices (checks flags and plumbing; no GPU numbers).
set -u
START=$SECONDS
BUDGET=${ISSUE8_BUDGET:-525}   # seconds of wall time the whole call may use
PY=${PYTHON:-python3}
: "${OUT:?set OUT to the folder that comes back}"
RESULTS=benchmarks/results
mkdir -p "$OUT/logs"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# NVLink multicast (NVLS) stays off: it can take a shared host's GPUs out of
# service (the machine's notes). NCCL, PyTorch and NVSHMEM each have a switch;
# XLA's own collective kernels (Triton one-/two-shot, which can use multimem)
# and NCCL symmetric buffers are turned off too, so every all-reduce goes
# through plain NCCL.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1  # a step stopped by its timeout keeps its log lines
SAFE_XLA="--xla_gpu_experimental_use_collective_kernels= --xla_gpu_experimental_enable_nccl_symmetric_buffers=false"
# Compiled steps are kept on disk for the rest of this call.
export JPAGED_XLA_CACHE=${JPAGED_XLA_CACHE:-/tmp/jpaged-xla-cache}

# ---------------------------------------------------------------- settings
# SmolLM2's 9 query heads split 2 ways since jpaged.parallel pads each
# group of query heads with zero heads (12 / 6 heads, 6 / 3 per GPU).
CHECK_MODELS=llama-1.1b,smollm2-135m-shape
CHECK_FLAGS=()
BENCH_MODEL=llama-13b
WORKLOAD=benchmarks/workloads/sharegpt-1000.json
# 500 requests of the ShareGPT sample: 43k prompt + 170k output tokens. At
# the predicted ~5-7k output tokens/s at tp 1 (a decode step at ~128
# sequences reads 26 GB of weights + ~25 GB of KV: ~13 ms on an H200, plus
# ~5 ms of host work) that is ~25-35 s, plus a tail of at most ~930 steps of
# the longest late request; well under the step's timeout with warm-up.
NUM_REQUESTS=500
# 40 GiB of KV (~51k tokens of the 13B shape, 0.78 MiB a token) next to 26 GB
# of weights on one H200; the same pool at tp 2 (20 GiB per GPU), so only
# the device count changes. max-num-seqs 128 (about what the pool holds at
# ShareGPT lengths) and max-num-batched-tokens 2048 (= max-model-len, the
# least a prompt needs) keep warm-up to 8 decode + 8 prefill buckets + the
# block copy; swap space 0 skips the swap buckets: greedy single-sequence
# requests are preempted by recompute, never swapped.
BENCH_FLAGS=(--max-num-seqs 128 --max-model-len 2048 --max-num-batched-tokens 2048
             --kv-cache-gib 40 --swap-space 0)
T_PROBE=60 T_CHECK=${ISSUE8_T_CHECK:-150} T_TP1=240 T_BF16_MIN=90
if [ "${ISSUE8_CPU_TINY:-0}" = 1 ]; then
    export JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=2"
    TINY=$(mktemp -d)
    for n in 1 2; do
        cat > "$TINY/tiny$n.json" <<EOF
{"architectures": ["LlamaForCausalLM"], "hidden_size": 48, "intermediate_size": 96,
 "num_hidden_layers": $n, "num_attention_heads": 6, "num_key_value_heads": $((n + 1)),
 "vocab_size": 320, "max_position_embeddings": 2048, "eos_token_id": 2}
EOF
    done
    RESULTS=$TINY/results  # leaves the checkout's benchmarks/results alone
    CHECK_MODELS="$TINY/tiny1.json,$TINY/tiny2.json"
    CHECK_FLAGS=(--num-prompts 4 --max-prompt-len 40 --max-tokens 8 --max-model-len 64
                 --max-num-batched-tokens 64 --max-num-seqs 4)
    BENCH_MODEL=$TINY/tiny2.json NUM_REQUESTS=3
    BENCH_FLAGS=(--max-num-seqs 4 --max-model-len 2048 --max-num-batched-tokens 2048
                 --kv-cache-gib 0.01 --swap-space 0)
fi
mkdir -p "$RESULTS"

left() { echo $((BUDGET - (SECONDS - START))); }
run_step() {  # name seconds command...: timeout, log, never stop the script
    local name=$1 limit=$2; shift 2
    [ "$limit" -gt "$(left)" ] && limit=$(left)
    if [ "$limit" -lt 20 ]; then echo "SKIPPED $name: $(left) s left"; return; fi
    echo "=== $name (timeout ${limit} s, $((SECONDS - START)) s elapsed)"
    local t0=$SECONDS
    timeout -k 10 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/logs/$name.log"
    [ $rc -eq 0 ] || echo "FAILED $name: exit $rc$([ $rc -eq 124 ] && echo ' (timed out)')"
    echo "=== $name took $((SECONDS - t0)) s"
    for f in "$CHECK" "$TP1" "$TP2" "$CHECK_BF16"; do [ -f "$f" ] && cp "$f" "$OUT/"; done
}

# ---------------------------------------------------------------- 1. probe
echo "=== probe"
command -v nvidia-smi > /dev/null && { nvidia-smi -L; nvidia-smi topo -m; } \
    || echo "no nvidia-smi"
env | grep -E '^(NCCL_|NVSHMEM_|TORCH_SYMM|JPAGED_|JAX_)' | sort
rm -f /tmp/issue8-device
PROBE='
import jax, flax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
devs = jax.devices()
print("jax", jax.__version__, "flax", flax.__version__, devs)
x = jax.device_put(np.arange(8.0 * len(devs)), NamedSharding(Mesh(np.array(devs), ("x",)), P("x")))
print("all-reduce over", len(devs), "devices:", float(jax.jit(lambda v: v.sum())(x)),
      "expected", float(np.arange(8.0 * len(devs)).sum()))
print(devs[0].device_kind.replace(" ", "_"), file=open("/tmp/issue8-device", "w"))'
XLA_FLAGS="${XLA_FLAGS:-} $SAFE_XLA" timeout -k 5 "$T_PROBE" "$PY" -c "$PROBE"
rc=$?
if [ $rc -eq 0 ]; then
    export XLA_FLAGS="${XLA_FLAGS:-} $SAFE_XLA"
elif [ $rc -eq 124 ]; then
    echo "FAILED probe: timed out after $T_PROBE s (an all-reduce that hangs?)"
else  # an XLA build without one of the flags; the NCCL_* variables still keep NVLS off
    echo "FAILED probe with XLA flags [$SAFE_XLA] (exit $rc); retrying without them"
    timeout -k 5 "$T_PROBE" "$PY" -c "$PROBE" || echo "FAILED probe"
fi
echo "XLA_FLAGS=${XLA_FLAGS:-}"
DEV=$(cat /tmp/issue8-device 2>/dev/null || echo unknown)
CHECK=$RESULTS/tp-check-$DEV.json
CHECK_BF16=$RESULTS/tp-check-$DEV-bf16.json
TP1=$RESULTS/throughput-$DEV-$(basename "$BENCH_MODEL" .json)-tp1.json
TP2=$RESULTS/throughput-$DEV-$(basename "$BENCH_MODEL" .json)-tp2.json

# ---------------------------------------------------------------- 2. tokens
run_step check_tp "$T_CHECK" "$PY" scripts/check_tp.py --model "$CHECK_MODELS" --tp 1,2 \
    --dtype float32 --matmul-precision highest "${CHECK_FLAGS[@]}" \
    --out "$CHECK"

# ---------------------------------------------------------------- 3. throughput
BENCH=("$PY" scripts/bench_throughput.py --model "$BENCH_MODEL" --systems jpaged
       --workload "$WORKLOAD" --num-requests "$NUM_REQUESTS" "${BENCH_FLAGS[@]}" --no-progress)
run_step throughput_tp1 "$T_TP1" "${BENCH[@]}" --tensor-parallel-size 1 --out "$TP1"
BASELINE=()
[ -f "$TP1" ] && BASELINE=(--scaling-baseline "$TP1")
run_step throughput_tp2 "$(left)" "${BENCH[@]}" --tensor-parallel-size 2 "${BASELINE[@]}" \
    --out "$TP2"

# ---------------------------------------------------------------- 4. one GPU (optional)
# ISSUE8_ONE_GPU=1: the 1.1B paper-evaluation throughput on GPU 0 alone,
# 1000 ShareGPT requests (more of the run at full batch than 300).
ONE=$RESULTS/throughput-$DEV-1000.json
if [ "${ISSUE8_ONE_GPU:-0}" = 1 ] && [ "$(left)" -ge 120 ]; then
    run_step throughput_1gpu "$(left)" env CUDA_VISIBLE_DEVICES=0 "$PY" scripts/bench_throughput.py \
        --model llama-1.1b --kv-cache-gib 2 --no-progress --workload "$WORKLOAD" \
        --num-requests 1000 --systems jpaged,orca-oracle,orca-max,orca-pow2,jpaged-sync \
        --out "$ONE"
    [ -f "$ONE" ] && cp "$ONE" "$OUT/"
fi

# ---------------------------------------------------------------- 5. bf16 (optional)
if [ "${ISSUE8_BF16:-1}" = 1 ] && [ "$(left)" -ge "$T_BF16_MIN" ]; then
    run_step check_tp_bf16 "$(left)" "$PY" scripts/check_tp.py --model "${CHECK_MODELS%%,*}" \
        --tp 1,2 --dtype bfloat16 --matmul-precision default "${CHECK_FLAGS[@]}" \
        --out "$CHECK_BF16"
else
    echo "SKIPPED check_tp_bf16: $(left) s left"
fi

echo "=== done in $((SECONDS - START)) s; in \$OUT:"
ls -la "$OUT" "$OUT/logs"
