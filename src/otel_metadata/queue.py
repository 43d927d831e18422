"""The record queue: bounded, coalescing by request ID, with flush bookkeeping (SPEC §7).

`RecordStore` is the interface delivery drains (`put`, `take`, `ack`, `flush`, `close`), so the
durable spool (SPEC §7a) stands behind the same calls; `RecordQueue` is the in-memory one.
Every record gets a sequence number; `flush` makes every record put so far due, waits until
each is delivered or has failed, and tells which. A failure is told to every flush that covers
it and was waiting when it was first told; later flushes do not see it again, so one old drop
does not make every future flush return False.

Two POSTs for one request ID are never in flight at once: the API replaces a key on every POST,
so an older value arriving last would win.

Beware: `put` runs on the lineage worker, which must never wait for a lock the sender holds
(a sender that loses the GIL inside it would stall the join). So `put` only appends to a
hand-off deque; whoever holds the queue's lock next folds the hand-off into the queue, `put`
itself when the lock is free. Whoever waits (delivery's loop through its waker, a flush on a
lock of its own) is woken once, only when there is something for it: never all at once.

A durable store (`spool.SpoolQueue`) subclasses `RecordQueue` through one hook, `_store`, which
puts the record on disk before it is handed over, and extends `ack`, `flush` and `close`.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
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
    last_seq: int = 0  # a durable store's version of the newest update in it (memory: 0)


class Waker(Protocol):
    """Whoever waits for the store: woken (once per wait) when there may be an entry due."""

    def wake(self) -> None: ...


class _Parked:
    """A thread waiting for a wake-up of its own: a lock it holds, released by the waker."""

    __slots__ = ("lock",)

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lock.acquire()

    def wait(self, timeout: float | None) -> bool:
        return self.lock.acquire(timeout=-1 if timeout is None else min(timeout, MAX_WAIT_S))

    def wake(self) -> None:
        self.lock.release()


@dataclass(slots=True, eq=False)
class _Flush:
    """One waiting `flush` call: the sequence number it covers, and whether any of those failed."""

    upto: int
    failed: bool = False
    parked: _Parked = field(default_factory=_Parked)
    woken: bool = False


class RecordStore(Protocol):
    """Where records wait between the lineage join and delivery."""

    def put(self, request_id: RequestId, metadata: dict[str, str]) -> bool:
        """Queue a record (coalescing into a pending one of the same ID); False when refused.
        Never waits for a lock that `take`, `ack` or `flush` hold."""

    def put_failed(self) -> None:
        """Account for a record refused before it reached the store (the next flush says so)."""

    def take_nowait(self, waker: Waker) -> Entry | float | None:
        """A record due now, marked in flight; else seconds until one is due (None: none
        pending), `waker` being woken once when that may change sooner. Never blocks."""

    def ack(self, entry: Entry, delivered: bool, account: Callable[[], None],
            keep: bool = False) -> None:
        """The POST for `entry` settled: delivered, or refused / given up on. `keep`: not for
        good (retries ran out, the key was rejected): a durable store keeps it for later."""

    def flush(self, deadline: float) -> bool:
        """Make everything put so far due; True once all of it was delivered by `deadline`."""

    def close(self, keep: bool = False) -> list[Entry]:
        """Stop handing out records. Returns those given up on; a durable store asked to
        `keep` them leaves them for the next process instead (and returns none)."""

    def __len__(self) -> int:
        """Records waiting or in flight."""


# A record handed to `put`: request ID, metadata (None: one refused, for the next flush to
# tell), the store's version of it (`Entry.last_seq`).
_Handed = tuple[RequestId, "dict[str, str] | None", int]


class RecordQueue:
    """A bounded map request ID → pending metadata; delivery takes entries when they are due.

    An entry is due when it has waited `delay_s`, when it is one of `max_batch` entries pending
    (the whole batch is then due), when a flush covers it, or once the queue is closing.
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
        # Held for O(1) work per record, never by `put`'s caller waiting on it.
        self._lock = threading.Lock()
        self._handed: deque[_Handed] = deque()  # from `put`, not folded in yet
        # In enqueue order (so in `first_seq` order); an OrderedDict finds its oldest entry in
        # O(1) after many removals.
        self._pending: OrderedDict[RequestId, Entry] = OrderedDict()
        self._inflight: dict[RequestId, Entry] = {}
        self._seq = 0  # of the last record folded in
        self._flush_to = 0  # records up to this one are due: a flush asked
        self._batch_to = 0  # ... or a full batch
        # Sequence numbers of records that failed and no flush was told of yet. With no flush
        # waiting, only the smallest matters (every later flush covers them all), so this stays
        # small even when every record fails for hours (a rejected key) and nobody flushes.
        self._failed: list[int] = []
        self._flushes: list[_Flush] = []
        self._idle: deque[Waker] = deque()  # who waits for an entry (`take_nowait`)
        self._timer = False  # the waiter times the next entry's delay: no wake-up for puts
        self._closed = False

    # -- the producer's side: never waits --

    def put(self, request_id: RequestId, metadata: dict[str, str]) -> bool:
        """Queue (or merge into the pending entry, later value winning); False when full.

        The bound is checked without the lock: against pending entries plus records handed over
        but not folded in yet (those may be updates of one ID, so it errs on refusing early).
        """
        if self._closed or (len(self._pending) + len(self._handed) >= self._max_size
                            and request_id not in self._pending):
            self.put_failed()
            return False
        if not self._store(request_id, metadata):
            self.put_failed()
            return False
        # The waiter must look if it is not timing the next entry's delay, or once a batch is
        # full.
        if self._idle and (not self._timer or self._batch_full()):
            self._wake_waiter()
        return True

    def _batch_full(self) -> bool:
        """`max_batch` records wait, as many arrived since the last batch or flush made them
        all due (so records that arrive while a batch goes out are not a batch of their own
        one by one). Read without the lock: it may err towards a batch early."""
        handed = len(self._handed)
        return (len(self._pending) + handed >= self._max_batch and
                self._seq + handed - max(self._batch_to, self._flush_to) >= self._max_batch)

    def _store(self, request_id: RequestId, metadata: dict[str, str]) -> bool:
        """Hand the record over (False: refuse it). A durable store writes it to disk first,
        and hands it over in the order it wrote it, with its version."""
        self._hand((request_id, metadata, 0))
        return True

    def put_failed(self) -> None:
        """Account for a record refused before queueing, so the next flush reports it."""
        self._hand((None, None, 0))  # type: ignore[arg-type]  # a request ID is never None

    def _hand(self, item: _Handed) -> None:
        """Append to the hand-off; fold it in at once if the lock is free (never waits)."""
        self._handed.append(item)
        if self._lock.acquire(blocking=False):
            try:
                self._fold()
            finally:
                self._lock.release()

    def _wake_waiter(self) -> None:
        """Wake one waiter, if there is one (a pop is atomic: each is woken once)."""
        try:
            parked = self._idle.popleft()
        except IndexError:
            return
        parked.wake()

    def _fold(self) -> None:
        """Move what `put` handed over into the queue (inside the lock)."""
        handed, pending, now = self._handed, self._pending, self._clock()
        while handed:
            request_id, metadata, version = handed.popleft()
            self._seq += 1
            if metadata is None:
                self._fail(self._seq)
                continue
            entry = pending.get(request_id)
            if entry is not None:
                entry.metadata.update(metadata)
                entry.updates += 1
                entry.last_seq = version
            else:
                pending[request_id] = Entry(request_id, dict(metadata), self._seq, now,
                                            last_seq=version)

    # -- delivery's side --

    def take_nowait(self, waker: Waker) -> Entry | float | None:
        """The entry due now, marked in flight; else seconds until the next one is due (None:
        nothing pending). Until the caller asks again, `waker` is woken once when that may
        change sooner: a `put` to an empty queue or of a full batch, a flush, an update freed
        by an `ack`, `close`."""
        with self._lock:
            self._fold()
            due = self._next_due()
            if isinstance(due, Entry):
                del self._pending[due.request_id]
                self._inflight[due.request_id] = due
                return due
            # A caller timing the next entry needs no wake-up for later ones.
            self._timer = due is not None
            if waker not in self._idle:
                self._idle.append(waker)
            return due

    def take(self) -> Entry | None:
        """Block until an entry is due, mark it in flight and return it; None once closed.
        For one consumer; delivery's event loop uses `take_nowait`."""
        me = _Parked()
        while True:
            due = self.take_nowait(me)
            if isinstance(due, Entry):
                return due
            if self._closed:
                return None
            if not me.wait(due):
                with self._lock:
                    try:
                        self._idle.remove(me)
                    except ValueError:  # popped by a waker just now: consume its wake-up
                        me.wait(None)

    def _next_due(self) -> Entry | float | None:
        """The entry to send now, or how long to wait (None: until woken)."""
        now = self._clock()
        if self._batch_full():
            # A full batch goes out whole, as the SDK's batch processor exports one: not one
            # record per `put` while the queue hovers at the batch size.
            self._batch_to = self._seq
        for entry in self._pending.values():
            if entry.request_id in self._inflight:
                continue
            if self._closed or entry.first_seq <= max(self._flush_to, self._batch_to):
                return entry
            due_in = entry.enqueued_at + self._delay - now
            return entry if due_in <= 0 else due_in  # later entries are due later
        return None

    def ack(self, entry: Entry, delivered: bool, account: Callable[[], None],
            keep: bool = False) -> None:
        """The POST for `entry` finished: delivered, or failed (`keep`: not for good; memory
        cannot keep anything past the process, so here it is the same).

        `account` (the caller's counting) runs under the lock, unless `close` gave the entry up
        first (and the caller counted it then): so every entry is counted exactly once, and
        before any flush that covers it returns.
        """
        with self._lock:
            if entry.abandoned:
                return
            account()
            self._inflight.pop(entry.request_id, None)
            if not delivered:
                self._fail(entry.first_seq)
            if entry.request_id in self._pending:
                self._wake_waiter()  # an update waited for this POST to end
            if self._flushes:
                self._wake_flushes()

    # -- flush --

    def flush(self, deadline: float) -> bool:
        """Send every record put so far now, and wait until each settled (or `deadline`).

        True when all of them were delivered; False on a failure or when the deadline came first.
        Woken once, when all it covers has settled: not after every POST.
        """
        if not self._lock.acquire(timeout=_remaining(deadline, self._clock)):
            return False
        try:
            self._fold()
            me = _Flush(self._seq)
            self._flush_to = self._seq
            if self._pending:
                self._wake_waiter()  # everything put so far is due now
            self._flushes.append(me)
            self._wake_flushes()  # at once if nothing it covers is unsettled
        finally:
            self._lock.release()
        woken = me.parked.wait(_remaining(deadline, self._clock))
        with self._lock:
            if not woken and me.woken:  # settled just as the deadline came: consume the wake
                woken = me.parked.wait(None)
            if woken:
                self._tell(me.upto)
            self._flushes.remove(me)
            if not self._flushes:
                self._fail()
            return woken and not me.failed

    def _wake_flushes(self) -> None:
        """Wake the flushes whose records have all settled (inside the lock): one wake-up per
        flush when it is done, not one per POST."""
        oldest = self._oldest_unsettled()
        for flush in self._flushes:
            if not flush.woken and flush.upto < oldest:
                flush.woken = True
                flush.parked.wake()

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
        with self._lock:
            self._closed = True
            self._fold()
            left = [*self._pending.values(), *self._inflight.values()]
            for entry in self._inflight.values():
                entry.abandoned = True
            self._pending.clear()
            self._inflight.clear()
            self._fail(*(e.first_seq for e in left))
            while self._idle:
                self._wake_waiter()
            self._wake_flushes()
            return left

    def __len__(self) -> int:
        return len(self._pending) + len(self._inflight) + len(self._handed)


def _remaining(deadline: float, clock: Callable[[], float]) -> float:
    """Seconds left until `deadline`, as a lock's timeout takes them (NaN: none left)."""
    left = deadline - clock()
    return min(left, MAX_WAIT_S) if left > 0 else 0.0
