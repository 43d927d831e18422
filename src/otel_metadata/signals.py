"""Flush on SIGTERM, then hand the signal on (SPEC §7).

A process stopped by SIGTERM runs no interpreter exit hooks unless something turns the signal
into an exit: uvicorn re-raises SIGTERM after its graceful shutdown, and a bare process simply
dies. Either way the records still waiting in memory would be lost. `flush_on_sigterm` installs
a handler that flushes within a bound, then calls whatever handler was there before it (or, for
the default action, restores it and raises the signal again, so the process ends as it would
have). Servers that install their own handler later (uvicorn, gunicorn workers) replace ours
while they run and put it back when they are done; theirs runs first then.

Beware: a signal handler runs on the main thread between two bytecodes, possibly while that
thread holds one of our locks. So the flush runs on a thread of its own, which the handler waits
for at most `timeout_s`: never a deadlock, never longer than the bound.
"""

from __future__ import annotations

import logging
import signal
import threading
import weakref
from collections.abc import Callable
from types import FrameType
from typing import Any

_logger = logging.getLogger("otel_metadata")

Handler = Callable[[int, FrameType | None], Any] | int | None


def flush_on_sigterm(flush: Callable[[float], object],
                     timeout_s: float) -> Callable[[], None] | None:
    """Install the handler for `flush` (a bound method, held weakly); returns what removes it
    again (at shutdown), or None where none can be installed: not on the main thread, or no
    SIGTERM on this platform."""
    sigterm = getattr(signal, "SIGTERM", None)
    if sigterm is None or threading.current_thread() is not threading.main_thread():
        return None
    ref = weakref.WeakMethod(flush)
    previous: Handler = signal.getsignal(sigterm)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        method = ref()
        if method is not None:
            # The flush gets most of the bound; the rest is for saying what it could not send.
            worker = threading.Thread(target=_flush_quietly, args=(method, timeout_s * 0.9),
                                      name="otel-metadata-sigterm", daemon=True)
            worker.start()
            worker.join(timeout_s)
        _hand_on(previous, signum, frame)

    try:
        signal.signal(sigterm, on_sigterm)
    except (ValueError, OSError):  # an embedded interpreter that owns its signals
        return None

    def uninstall() -> None:
        """Put the previous handler back, unless another was installed over ours since."""
        try:
            if signal.getsignal(sigterm) is on_sigterm:
                signal.signal(sigterm, previous)
        except (ValueError, OSError):  # not on the main thread: leave it (it only chains)
            pass

    return uninstall


def _flush_quietly(flush: Callable[[float], object], timeout_s: float) -> None:
    try:
        flush(timeout_s)
    except Exception:
        _logger.exception("otel-metadata: flush on SIGTERM failed")


def _hand_on(previous: Handler, signum: int, frame: FrameType | None) -> None:
    """What would have happened to the signal without us."""
    if callable(previous):
        previous(signum, frame)
    elif previous != signal.SIG_IGN:  # the default action (or a handler not set from Python)
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)
