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
    "dropped.backlog",            # a request lost: its span or link came while the worker was
                                  # far behind (dropped_spans.backlog: other spans with metadata)
    "dropped.error",              # an unexpected error in the sender (a bug; logged)
    "truncated_values",           # values cut to max_value_length
    "dropped_keys",               # metadata keys longer than 1024 characters
    "ignored_request_ids",        # request IDs of a type PromptLayer cannot take, or linked late
    "errors",                     # spans a source could not read (a bug or a hostile object)
)

# How many distinct keys of one kind we remember having warned about, so a flood of odd keys
# cannot grow memory. Each kind has its own budget, so truncated keys never crowd out a 401.
_MAX_WARNED_KEYS = 1000
# Kinds whose keys are few and fixed (an HTTP status, a drop reason): warnings SPEC §7 requires.
# They are never refused for a full budget.
_UNBOUNDED_KINDS = frozenset({"reject", "drop"})


class Stats:
    """Thread-safe named counters, plus a once-per-key warning helper.

    Names in use: `STANDARD_COUNTERS`, plus ``rejected.<status>`` (which HTTP status a
    ``dropped.rejected`` record got), ``dropped_values``, ``followups``, ``traces_evicted``,
    ``errors``, ``resent`` (POSTs the transport sent again at once, on a new connection, the
    kept-alive one having been closed by the server before it answered).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._warned: dict[str, set[str]] = {}
        self._losses = 0  # dropped.* and errors so far: a flush reports any since the last one

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n
            if name.startswith(("dropped.", "dropped_spans.")) or name == "errors":
                self._losses += n

    @property
    def losses(self) -> int:
        """How many records were lost (any ``dropped.*``) or spans failed (``errors``) so far."""
        return self._losses

    def first(self, kind: str, key: str) -> bool:
        """True the first time (kind, key) is seen: for logging once per key, not per span."""
        with self._lock:
            seen = self._warned.setdefault(kind, set())
            if key in seen or (len(seen) >= _MAX_WARNED_KEYS and kind not in _UNBOUNDED_KINDS):
                return False
            seen.add(key)
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
        self._losses = 0
