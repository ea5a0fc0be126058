"""EngineStats: every counter of one engine, in one place.

The engine, its scheduler and its output processor all write into the one
EngineStats the engine owns; readers (the benchmark harness, the server's
metrics, generate.py's summary) take a snapshot. Host core: stdlib only.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class EngineStats:
    """Counters since the engine was built (or last reset).

    num_steps:                jitted steps dispatched
    num_decode_steps:         decode steps they ran (a window counts its size)
    num_steps_ahead:          steps dispatched before the previous step's
                              results were on the host (async scheduling)
    num_failed_steps:         steps undone after a failure or an interrupt
    num_prefill_tokens:       prompt tokens computed (prefix-cache hits left out)
    num_cached_prompt_tokens: prompt tokens read from the prefix cache
    num_generated_tokens:     output tokens appended to sequences
    peak_blocks_used:         most device KV blocks in use after a schedule
    num_preemptions:          groups preempted (by swap or by recompute)
    num_swaps_out:            groups swapped out to the host pool
    num_swaps_in:             groups swapped back in
    host_seconds:             step time the host spent working
    device_seconds:           step time spent waiting for device results
                              (with async scheduling the device also runs
                              while the host works)
    dispatch_seconds:         the part of host_seconds spent dispatching
                              (input packing and the jitted calls)
    """

    num_steps: int = 0
    num_decode_steps: int = 0
    num_steps_ahead: int = 0
    num_failed_steps: int = 0
    num_prefill_tokens: int = 0
    num_cached_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    peak_blocks_used: int = 0
    num_preemptions: int = 0
    num_swaps_out: int = 0
    num_swaps_in: int = 0
    host_seconds: float = 0.0
    device_seconds: float = 0.0
    dispatch_seconds: float = 0.0

    def snapshot(self) -> dict:
        """The counters now, as a plain dict (a copy)."""
        return dataclasses.asdict(self)

    def reset(self) -> None:
        """Every counter back to zero."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, f.default)
