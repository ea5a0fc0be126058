import os
import tempfile

# Engines built in one test session share compiled steps through JAX's
# persistent compilation cache (a fresh directory per session, so CI starts
# cold and nothing leaks between runs).
os.environ.setdefault("JPAGED_XLA_CACHE", tempfile.mkdtemp(prefix="jpaged-xla-"))
