"""InterruptGuard: Ctrl-C lands where the engine's host state is whole.

A SIGINT that arrives while the engine is half-way through updating its
scheduler, block tables or sequences is held until the guarded section
ends, then raised (KeyboardInterrupt from Python's default handler) at a
point where every record is consistent. Sections that only wait for the
device (``allowed``) take the interrupt at once; the engine then rolls the
step back. Signal handlers can be set from the main thread only: anywhere
else, and when the process ignores SIGINT or keeps the OS default, the
guard does nothing. Host core: stdlib only.
"""
from __future__ import annotations

import contextlib
import signal
import threading


class InterruptGuard:
    """``with guard:`` defers SIGINT; ``with guard.allowed():`` inside it
    lets SIGINT through again; ``guard.raise_pending()`` delivers one that
    was held, at a point the caller chooses."""

    def __init__(self):
        self._handler = None   # the SIGINT handler in force before __enter__
        self._active = False   # our holding handler is installed
        self._pending = None   # (signum, frame) of a held SIGINT

    def __enter__(self):
        self._handler = None
        if threading.current_thread() is threading.main_thread():
            handler = signal.getsignal(signal.SIGINT)
            if callable(handler):  # SIG_IGN / SIG_DFL / None: nothing to defer
                self._handler = handler
                signal.signal(signal.SIGINT, self._hold)
                self._active = True
        return self

    def __exit__(self, *exc) -> bool:
        if self._active:
            signal.signal(signal.SIGINT, self._handler)
            self._active = False
        return False

    def _hold(self, signum, frame):
        self._pending = (signum, frame)

    @contextlib.contextmanager
    def allowed(self):
        """A new SIGINT acts at once in this block (one held before it stays
        held: the work it interrupted is done by now)."""
        if not self._active:
            yield
            return
        signal.signal(signal.SIGINT, self._handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, self._hold)

    def raise_pending(self) -> None:
        """Runs the original handler for a held SIGINT, if any (the default
        handler raises KeyboardInterrupt); a SIGINT stays held across
        guarded sections until this is called."""
        pending, self._pending = self._pending, None
        if pending is not None:
            handler = self._handler or signal.getsignal(signal.SIGINT)
            if callable(handler):
                handler(*pending)
