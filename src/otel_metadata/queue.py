"""The record queue: bounded, coalescing by request ID, with flush bookkeeping (SPEC §7).

`RecordStore` is the interface delivery drains (`put`, `take`, `ack`, `flush`, `close`), so the
durable spool (SPEC §7a) stands behind the same calls; `RecordQueue` is the in-memory one.
Every `put` gets a sequence number; `flush` makes every record put so
far due, waits until each is delivered or has failed, and tells which. A failure is told to
every flush that covers it and was waiting when it was first told; later flushes do not see it
again, so one old drop does not make every future flush return False.

Two POSTs for one request ID are never in flight at once: the API replaces a key on every POST,
so an older value arriving last would win.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from .mapping import RequestId

# Longest single wait: a lock's or condition's timeout overflows the platform's time_t far
# below inf.
MAX_WAIT_S = 3600.0


@dataclass(slots=True)
class Entry:
    """Metadata waiting for (or in) one POST: every update of one request ID since the last."""

    request_id: RequestId
    metadata: dict[str, str]
    first_seq: int
    enqueued_at: float
    updates: int = 1
    abandoned: bool = False  # still in flight when the queue closed: already counted as failed


@dataclass(slots=True)
class _Flush:
    """One waiting `flush` call: the sequence number it covers, and whether any of those failed."""

    upto: int
    failed: bool = False


class RecordStore(Protocol):
    """Where records wait between the lineage join and delivery."""

    def put(self, request_id: RequestId, metadata: dict[str, str]) -> bool:
        """Queue a record (coalescing into a pending one of the same ID); False when refused."""

    def put_failed(self) -> None:
        """Account for a record refused before it reached the store (the next flush says so)."""

    def take(self) -> Entry | None:
        """Block until a record is due and hand it out; None once closed."""

    def ack(self, entry: Entry, delivered: bool, account: Callable[[], None]) -> None:
        """The POST for `entry` settled: delivered, or refused / given up on for good."""

    def flush(self, deadline: float) -> bool:
        """Make everything put so far due; True once all of it was delivered by `deadline`."""

    def close(self, keep: bool = False) -> list[Entry]:
        """Stop handing out records. Returns those given up on; a durable store asked to
        `keep` them leaves them for the next process instead (and returns none)."""

    def __len__(self) -> int:
        """Records waiting or in flight."""


class RecordQueue:
    """A bounded map request ID → pending metadata; senders `take` entries when they are due.

    An entry is due when it has waited `delay_s`, when `max_batch` entries are pending, when a
    flush covers it, or once the queue is closing.
    """

    def __init__(
        self,
        max_size: int,
        max_batch: int,
        delay_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max_size = max_size
        self._max_batch = max_batch
        self._delay = delay_s
        self._clock = clock
        self._cond = threading.Condition(threading.Lock())
        # In enqueue order; an OrderedDict finds its oldest entry in O(1) after many removals.
        self._pending: OrderedDict[RequestId, Entry] = OrderedDict()
        self._inflight: dict[RequestId, Entry] = {}
        self._seq = 0
        self._flush_to = 0
        # Sequence numbers of records that failed and no flush was told of yet. With no flush
        # waiting, only the smallest matters (every later flush covers them all), so this stays
        # small even when every record fails for hours (a rejected key) and nobody flushes.
        self._failed: list[int] = []
        self._flushes: list[_Flush] = []
        self._closed = False

    def put(self, request_id: RequestId, metadata: dict[str, str]) -> bool:
        """Queue (or merge into the pending entry, later value winning); False when full."""
        with self._cond:
            self._seq += 1
            entry = self._pending.get(request_id)
            if entry is not None:
                entry.metadata.update(metadata)
                entry.updates += 1
                return True
            if self._closed or len(self._pending) >= self._max_size:
                self._fail(self._seq)
                self._cond.notify_all()
                return False
            self._pending[request_id] = Entry(request_id, dict(metadata), self._seq, self._clock())
            if len(self._pending) >= self._max_batch or len(self._pending) == 1:
                self._cond.notify_all()  # flushers wait on it too: a lone notify could miss
            return True

    def put_failed(self) -> None:
        """Account for a record refused before queueing, so the next flush reports it."""
        with self._cond:
            self._seq += 1
            self._fail(self._seq)

    def take(self) -> Entry | None:
        """Block until an entry is due, mark it in flight and return it; None once closed."""
        with self._cond:
            while True:
                wait = self._next_due()
                if isinstance(wait, Entry):
                    del self._pending[wait.request_id]
                    self._inflight[wait.request_id] = wait
                    return wait
                if self._closed:
                    return None
                self._cond.wait(wait)

    def _next_due(self) -> Entry | float | None:
        """The entry to send now, or how long to wait (None: until notified)."""
        now = self._clock()
        soonest: float | None = None
        urgent = self._closed or len(self._pending) >= self._max_batch
        for entry in self._pending.values():
            if entry.request_id in self._inflight:
                continue
            if urgent or entry.first_seq <= self._flush_to:
                return entry
            due_in = entry.enqueued_at + self._delay - now
            if due_in <= 0:
                return entry
            soonest = due_in if soonest is None else min(soonest, due_in)
            break  # pending is in enqueue order: later entries are due later
        return soonest

    def ack(self, entry: Entry, delivered: bool, account: Callable[[], None]) -> None:
        """The POST for `entry` finished: delivered, or failed for good.

        `account` (the caller's counting) runs under the lock, unless `close` gave the entry up
        first (and the caller counted it then): so every entry is counted exactly once, and
        before any flush that covers it returns.
        """
        with self._cond:
            if entry.abandoned:
                return
            account()
            self._inflight.pop(entry.request_id, None)
            if not delivered:
                self._fail(entry.first_seq)
            self._cond.notify_all()

    def flush(self, deadline: float) -> bool:
        """Send every record put so far now, and wait until each settled (or `deadline`).

        True when all of them were delivered; False on a failure or when the deadline came first.
        """
        with self._cond:
            seq = self._flush_to = self._seq
            self._cond.notify_all()
            me = _Flush(seq)
            self._flushes.append(me)
            try:
                while self._oldest_unsettled() <= seq:
                    remaining = deadline - self._clock()
                    if not remaining > 0:  # NaN too
                        return False
                    self._cond.wait(min(remaining, MAX_WAIT_S))
                self._tell(seq)
                return not me.failed
            finally:
                self._flushes.remove(me)
                if not self._flushes:
                    self._fail()

    def _fail(self, *seqs: int) -> None:
        """Note failed records (inside the lock), keeping only what a flush can still ask."""
        self._failed.extend(seqs)
        if not self._flushes and len(self._failed) > 1:
            self._failed = [min(self._failed)]

    def _tell(self, seq: int) -> None:
        """Tell the failures up to `seq` to every waiting flush that covers them; forget them."""
        told = [s for s in self._failed if s <= seq]
        if told:
            self._failed = [s for s in self._failed if s > seq]
            first = min(told)
            for flush in self._flushes:
                if flush.upto >= first:
                    flush.failed = True

    def _oldest_unsettled(self) -> float:
        firsts = [e.first_seq for e in self._inflight.values()]
        if self._pending:
            firsts.append(next(iter(self._pending.values())).first_seq)
        return min(firsts, default=float("inf"))

    def close(self, keep: bool = False) -> list[Entry]:
        """Stop handing out entries; give up on every unsettled one and return them (memory
        cannot `keep` anything past the process).

        Entries still in flight are marked abandoned: their POST may yet land, but nobody is
        left to wait for it, so they count as not delivered (the caller counts them).
        """
        with self._cond:
            self._closed = True
            left = [*self._pending.values(), *self._inflight.values()]
            for entry in self._inflight.values():
                entry.abandoned = True
            self._pending.clear()
            self._inflight.clear()
            self._fail(*(e.first_seq for e in left))
            self._cond.notify_all()
            return left

    def __len__(self) -> int:
        return len(self._pending) + len(self._inflight)
