"""Delivery: one thread that drains the record queue over HTTP (SPEC §7).

Like the SDK's batch processor: a bounded queue, one worker thread, flush and shutdown with
timeouts, and a fresh start after `os.fork()`. Unlike it: many POSTs in flight (there is no bulk
endpoint), retries with backoff, and `force_flush` honours its timeout.

Every POST in flight is a non-blocking connection on one `selectors` loop, not a thread
blocked in a socket call: on this kind of machine a thread's wake-up costs 25-125 µs of CPU
(more when the app's thread holds the GIL), so a thread per POST cost more than the POST
itself; one loop wakes once for every answer that has arrived. Retries wait on a timer heap in
the same loop. How many POSTs are in flight follows the load and the API's answers
(`AdaptiveConcurrency`): never more than the records due, nor than a limit that halves when the
API pushes back (429, 503, a timeout, rising latency) and grows by one per round trip while it
does not, up to `max_concurrency`.

A plain daemon thread, not a `concurrent.futures` pool: a pool refuses work once the
interpreter is shutting down, which is exactly when the provider's exit hook flushes, and
Python 3.12+ refuses to start threads then; the thread is started up front.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import itertools
import logging
import selectors
import socket
import threading
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING

from .config import Settings
from .mapping import RequestId
from .queue import MAX_WAIT_S, Entry, RecordStore
from .retry import RetryPolicy
from .stats import Stats
from .transport import Outcome, Transport

if TYPE_CHECKING:
    from .transport import Connection

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

# How often the POSTs in flight are looked over for a timeout (so one may end this late).
_SWEEP_S = 0.05


class AdaptiveConcurrency:
    """How many POSTs may be in flight: additive increase, multiplicative decrease.

    Starts at `maximum` (a fresh process has a queue to drain, and a flush at exit has seconds,
    not minutes). Round trips are observed in windows of about one round trip: a window without
    back-pressure, with the limit reached at some point (so the limit was what held us back),
    raises it by one; back-pressure (429, 503, no answer) or a window whose mean round trip is
    more than `rtt_tolerance` times the usual one (and `rtt_margin_s` more) halves it, at most
    once per round trip (one overload answered by every POST in flight is one signal, not
    many). The usual round trip is a moving average of the windows' means.

    Used by delivery's one loop thread only: no lock.
    """

    rtt_tolerance = 2.0
    # ... and by at least a few milliseconds: a local API's 0.3 ms doubles whenever the loop
    # waits for the GIL, which says nothing about the API.
    rtt_margin_s = 0.005
    rtt_smoothing = 0.1  # weight of the latest window in the usual round trip

    def __init__(self, maximum: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.maximum = maximum
        self.limit = maximum
        self.in_flight = 0
        self._clock = clock
        self._usual_rtt: float | None = None
        self._window_end = 0.0
        self._window_sum = 0.0
        self._window_n = 0
        self._reached = False
        self._calm_until = 0.0  # no second decrease before one round trip after the last

    @property
    def room(self) -> bool:
        """Whether one more POST may start now."""
        return self.in_flight < self.limit

    def acquire(self) -> float:
        """Take room for a POST (the caller checked `room`); returns when (for `release`)."""
        self.in_flight += 1
        if self.in_flight >= self.limit:
            self._reached = True
        return self._clock()

    def release(self, started: float, status: int | None) -> None:
        """A POST that `acquire` let through ended with `status` (None: no answer)."""
        now = self._clock()
        self.in_flight -= 1
        if status in _BACK_PRESSURE:
            if now >= self._calm_until:
                self._decrease(now, now - started)
            return
        self._window_sum += now - started
        self._window_n += 1
        if now >= self._window_end:
            self._end_window(now)

    def cancel(self) -> None:
        """Give back room taken by `acquire` without a POST."""
        self.in_flight -= 1

    def _end_window(self, now: float) -> None:
        mean = self._window_sum / self._window_n
        usual = self._usual_rtt
        if (usual is not None and mean > max(usual * self.rtt_tolerance, usual + self.rtt_margin_s)
                and now >= self._calm_until):
            self._decrease(now, mean)
        elif self._reached and self.limit < self.maximum:
            self.limit += 1
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


class _Post:
    """One record on its way: its tries so far, its deadline, and the connection carrying it."""

    __slots__ = ("entry", "deadline", "tries", "last", "conn", "started", "began")

    def __init__(self, entry: Entry, deadline: float) -> None:
        self.entry = entry
        self.deadline = deadline  # the export timeout: no try starts after it
        self.tries = 0
        self.last: Outcome | None = None  # how the latest try ended
        self.conn: Connection | None = None
        self.started = 0.0  # `AdaptiveConcurrency.acquire`'s time
        self.began = 0.0  # perf_counter at the start of this try (for `on_post`)


class _Waker:
    """Wakes the loop out of `select` from another thread: a byte on a socket pair."""

    __slots__ = ("reader", "writer")

    def __init__(self) -> None:
        self.reader, self.writer = socket.socketpair()
        self.reader.setblocking(False)
        self.writer.setblocking(False)

    def wake(self) -> None:
        # Full: a wake-up is pending anyway; closed: shutting down.
        with contextlib.suppress(OSError):
            self.writer.send(b"\0")

    def drain(self) -> None:
        with contextlib.suppress(OSError):  # empty now (BlockingIOError), or closed
            while self.reader.recv(4096):
                pass

    def close(self) -> None:
        self.reader.close()
        self.writer.close()


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
        self.concurrency = AdaptiveConcurrency(self._settings.max_concurrency, self._clock)
        self._waker = _Waker()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._waker.reader, selectors.EVENT_READ, None)
        self._posts: set[_Post] = set()  # in flight
        self._retries: list[tuple[float, int, _Post]] = []  # (when, tie-break, post): a heap
        self._kept: list[Connection] = []  # open connections with nothing in flight
        self._tries = itertools.count()
        self._next_sweep = 0.0  # when `_sweep` looks for timed-out POSTs next
        self._thread = threading.Thread(target=self._run, name="otel-metadata-sender",
                                        daemon=True)
        self._thread.start()

    def after_fork(self, store: RecordStore, transport: Transport) -> None:
        """A forked child: the parent delivers what it queued; this one starts afresh (the
        parent's sockets are left to it)."""
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
        deadline = self._clock() + timeout_s
        self.force_flush(timeout_s)
        self._shutdown = True
        left = self._queue.close(keep=True)  # wakes the loop, which closes its connections
        if left:
            self._stats.add("dropped.shutdown", len(left))
        self._waker.wake()
        if self._thread is not threading.current_thread():
            # It closes its connections on the way out; a daemon, it is not waited for longer.
            self._thread.join(max(0.0, min(1.0, deadline - self._clock())))
        self._transport.close()

    # -- the loop: one thread, every POST in flight on a selector --

    def _run(self) -> None:
        try:
            while not self._shutdown:
                self._turn()
        finally:
            for post in self._posts:
                if post.conn is not None:
                    post.conn.close()
            for conn in self._kept:
                conn.close()
            self._selector.close()
            self._waker.close()

    def _turn(self) -> None:
        """Start what may start, wait for the network (or a timer, or a wake-up), then move
        every ready POST on."""
        now = self._clock()
        limit, retries = self.concurrency, self._retries
        while retries and retries[0][0] <= now and limit.room:
            self._try(heapq.heappop(retries)[2], retried=True)
        due_in: float | None = None
        while limit.room:
            got = self._queue.take_nowait(self._waker)
            if not isinstance(got, Entry):
                due_in = got
                break
            self._begin(got, now)
        wake = [due_in + now] if due_in is not None else []
        if retries and limit.room:
            wake.append(retries[0][0])
        if self._posts:
            wake.append(self._next_sweep)
        timeout = max(0.0, min(wake) - self._clock()) if wake else None
        for key, _ in self._selector.select(None if timeout is None else min(timeout, MAX_WAIT_S)):
            conn = key.data
            if conn is None:
                self._waker.drain()
            elif conn.data is None:  # a kept connection, readable while idle: closed
                conn.advance()
            else:
                self._advance(conn.data)
        now = self._clock()
        if now >= self._next_sweep:
            self._sweep(now)

    def _sweep(self, now: float) -> None:
        """End the POSTs whose connect or read timed out. Looked for every `_SWEEP_S`, not on
        every turn: a timeout is seconds long, the POSTs in flight may be hundreds."""
        self._next_sweep = now + _SWEEP_S
        for post in [p for p in self._posts if p.conn is not None and p.conn.deadline <= now]:
            self._settle_try(post, post.conn.timed_out())  # type: ignore[union-attr]

    def _begin(self, entry: Entry, now: float) -> None:
        self._try(_Post(entry, now + self._settings.export_timeout_s), retried=False)

    def _try(self, post: _Post, retried: bool) -> None:
        """Start one POST of `post` (room under the limit was checked)."""
        if self._shutdown:
            return
        if self._key_rejected:
            self._finish(post, "dropped.unauthorized")
            return
        timeout = min(self._settings.request_timeout_s, post.deadline - self._clock())
        if not timeout > 0:  # due before the deadline, but the loop came to it late
            self._give_up(post)
            return
        if retried:  # counted once the retry's POST really starts
            self._stats.add("retried")
        entry = post.entry
        request = self._transport.request(entry.request_id, entry.metadata)
        post.started = self.concurrency.acquire()
        post.began = time.perf_counter()
        self._posts.add(post)
        if isinstance(request, Outcome):  # a request that cannot be sent: no connection needed
            self._settle_try(post, request)
            return
        try:
            conn = post.conn = self._kept.pop() if self._kept else self._transport.connection()
            # A kept connection takes the request at once: no turn of the loop for that. Until
            # it ends, the connection keeps itself registered with the selector, for `post`.
            outcome = conn.begin(request, timeout, self._selector, post)
            if outcome is None:
                return
        except Exception as exc:  # never let one record stall the loop
            self._fail_unexpectedly(post, exc)
            return
        self._settle_try(post, outcome)

    def _advance(self, post: _Post) -> None:
        conn = post.conn
        assert conn is not None
        try:
            outcome = conn.advance()
            if outcome is None:
                return
        except Exception as exc:
            self._fail_unexpectedly(post, exc)
            return
        self._settle_try(post, outcome)

    def _fail_unexpectedly(self, post: _Post, exc: Exception) -> None:
        # Formatted and scrubbed by hand: a traceback's messages could quote a header.
        _logger.error("otel-metadata: unexpected error delivering a record:\n%s",
                      self._transport.redact("".join(traceback.format_exception(exc))))
        self._drop_connection(post, reusable=False)
        self.concurrency.cancel()
        self._posts.discard(post)
        self._finish(post, "dropped.error")

    def _drop_connection(self, post: _Post, reusable: bool) -> None:
        """`post`'s exchange ended (the connection is off the selector already): keep the
        connection for the next POST, or close it."""
        conn, post.conn = post.conn, None
        if conn is None:
            return
        if reusable and conn.reusable and len(self._kept) < self.concurrency.maximum:
            self._kept.append(conn)
        else:
            conn.close()

    def _settle_try(self, post: _Post, outcome: Outcome) -> None:
        """One POST of `post` ended: delivered, refused for good, or to be retried."""
        self._drop_connection(post, reusable=True)
        self._posts.discard(post)
        self.on_post(time.perf_counter() - post.began, outcome.status, outcome.error)
        self.concurrency.release(post.started, outcome.status)
        post.tries += 1
        self._stats.add("posts")
        if outcome.ok:
            self._finish(post, "delivered")
            return
        if not self._retry.is_retryable(outcome.status):
            self._reject(outcome)
            self._finish(post, "dropped.rejected")
            return
        post.last = outcome
        now = self._clock()
        wait = self._retry.backoff(post.tries - 1, outcome.retry_after)
        # Only when a retry could still start before the deadline; shutdown ends the wait.
        if now + wait < post.deadline:
            _logger.debug("otel-metadata: POST for request %r failed (%s); next try in %.3f s",
                          post.entry.request_id, _describe(outcome), wait)
            heapq.heappush(self._retries, (now + wait, next(self._tries), post))
            return
        self._give_up(post)

    def _give_up(self, post: _Post) -> None:
        """Out of time (the export timeout) for `post`: dropped, counted and told once."""
        if post.last is None:
            tried = "before a try could start (the export timeout ran out)"
        else:
            tried = f"after {post.tries} tries (last: {_describe(post.last)})"
        self._stats.warn_once("drop", "exhausted", "otel-metadata: giving up on request %r %s; "
                              "further such drops are only counted", post.entry.request_id, tried)
        self._finish(post, "dropped.retries_exhausted")

    def _finish(self, post: _Post, fate: str) -> None:
        """`post` is done with: ``delivered`` or ``dropped.<reason>``, the counter to add."""
        entry = post.entry
        if fate != "delivered" and self.on_drop is not None:
            # Before `ack`, so a flush that sees the failure also sees its keys unsent.
            self.on_drop(entry.request_id, entry.metadata)
        # The key's refusal (401) is not the record's fault either.
        keep = fate in _KEPT_FATES or (fate == "dropped.rejected" and self._key_rejected)
        self._queue.ack(entry, fate == "delivered", functools.partial(self._stats.add, fate),
                        keep=keep)

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
