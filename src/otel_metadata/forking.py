"""One guarded after-fork hook for a whole pipeline (SPEC §7: safe after ``os.fork()``).

A forked child inherits the parent's queues and locks but none of its threads. The pipeline
registers one callback here; it runs in the child, right after the fork, through
``os.register_at_fork`` where the platform has it. Where it does not (Windows, some embedded
interpreters), `ForkGuard.check` — called on the pipeline's slow paths, never per span — notices
the changed process ID and runs the callback there instead.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable


class ForkGuard:
    """Runs `on_fork` once in each forked child. Holds it weakly: a pipeline that is gone is
    never called back."""

    def __init__(self, on_fork: Callable[[], None]) -> None:
        self._callback = weakref.WeakMethod(on_fork)
        self._pid = os.getpid()
        register = getattr(os, "register_at_fork", None)
        # Without the hook, the pipeline calls `check` where it hands work over.
        self.polling = register is None
        if register is not None:
            ref = weakref.ref(self)
            register(after_in_child=lambda: _check(ref()))

    def check(self) -> None:
        """Run the callback if this is a new process since the last check."""
        pid = os.getpid()
        if pid == self._pid:
            return
        self._pid = pid
        callback = self._callback()
        if callback is not None:
            callback()


def _check(guard: ForkGuard | None) -> None:
    if guard is not None:
        guard.check()
