"""Counters that tell what happened to every record, readable with `processor.stats()`."""

from __future__ import annotations

import logging
import threading
from collections import Counter

_logger = logging.getLogger("otel_metadata")

# Always present in a snapshot (zero until something happens), so a dashboard or an alert can
# read them without guessing. Every record that is not delivered ends in one `dropped.<reason>`.
STANDARD_COUNTERS: tuple[str, ...] = (
    "queued",                     # records handed to the queue (updates of one ID coalesce)
    "posts",                      # HTTP POSTs attempted, retries included
    "delivered",                  # POSTs answered 2xx
    "retried",                    # retries after 429, 5xx, a timeout or a connection error
    "dropped.queue_full",         # refused: the queue held max_queue_size request IDs
    "dropped.retries_exhausted",  # still failing when the export timeout ran out
    "dropped.rejected",           # answered 400/401/403/404/422: not retried
    "dropped.unauthorized",       # not sent: the key was rejected earlier (401)
    "dropped.shutdown",           # still queued, or arriving, after shutdown()
    "dropped.backlog",            # a span with metadata, ended while the worker was far behind
    "dropped.error",              # an unexpected error in the sender (a bug; logged)
    "truncated_values",           # values cut to max_value_length
    "dropped_keys",               # metadata keys longer than 1024 characters
    "ignored_request_ids",        # request IDs of a type PromptLayer cannot take
)

# How many distinct keys we remember having warned about, so a flood of odd keys cannot grow memory.
_MAX_WARNED_KEYS = 1000


class Stats:
    """Thread-safe named counters, plus a once-per-key warning helper.

    Names in use: `STANDARD_COUNTERS`, plus ``rejected.<status>`` (which HTTP status a
    ``dropped.rejected`` record got), ``dropped_values``, ``followups``, ``traces_evicted``,
    ``errors``.
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
        """Every counter so far; the standard ones are there even at zero."""
        counts = dict.fromkeys(STANDARD_COUNTERS, 0)
        with self._lock:
            counts.update(self._counts)
        return counts

    def reset_after_fork(self) -> None:
        """A forked child starts its own counts: the parent's records are the parent's."""
        self._lock = threading.Lock()
        self._counts = Counter()
