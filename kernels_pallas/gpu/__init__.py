"""GPU Pallas kernels, one kernel per file.

Same signatures as the facade in ``kernels_pallas/__init__.py`` plus
``interpret`` and kernel-specific tuning keywords. The Triton backend runs
every kernel; prefill / mixed attention has a second, Mosaic GPU kernel for
Hopper (ragged_paged_attention_mgpu.py: wgmma and TMA page copies), which
``ragged_paged_attention`` picks on an sm_90 device for the shapes it takes
(bf16/f16, head_dim 64 or 128, GQA group <= 8, block_size a multiple of 8
dividing 64). Measured on an H200 (benchmarks/results/mgpu-bench-NVIDIA_H200.json):
1.1-1.8x the Triton kernel at the prefill shapes of scripts/check_mgpu.py.
The Triton kernel stays the CPU-testable twin (interpret mode) and the
fallback everywhere else.
"""
import jax

from kernels_pallas.gpu import ragged_paged_attention_mgpu as _mgpu
from kernels_pallas.gpu import ragged_paged_attention as _triton_ragged
from kernels_pallas.gpu.copy_blocks import copy_blocks
from kernels_pallas.gpu.paged_attention import paged_attention
from kernels_pallas.gpu.write_kv import write_kv

RAGGED_IMPLS = ("auto", "mosaic", "triton")


def _on_hopper() -> bool:
    device = jax.devices()[0]
    return device.platform == "gpu" and getattr(device, "compute_capability", "") == "9.0"


def ragged_impl(q, kv_cache, *, interpret=False, impl="auto", tuning=None) -> str:
    """Which prefill kernel runs: "mosaic" on Hopper for the shapes it takes
    (and never in interpret mode or with Triton launch settings given), else
    "triton". ``impl`` "mosaic" or "triton" forces one."""
    if impl not in RAGGED_IMPLS:
        raise ValueError(f"impl must be one of {RAGGED_IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    if interpret or tuning or not _on_hopper():
        return "triton"
    return "mosaic" if _mgpu.supports(q, kv_cache) else "triton"


def ragged_paged_attention(q, kv_cache, block_tables, context_lens, query_start_loc, *,
                           scale, interpret=False, impl="auto", **tuning):
    """Prefill / mixed paged attention (contract: the facade); ``impl``
    and the kernel picked: ragged_impl. ``tuning``: the picked kernel's
    launch settings."""
    if ragged_impl(q, kv_cache, interpret=interpret, impl=impl, tuning=tuning) == "mosaic":
        fn = _mgpu.ragged_paged_attention
    else:
        fn = _triton_ragged.ragged_paged_attention
    return fn(q, kv_cache, block_tables, context_lens, query_start_loc, scale=scale,
              interpret=interpret, **tuning)


__all__ = ["RAGGED_IMPLS", "copy_blocks", "paged_attention", "ragged_impl",
           "ragged_paged_attention", "write_kv"]
