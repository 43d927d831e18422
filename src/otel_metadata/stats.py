"""Counters that tell what happened to every record, readable with `processor.stats()`."""

from __future__ import annotations

import logging
import threading
from collections import Counter

_logger = logging.getLogger("otel_metadata")

# How many distinct keys we remember having warned about, so a flood of odd keys cannot grow memory.
_MAX_WARNED_KEYS = 1000


class Stats:
    """Thread-safe named counters, plus a once-per-key warning helper.

    Names in use: ``queued``, ``delivered``, ``posts``, ``retried``, ``dropped.<reason>``,
    ``rejected.<status>``, ``truncated_values``, ``dropped_keys``, ``ignored_request_ids``,
    ``followups``, ``traces_evicted``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._warned: set[tuple[str, str]] = set()

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def first(self, kind: str, key: str) -> bool:
        """True the first time (kind, key) is seen: for logging once per key, not per span."""
        with self._lock:
            if (kind, key) in self._warned or len(self._warned) >= _MAX_WARNED_KEYS:
                return False
            self._warned.add((kind, key))
            return True

    def warn_once(self, kind: str, key: str, message: str, *args: object) -> None:
        """Log `message` the first time (kind, key) is seen."""
        if self.first(kind, key):
            _logger.warning(message, *args)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def reset_after_fork(self) -> None:
        """A forked child starts its own counts: the parent's records are the parent's."""
        self._lock = threading.Lock()
        self._counts = Counter()
