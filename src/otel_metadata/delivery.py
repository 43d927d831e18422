"""Delivery: sender threads that drain the record queue over HTTP (SPEC §7).

Like the SDK's batch processor: a bounded queue, worker threads, flush and shutdown with
timeouts, and a fresh start after `os.fork()`. Unlike it: up to `max_concurrency` POSTs in
flight (there is no bulk endpoint), retries with backoff, and `force_flush` honours its timeout.

Plain daemon threads, started up front, not a `concurrent.futures` pool: a pool refuses work
once the interpreter is shutting down, which is exactly when the provider's exit hook flushes,
and Python 3.12+ refuses to start threads then.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import traceback
from collections.abc import Callable

from .config import Settings
from .mapping import RequestId
from .queue import Entry, RecordStore
from .retry import RetryPolicy
from .stats import Stats
from .transport import Outcome, Transport

_logger = logging.getLogger("otel_metadata")

_PERMANENT_HINTS = {
    400: "the API rejected the request as malformed",
    403: "the API key may not track metadata",
    404: "no such endpoint: check PROMPTLAYER_BASE_URL",
    422: "the API rejected the metadata (validation)",
}


class Delivery:
    """Posts the records of a store with bounded concurrency, retrying until the export timeout.

    The store, the transport and the retry policy are handed in: a durable spool stands where
    the in-memory queue does, and tests give a transport of their own.
    """

    def __init__(
        self,
        store: RecordStore,
        transport: Transport,
        settings: Settings,
        stats: Stats,
        retry: RetryPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        # Told of every record given up on, so the lineage join counts its keys as unsent.
        self.on_drop: Callable[[RequestId, dict[str, str]], None] | None = None
        self._stats = stats
        self._retry = retry or RetryPolicy()
        self._clock = clock
        self._key_rejected = False
        self._shutdown = False
        self._start(store, transport)

    def _start(self, store: RecordStore, transport: Transport) -> None:
        self._queue = store
        self._transport = transport
        self._wake = threading.Event()  # set to cut backoff sleeps short at shutdown
        self._threads = [
            threading.Thread(target=self._run, name=f"otel-metadata-sender-{i}", daemon=True)
            for i in range(self._settings.max_concurrency)
        ]
        for thread in self._threads:
            thread.start()

    def after_fork(self, store: RecordStore, transport: Transport) -> None:
        """A forked child: the parent delivers what it queued; this one starts afresh."""
        if not self._shutdown:
            self._start(store, transport)

    def __repr__(self) -> str:
        return f"Delivery(endpoint={self._settings.endpoint!r})"

    def __len__(self) -> int:
        """Records queued or in flight."""
        return len(self._queue)

    # -- the app's side: never blocks on the network --

    def submit(self, request_id: RequestId, metadata: dict[str, str]) -> bool:
        """Queue a record: True if queued; otherwise count why (and warn once for overflow)."""
        if self._key_rejected:
            self._stats.add("dropped.unauthorized")
            self._queue.put_failed()
        elif self._queue.put(request_id, metadata):
            self._stats.add("queued")
            return True
        elif self._shutdown:
            self._stats.add("dropped.shutdown")
        else:
            self._stats.add("dropped.queue_full")
            self._stats.warn_once("drop", "queue_full", "otel-metadata: queue full (%d request "
                                  "IDs); dropping new metadata, and counting further drops "
                                  "without logging. Raise OTEL_BSP_MAX_QUEUE_SIZE?",
                                  self._settings.max_queue_size)
        return False

    def force_flush(self, timeout_s: float) -> bool:
        """True when everything submitted before the call was delivered within `timeout_s`."""
        return self._queue.flush(self._clock() + timeout_s)

    def shutdown(self, timeout_s: float) -> None:
        """Flush for at most `timeout_s`, then stop: what is left, queued or still in flight,
        is counted as ``dropped.shutdown`` (an in-flight POST may land all the same)."""
        if self._shutdown:
            return
        self.force_flush(timeout_s)
        self._shutdown = True
        left = self._queue.close()
        self._wake.set()  # senders in a backoff sleep give up now
        if left:
            self._stats.add("dropped.shutdown", len(left))
        self._transport.close()

    # -- sender threads --

    def _run(self) -> None:
        queue = self._queue
        while True:
            entry = queue.take()
            if entry is None:
                return
            try:
                fate = self._deliver(entry)
            except Exception as exc:  # a bug here must not kill the sender and stall delivery
                # Formatted and scrubbed by hand: a traceback's messages could quote a header.
                _logger.error("otel-metadata: unexpected error delivering a record:\n%s",
                              self._transport.redact("".join(traceback.format_exception(exc))))
                fate = "dropped.error"
            if fate != "delivered" and self.on_drop is not None:
                # Before `ack`, so a flush that sees the failure also sees its keys unsent.
                self.on_drop(entry.request_id, entry.metadata)
            queue.ack(entry, fate == "delivered", functools.partial(self._stats.add, fate))

    def _deliver(self, entry: Entry) -> str:
        """POST `entry` until a 2xx, a refusal, shutdown, or the export timeout runs out.

        Returns its fate, the counter to add: ``delivered`` or ``dropped.<reason>``.
        """
        deadline = self._clock() + self._settings.export_timeout_s
        tries = 0
        while True:
            if self._key_rejected:
                return "dropped.unauthorized"
            timeout = min(self._settings.request_timeout_s, deadline - self._clock())
            outcome = self._transport.post(entry.request_id, entry.metadata, timeout)
            tries += 1
            self._stats.add("posts")
            if outcome.ok:
                return "delivered"
            if not self._retry.is_retryable(outcome.status):
                self._reject(outcome)
                return "dropped.rejected"
            wait = self._retry.backoff(tries - 1, outcome.retry_after)
            # Sleep only when a retry could still start before the deadline; shutdown wakes us.
            if not self._shutdown and self._clock() + wait < deadline:
                _logger.debug("otel-metadata: POST for request %r failed (%s); next try in "
                              "%.3f s", entry.request_id, _describe(outcome), wait)
                self._wake.wait(wait)
                if not self._shutdown and self._clock() < deadline:
                    self._stats.add("retried")
                    continue
            self._stats.warn_once("drop", "exhausted", "otel-metadata: giving up on request %r "
                                  "after %d tries (last: %s); further such drops are only "
                                  "counted", entry.request_id, tries, _describe(outcome))
            return "dropped.retries_exhausted"

    def _reject(self, outcome: Outcome) -> None:
        """A permanent refusal: count it, and log one line per kind (never the key)."""
        status = outcome.status
        self._stats.add(f"rejected.{status}")
        if status == 401:
            self._key_rejected = True
            self._stats.warn_once("reject", "401", "otel-metadata: PromptLayer rejected the API "
                                  "key from %s (HTTP 401); this process sends no more metadata "
                                  "and drops it instead. Check the key.",
                                  self._settings.api_key_source)
            return
        self._stats.warn_once("reject", str(status), "otel-metadata: %s (%s): %s; not retried, "
                              "further such refusals are only counted",
                              _PERMANENT_HINTS.get(status or 0, "request refused"),
                              _describe(outcome), outcome.detail[:200])


def _describe(outcome: Outcome) -> str:
    return f"HTTP {outcome.status}" if outcome.status is not None else str(outcome.error)
