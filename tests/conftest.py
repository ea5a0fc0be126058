import gc
import os
import tempfile

import pytest

# Engines built in one test session share compiled steps through JAX's
# persistent compilation cache (a fresh directory per session, so CI starts
# cold and nothing leaks between runs).
os.environ.setdefault("JPAGED_XLA_CACHE", tempfile.mkdtemp(prefix="jpaged-xla-"))

# NOTE: every engine's CPU executables take ~5,000 memory mappings (XLA's JIT
# maps each kernel apart); with vm.max_map_count 65,530 a dozen live engines
# make LLVM fail to allocate and the process crash (seen, jax 0.11.2). An
# engine is a reference cycle (jitted bound methods), freed only by the
# cycle collector: collect once the mappings pile up.
_MAX_MAPPINGS = 20_000


def _num_mappings() -> int:
    try:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)
    except OSError:  # no procfs: nothing to watch
        return 0


@pytest.fixture(autouse=True)
def _free_dead_engines():
    yield
    if _num_mappings() > _MAX_MAPPINGS:
        gc.collect()
