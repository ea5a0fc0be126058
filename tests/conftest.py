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


# A test module whose assertions are on slow subprocess work may define
# start_early(items) (called once the session's tests are collected, with its
# selected items): it queues that work in tests/background.py's lane, which
# runs it beside the tests before that module's; its tests wait for it.
def pytest_collection_finish(session):
    if session.config.option.collectonly:
        return
    selected = {}
    for item in session.items:
        module = getattr(item, "module", None)
        if hasattr(module, "start_early"):
            selected.setdefault(module, []).append(item)
    for module, items in selected.items():
        module.start_early(items)


def pytest_sessionfinish(session):
    import background
    background.stop()
