#!/usr/bin/env bash
# GPU steps of issue 15 (one H200), any subset in one device call:
#   JPAGED_COMMIT=<hash> BUDGET=500 bash benchmarks/gpu/issue15.sh profile kernels step
# Steps:
#   profile         profile_step.py, 1.1B shape: 256 x 512 decode (K=4), one 2048-token prefill
#   profile-nocb    the same with XLA's command buffers off (every kernel its own trace event)
#   profile-cublas  the same, command buffers off and cuBLAS only (no Triton GEMM fusions)
#   kernels         bench_kernels.py: checks, then the head_dim 64 decode shapes with a sweep
#   step            bench_step.py: 1.1B and SmolLM2 shapes, 256 x 512, K=16, three variants
#   gemm            bench_step.py, 1.1B and SmolLM2 (256 x 512) and 13B (128 x 512), K=16,
#                   with XLA's GEMM choices side by side: its own, no split-K, cuBLAS only,
#                   and both (the compiler options of the loop's compile)
#   profile-splitk  profile-nocb with no split-K GEMMs
#   tuning          bench_step.py, the same two points (variant full) with the decode kernel's
#                   own launch settings and five others side by side (head_dim 64 item)
set -uo pipefail
RUN_TAIL=${RUN_TAIL:-40}
. "$(dirname "$0")/run_step.sh"
PROFILE="python3 scripts/profile_step.py --model llama-1.1b --num-seqs 256 --context 512 --steps 4 --prefill-seqs 1 --prefill-len 2048 --top 30"
nvidia-smi -L
for s in "$@"; do
    case $s in
    profile) run profile 150 $PROFILE --out "$OUT/profile.json" ;;
    profile-nocb) XLA_FLAGS="--xla_gpu_enable_command_buffer=" \
        run profile-nocb 150 $PROFILE --out "$OUT/profile-nocb.json" ;;
    profile-cublas) XLA_FLAGS="--xla_gpu_enable_command_buffer= --xla_gpu_enable_triton_gemm=false" \
        run profile-cublas 150 $PROFILE --out "$OUT/profile-cublas.json" ;;
    kernels) run kernels 200 python3 scripts/bench_kernels.py --commit "${JPAGED_COMMIT:-unknown}" \
        --shapes llama1b_b256_c512,smollm2_b256_c512 --sweep llama1b_b256_c512,smollm2_b256_c512 \
        --no-ragged --reps 9 --out "$OUT/kernels.json" ;;
    step) run step 200 python3 scripts/bench_step.py --point llama-1.1b:256:512:16 \
        --point smollm2-135m-shape:256:512:16 --variant full,no-attention,no-attention-no-kv-write \
        --out "$OUT/step.json" ;;
    tuning) run tuning 200 python3 scripts/bench_step.py --point llama-1.1b:256:512:16 \
        --point smollm2-135m-shape:256:512:16 --variant full --repeats 9 \
        --decode-tuning default --decode-tuning 64/4/3 --decode-tuning 64/2/2 \
        --decode-tuning 64/2/4 --decode-tuning 128/2/4 --decode-tuning 128/2/2 \
        --decode-tuning 32/2/2 --no-progress --out "$OUT/tuning.json" ;;
    gemm) run gemm 300 python3 scripts/bench_step.py --point llama-1.1b:256:512:16 \
        --point smollm2-135m-shape:256:512:16 --repeats 9 --compiler-options none \
        --compiler-options xla_gpu_experimental_force_split_k=1 \
        --compiler-options xla_gpu_enable_triton_gemm=false \
        --compiler-options xla_gpu_enable_triton_gemm=false,xla_gpu_experimental_force_split_k=1 \
        --no-progress --out "$OUT/gemm.json"
        run gemm-13b 200 python3 scripts/bench_step.py --point llama-13b:128:512:16 \
        --repeats 5 --compiler-options none \
        --compiler-options xla_gpu_experimental_force_split_k=1 \
        --compiler-options xla_gpu_enable_triton_gemm=false \
        --no-progress --out "$OUT/gemm-13b.json" ;;
    profile-splitk) XLA_FLAGS="--xla_gpu_enable_command_buffer= --xla_gpu_experimental_force_split_k=1" \
        run profile-splitk 150 $PROFILE --out "$OUT/profile-splitk.json" ;;
    *) echo "unknown step $s" ;;
    esac
done
echo "== done $(date +%T)"
