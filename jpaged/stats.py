"""EngineStats: every counter of one engine, in one place.

The engine, its scheduler, its output processor and its model runner (the
compile counters) all write into the one EngineStats the engine owns;
readers (the benchmark harness, the server's metrics, generate.py's
summary) take a snapshot. Host core: stdlib only.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar


@dataclasses.dataclass
class EngineStats:
    """Counters since the engine was built (or last reset, except the
    compile counters: those of KEPT_BY_RESET count since it was built).

    num_steps:                jitted steps dispatched
    num_decode_steps:         decode steps they ran (a window counts its size)
    num_steps_ahead:          steps dispatched before the previous step's
                              results were on the host (async scheduling)
    num_steps_two_ahead:      steps dispatched while two earlier steps still
                              awaited their update (a ragged step left the
                              one before it in flight: overlap_ragged_updates)
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

    The compile counters, written by the model runner; ``reset`` keeps them
    (a reset engine keeps its runner and the programs it compiled):
    num_compiles:             programs traced since the runner was built
                              (each jit entry, compiled or read from the
                              persistent compilation cache)
    compiles_at_warmup:       num_compiles when the warm-up ended (0 without one)
    warmup_seconds:           the warm-up's wall time (0 without one)
    compiles_after_warmup:    (derived) num_compiles - compiles_at_warmup: 0
                              when every step shape was compiled at warm-up
    """

    KEPT_BY_RESET: ClassVar[tuple[str, ...]] = (
        "num_compiles", "compiles_at_warmup", "warmup_seconds")

    num_steps: int = 0
    num_decode_steps: int = 0
    num_steps_ahead: int = 0
    num_steps_two_ahead: int = 0
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
    num_compiles: int = 0
    compiles_at_warmup: int = 0
    warmup_seconds: float = 0.0

    @property
    def compiles_after_warmup(self) -> int:
        return self.num_compiles - self.compiles_at_warmup

    def snapshot(self) -> dict:
        """The counters now, as a plain dict (a copy; compiles_after_warmup
        included)."""
        return dict(dataclasses.asdict(self), compiles_after_warmup=self.compiles_after_warmup)

    def reset(self) -> None:
        """Every counter back to zero, except the compile counters
        (KEPT_BY_RESET)."""
        for f in dataclasses.fields(self):
            if f.name not in self.KEPT_BY_RESET:
                setattr(self, f.name, f.default)
