"""Delivery: sender threads that drain the record queue over HTTP (SPEC §7).

Like the SDK's batch processor: a bounded queue, worker threads, flush and shutdown with
timeouts, and a fresh start after `os.fork()`. Unlike it: many POSTs in flight (there is no bulk
endpoint), retries with backoff, and `force_flush` honours its timeout.

How many POSTs are in flight follows the load and the API's answers (`AdaptiveConcurrency`):
never more than the records due, nor than a limit that halves when the API pushes back (429,
503, a timeout, rising latency) and grows by one per round trip while it does not, up to
`max_concurrency`. urllib3 blocks a thread per POST, so the sender threads grow with the work
(one more whenever every sender is busy, up to the limit) and end when they are four times
the limit; idle senders sleep on a lock of their own and cost nothing (64 idle: 0.06 ms CPU in 5 s).

Plain daemon threads, not a `concurrent.futures` pool: a pool refuses work once the interpreter
is shutting down, which is exactly when the provider's exit hook flushes, and Python 3.12+
refuses to start threads then. So the first sender is started up front and never ends before
shutdown; the others are extra hands when they can be had.
"""

from __future__ import annotations

import functools
import logging
import math
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

# Fates that are not the record's own fault: a durable store keeps it for a later try.
_KEPT_FATES = frozenset({"dropped.retries_exhausted", "dropped.unauthorized"})

# Answers that say the API is overloaded (as Vector's adaptive request concurrency takes them),
# plus no answer at all (a timeout, a refused or reset connection).
_BACK_PRESSURE = frozenset({429, 503, None})


class AdaptiveConcurrency:
    """How many POSTs may be in flight: additive increase, multiplicative decrease.

    Starts at `maximum` (a fresh process has a queue to drain, and a flush at exit has seconds,
    not minutes). Round trips are observed in windows of about one round trip: a window without
    back-pressure, with the limit reached at some point (so the limit was what held us back),
    raises it by one; back-pressure (429, 503, no answer) or a window whose mean round trip is
    more than `rtt_tolerance` times the usual one (and `rtt_margin_s` more) halves it, at most
    once per round trip (one overload answered by every POST in flight is one signal, not
    many). The usual round trip is a moving average of the windows' means.

    Below the limit, POSTs in flight are also kept to what can help (`useful`): urllib3 holds a
    thread per POST, and threads only help while they wait on the network, not for the GIL. A
    POST that costs `cpu` seconds of CPU and waits `min_rtt - cpu` for the answer keeps
    ``1 + (min_rtt - cpu) / cpu`` of them busy (the round trip's bandwidth-delay product, as BBR
    reckons it): 2 against a local API that answers in 0.3 ms, where 64 would only contend for
    the GIL (twice the CPU per record), and above 64 at a 50 ms round trip. The smallest round
    trip of the last 10-20 s is taken, as our own threads' contention only ever adds to it.
    """

    rtt_tolerance = 2.0
    # ... and by at least one GIL switch interval: a local API's 0.3 ms doubles whenever a
    # sender waits for the GIL, which says nothing about the API (25 ms: 2 halvings in 10 s at
    # 200 records/s to a local server, 2 ms: 35, none: 91; the CPU a POST costs moves with it).
    rtt_margin_s = 0.005
    rtt_smoothing = 0.1  # weight of the latest window in the usual round trip (and the CPU's)
    min_rtt_period_s = 10.0

    def __init__(self, maximum: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.maximum = maximum
        self.limit = maximum
        self.in_flight = 0
        self._clock = clock
        self._cond = threading.Condition(threading.Lock())
        self._usual_rtt: float | None = None
        self._window_end = 0.0
        self._window_sum = 0.0
        self._window_n = 0
        self._reached = False
        self._calm_until = 0.0  # no second decrease before one round trip after the last
        self.useful = maximum
        self._cpu: float | None = None  # CPU seconds a POST costs (moving average)
        self._min_rtt = [float("inf"), float("inf")]  # this period's and the last one's
        self._period_end = 0.0

    @property
    def allowed(self) -> int:
        """POSTs that may be in flight now."""
        return min(self.limit, self.useful)

    def acquire(self) -> float:
        """Wait for room under the limit, take it; returns when (for `release`)."""
        with self._cond:
            while self.in_flight >= min(self.limit, self.useful):
                self._cond.wait()
            self.in_flight += 1
            if self.in_flight >= self.limit:
                self._reached = True
        return self._clock()

    def release(self, started: float, status: int | None, cpu: float = 0.0) -> None:
        """A POST that `acquire` let through ended with `status` (None: no answer), having
        cost this thread `cpu` seconds of CPU."""
        now = self._clock()
        rtt = now - started
        with self._cond:
            self.in_flight -= 1
            if status in _BACK_PRESSURE:
                if now >= self._calm_until:
                    self._decrease(now, rtt)
            else:
                self._window_sum += rtt
                self._window_n += 1
                if now >= self._window_end:
                    self._end_window(now)
                if cpu > 0:
                    self._reckon_useful(now, rtt, cpu)
            self._cond.notify()

    def _reckon_useful(self, now: float, rtt: float, cpu: float) -> None:
        average = self._cpu = cpu if self._cpu is None else (
            self._cpu + self.rtt_smoothing * (cpu - self._cpu))
        if now >= self._period_end:
            self._min_rtt = [float("inf"), self._min_rtt[0]]
            self._period_end = now + self.min_rtt_period_s
        self._min_rtt[0] = min(self._min_rtt[0], rtt)
        waiting = max(0.0, min(self._min_rtt) - average)
        useful = min(self.maximum, 1 + math.ceil(waiting / average))
        if useful > self.useful:
            self._cond.notify(useful - self.useful)
        self.useful = useful

    def cancel(self) -> None:
        """Give back room taken by `acquire` without a POST."""
        with self._cond:
            self.in_flight -= 1
            self._cond.notify()

    def _end_window(self, now: float) -> None:
        mean = self._window_sum / self._window_n
        usual = self._usual_rtt
        if (usual is not None and mean > max(usual * self.rtt_tolerance, usual + self.rtt_margin_s)
                and now >= self._calm_until):
            self._decrease(now, mean)
        elif self._reached and self.limit < self.maximum:
            self.limit += 1
            self._cond.notify()
        self._usual_rtt = mean if usual is None else usual + self.rtt_smoothing * (mean - usual)
        self._new_window(now)

    def _decrease(self, now: float, rtt: float) -> None:
        self.limit = max(1, self.limit // 2)
        self._calm_until = now + (self._usual_rtt or rtt)  # before any good answer: this one's
        self._new_window(now)

    def _new_window(self, now: float) -> None:
        self._window_end = now + (self._usual_rtt or 0.0)
        self._window_sum, self._window_n = 0.0, 0
        self._reached = self.in_flight >= self.limit


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
        # Told of every POST: how long it took, its status (None: no answer) and error name.
        self.on_post: Callable[[float, int | None, str | None], None] = _ignore_post
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
        self.concurrency = AdaptiveConcurrency(self._settings.max_concurrency, self._clock)
        self._pool = threading.Lock()  # guards the two counts below (O(1) work)
        self._senders = 1
        self._idle = 0  # senders inside `take`
        self._spawn(first=True)

    def _spawn(self, first: bool = False) -> None:
        """Start a sender (counted in `_senders` already); an extra one is given up quietly
        when no thread can be started (interpreter exit, a thread limit)."""
        thread = threading.Thread(target=self._run, args=(first,), daemon=True,
                                  name=f"otel-metadata-sender-{self._senders - 1}")
        try:
            thread.start()
        except RuntimeError:
            if first:
                raise
            with self._pool:
                self._senders -= 1

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
        stays in a durable store, else is counted as ``dropped.shutdown`` (an in-flight POST
        may land all the same)."""
        if self._shutdown:
            return
        self.force_flush(timeout_s)
        self._shutdown = True
        left = self._queue.close(keep=True)
        self._wake.set()  # senders in a backoff sleep give up now
        if left:
            self._stats.add("dropped.shutdown", len(left))
        self._transport.close()

    # -- sender threads --

    def _run(self, first: bool) -> None:
        queue, pool, limit = self._queue, self._pool, self.concurrency
        while True:
            with pool:
                self._idle += 1
            entry = queue.take()
            with pool:
                self._idle -= 1
                # Every sender busy: one more, if the limit allows, for the next record.
                grow = entry is not None and not self._idle and self._senders < limit.allowed
                if grow:
                    self._senders += 1
            if entry is None:
                return
            if grow:
                self._spawn()
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
            # The key's refusal (401) is not the record's fault either.
            keep = fate in _KEPT_FATES or (fate == "dropped.rejected" and self._key_rejected)
            queue.ack(entry, fate == "delivered", functools.partial(self._stats.add, fate),
                      keep=keep)
            with pool:
                # Far above a lowered limit: end (not just above it: a limit that halves and
                # grows back would start and end threads all the time, at ~100 µs each).
                if not first and self._senders > 4 * limit.allowed:
                    self._senders -= 1
                    return

    def _deliver(self, entry: Entry) -> str:
        """POST `entry` until a 2xx, a refusal, shutdown, or the export timeout runs out.

        Returns its fate, the counter to add: ``delivered`` or ``dropped.<reason>``.
        """
        deadline = self._clock() + self._settings.export_timeout_s
        tries = 0
        while True:
            if self._key_rejected:
                return "dropped.unauthorized"
            started = self.concurrency.acquire()
            timeout = min(self._settings.request_timeout_s, deadline - self._clock())
            if not timeout > 0:  # the wait for room took what was left
                self.concurrency.cancel()
                return "dropped.retries_exhausted"
            cpu, began = time.thread_time(), time.perf_counter()
            outcome = self._transport.post(entry.request_id, entry.metadata, timeout)
            self.on_post(time.perf_counter() - began, outcome.status, outcome.error)
            self.concurrency.release(started, outcome.status, time.thread_time() - cpu)
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


def _ignore_post(seconds: float, status: int | None, error: str | None) -> None:
    """`Delivery.on_post` until someone listens (self-metrics)."""
