"""jpaged: PagedAttention-style LLM inference in JAX.

``from jpaged import LLM, SamplingParams``. The host core (sampling_params,
sequence, block_allocator, block_manager, scheduler, config) never imports
jax, so this package imports the engine lazily.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "SamplingParams": "jpaged.sampling_params",
    "EngineConfig": "jpaged.config",
    "LLM": "jpaged.llm",
    "LLMEngine": "jpaged.engine",
    "RequestOutput": "jpaged.outputs",
    "CompletionOutput": "jpaged.outputs",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jpaged' has no attribute {name!r}")
