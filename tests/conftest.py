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
# cycle collector, whose full passes are rare: collect once each module's
# fixtures are gone. (Autouse and module-scoped: set up first, so torn down
# after the module's own engine fixtures.)
@pytest.fixture(autouse=True, scope="module")
def _free_module_engines():
    yield
    gc.collect()


# A test module whose subprocess worker compiles for minutes may define
# start_early() (start it, once) and stop_early() (end it if still running):
# it is started once the session's tests are collected, so it runs beside the
# tests before that module's, whose fixture waits for it.
_EARLY = []


def pytest_collection_finish(session):
    if session.config.option.collectonly:
        return
    for item in session.items:
        module = getattr(item, "module", None)
        if hasattr(module, "start_early") and module not in _EARLY:
            _EARLY.append(module)
            module.start_early()


def pytest_sessionfinish(session):
    for module in _EARLY:
        module.stop_early()
