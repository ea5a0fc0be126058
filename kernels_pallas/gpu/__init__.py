"""GPU Pallas kernels (Triton backend), one kernel per file.

Same signatures as the facade in ``kernels_pallas/__init__.py`` plus
``interpret`` and kernel-specific tuning keywords.
"""
from kernels_pallas.gpu.copy_blocks import copy_blocks
from kernels_pallas.gpu.paged_attention import paged_attention
from kernels_pallas.gpu.ragged_paged_attention import ragged_paged_attention
from kernels_pallas.gpu.write_kv import write_kv

__all__ = ["copy_blocks", "paged_attention", "ragged_paged_attention", "write_kv"]
