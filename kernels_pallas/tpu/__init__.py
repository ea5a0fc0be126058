"""TPU Pallas (Mosaic) kernels, one per file, with the facade's signatures.

Each takes ``interpret`` (True runs it on CPU through
``pltpu.InterpretParams()``; a ``pltpu.InterpretParams`` is passed through)
plus kernel-specific tuning keywords. Not run on a TPU yet: they are checked
in interpret mode on CPU against ``kernels_pallas.reference``.
"""
from kernels_pallas.tpu.copy_blocks import copy_blocks
from kernels_pallas.tpu.paged_attention import paged_attention
from kernels_pallas.tpu.ragged_paged_attention import ragged_paged_attention
from kernels_pallas.tpu.write_kv import write_kv

__all__ = ["copy_blocks", "paged_attention", "ragged_paged_attention", "write_kv"]
