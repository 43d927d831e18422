"""The record queue: bounded (drop newest), coalescing, and honest about failures at flush."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from conftest import send, wait_for

from otel_metadata.queue import RecordQueue
from otel_metadata.testing.track_metadata import TrackMetadataServer

NOW = 0.0


def _nothing() -> None:
    """The accounting of a sender that counts nothing."""


def make_queue(max_size: int = 3) -> RecordQueue:
    """A queue with a frozen clock, whose entries are due only when flushed or urgent."""
    return RecordQueue(max_size, max_batch=max_size, delay_s=60.0, clock=lambda: NOW)


def test_a_full_queue_refuses_the_newest_but_still_merges_into_queued_ids() -> None:
    q = make_queue(max_size=2)
    assert q.put(1, {"a": "1"}) and q.put(2, {"a": "1"})
    assert q.put(3, {"a": "1"}) is False  # newest dropped, oldest kept
    assert q.put(1, {"b": "2"}) is True  # an update of a queued ID takes no room
    assert len(q) == 2
    q.flush(deadline=NOW)  # makes everything due; times out at once (nothing delivered yet)
    taken = [q.take(), q.take()]
    assert [(e.request_id, e.metadata) for e in taken if e] == [
        (1, {"a": "1", "b": "2"}), (2, {"a": "1"})]


def test_updates_of_one_request_id_merge_later_value_winning() -> None:
    q = make_queue()
    q.put(7, {"a": "1", "b": "1"})
    q.put(7, {"a": "2"})
    q.flush(deadline=NOW)
    entry = q.take()
    assert entry is not None and (entry.request_id, entry.metadata) == (7, {"a": "2", "b": "1"})


def test_one_request_id_is_never_in_flight_twice() -> None:
    q = make_queue()
    q.put(7, {"a": "1"})
    q.flush(deadline=NOW)
    first = q.take()
    q.put(7, {"a": "2"})
    q.put(8, {"a": "1"})
    q.flush(deadline=NOW)
    second = q.take()
    assert second is not None and second.request_id == 8  # 7 waits for its first POST
    assert first is not None
    q.ack(first, delivered=True, account=_nothing)
    third = q.take()
    assert third is not None and (third.request_id, third.metadata) == (7, {"a": "2"})


def _settle(q: RecordQueue, delivered: bool) -> None:
    """Play the sender: take every due entry and finish it."""
    while len(q):
        entry = q.take()
        assert entry is not None
        q.ack(entry, delivered, account=_nothing)


def test_a_failure_is_told_to_the_flush_that_covers_it_and_then_forgotten() -> None:
    q = make_queue()
    q.put(1, {"a": "1"})
    q.flush(deadline=NOW)
    _settle(q, delivered=False)
    assert q.flush(deadline=NOW + 1) is False
    assert q.flush(deadline=NOW + 1) is True  # an old drop does not fail every later flush
    q.put(2, {"a": "1"})
    q.flush(deadline=NOW)
    _settle(q, delivered=True)
    assert q.flush(deadline=NOW + 1) is True


def test_concurrent_flushes_are_each_told_of_a_failure_they_cover() -> None:
    q = RecordQueue(10, 10, 60.0)  # a real clock: the flushes below really wait
    q.put(1, {"a": "1"})
    results: list[bool] = []
    deadline = time.monotonic() + 60
    flushes = [threading.Thread(target=lambda: results.append(q.flush(deadline)))
               for _ in range(2)]
    for thread in flushes:
        thread.start()
    entry = q.take()
    assert entry is not None
    q.ack(entry, delivered=False, account=_nothing)
    for thread in flushes:
        thread.join(10)
    assert results == [False, False]


def test_failures_without_a_flush_take_constant_memory() -> None:
    q = make_queue()
    for _ in range(100_000):  # a rejected key: every record fails, and nobody flushes
        q.put_failed()
    assert len(q._failed) == 1  # white-box: what keeps a long outage from growing memory
    assert q.flush(deadline=NOW + 1) is False


def test_a_closed_queue_refuses_and_reports_what_was_left() -> None:
    q = make_queue()
    q.put(1, {"a": "1"})
    q.put(2, {"a": "1"})
    q.flush(deadline=NOW)
    in_flight = q.take()
    assert in_flight is not None and in_flight.request_id == 1
    left = q.close()
    assert sorted(e.request_id for e in left) == [1, 2]  # in flight or not, given up and told
    assert q.put(3, {"a": "1"}) is False
    assert q.take() is None
    assert q.flush(deadline=NOW + 1) is False
    # The abandoned POST finishing later is not counted a second time.
    counted: list[int] = []
    q.ack(in_flight, delivered=True, account=lambda: counted.append(1))
    assert counted == []


def test_overflow_drops_the_newest_counts_and_logs_once(
    server: TrackMetadataServer, make_pipeline: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    max_queue = 5
    server.gate = threading.Event()  # the server holds every request until we open it
    p = make_pipeline(max_queue_size=max_queue, max_export_batch_size=max_queue,
                      max_concurrency=1, request_timeout_s=30)
    send(p, 0, {"n": "0"})
    assert server.waiting.acquire(timeout=10)  # the only sender is stuck on request 0
    for rid in range(1, 21):
        send(p, rid, {"n": str(rid)})
    stats = p.settled_stats()
    assert (stats["queued"], stats["dropped.queue_full"]) == (1 + max_queue, 20 - max_queue)
    assert sum("queue full" in r.getMessage() for r in caplog.records) == 1

    server.gate.set()
    assert p.flush() is False  # some records were dropped: the flush says so
    assert server.metadata == {rid: {"n": str(rid)} for rid in range(1 + max_queue)}


def test_stats_has_every_standard_counter_from_the_start(make_pipeline: Any) -> None:
    stats = make_pipeline().processor.stats()
    for name in ("queued", "delivered", "retried", "dropped.queue_full",
                 "dropped.retries_exhausted", "dropped.rejected", "dropped.unauthorized",
                 "dropped.shutdown", "dropped.backlog", "truncated_values",
                 "ignored_request_ids"):
        assert stats[name] == 0, name


class _SenderInsideTheLock:
    """A sender stuck inside the queue's lock: its `ack` accounting blocks until `release`."""

    def __init__(self, q: RecordQueue) -> None:
        q.put("held", {"a": "1"})
        q.flush(deadline=time.monotonic())  # makes it due
        entry = q.take()
        assert entry is not None
        self.inside, self.release = threading.Event(), threading.Event()

        def account() -> None:
            self.inside.set()
            self.release.wait(30)

        self.thread = threading.Thread(target=q.ack, args=(entry, True, account))
        self.thread.start()
        assert self.inside.wait(10)

    def end(self) -> None:
        self.release.set()
        self.thread.join(10)


def test_put_never_waits_for_a_lock_a_sender_holds() -> None:
    q = RecordQueue(100, 100, 60.0)
    sender = _SenderInsideTheLock(q)
    try:
        done = threading.Event()
        results: list[bool] = []

        def worker() -> None:  # the lineage worker, emitting records
            results.extend(q.put(rid, {"n": str(rid)}) for rid in range(50))
            q.put(3, {"m": "later"})  # an update coalesces once folded in
            q.put_failed()
            done.set()

        threading.Thread(target=worker, daemon=True).start()
        assert done.wait(10), "put waited for the lock the sender holds"
        assert results == [True] * 50
    finally:
        sender.end()
    # What was handed over while the lock was held is in the queue, in order, coalesced.
    assert q.flush(deadline=time.monotonic()) is False  # nothing sent yet (and one refusal)
    taken = [q.take() for _ in range(50)]
    assert [e.request_id for e in taken if e] == list(range(50))
    assert taken[3] is not None and taken[3].metadata == {"n": "3", "m": "later"}


def test_flush_honours_its_deadline_while_a_sender_holds_the_lock() -> None:
    q = RecordQueue(10, 10, 60.0)
    sender = _SenderInsideTheLock(q)
    try:
        results: list[bool] = []
        flush = threading.Thread(target=lambda: results.append(
            q.flush(deadline=time.monotonic() + 0.2)), daemon=True)
        flush.start()
        flush.join(10)
        assert results == [False]  # it returned, told the truth, and did not wait for the lock
    finally:
        sender.end()
    assert q.flush(deadline=time.monotonic() + 10) is True  # the held record was delivered


def test_a_waiting_flush_is_woken_once_not_after_every_post(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import otel_metadata.queue as queue_module

    wakes: list[int] = []
    wake = queue_module._Parked.wake

    def counted(self: Any) -> None:
        wakes.append(id(self))
        wake(self)

    monkeypatch.setattr(queue_module._Parked, "wake", counted)
    q = RecordQueue(100, 100, 60.0)
    for rid in range(40):
        q.put(rid, {"a": "1"})
    results: list[bool] = []
    flush = threading.Thread(target=lambda: results.append(q.flush(time.monotonic() + 30)))
    flush.start()
    assert wait_for(lambda: len(q._flushes) == 1)  # white-box: the flush is waiting
    me = q._flushes[0].parked
    for _ in range(40):  # one sender delivers them one by one
        entry = q.take()
        assert entry is not None
        q.ack(entry, delivered=True, account=_nothing)
    flush.join(10)
    assert results == [True]
    assert wakes.count(id(me)) == 1


class _Counting:
    """A waiter that only counts its wake-ups (as delivery's loop would be woken)."""

    def __init__(self) -> None:
        self.woken = 0

    def wake(self) -> None:
        self.woken += 1


def test_a_full_batch_goes_out_whole_and_wakes_the_waiter_once() -> None:
    q = RecordQueue(100, max_batch=4, delay_s=60.0, clock=lambda: NOW)
    waiter = _Counting()
    q.put(1, {"a": "1"})
    assert q.take_nowait(waiter) == 60.0  # not due before the delay: the waiter times it
    for rid in (2, 3):
        q.put(rid, {"a": "1"})
    assert waiter.woken == 0  # later entries are due later: no wake-up for them
    q.put(4, {"a": "1"})  # the batch is full
    assert waiter.woken == 1
    taken = []
    for _ in range(6):
        got = q.take_nowait(waiter)
        if not isinstance(got, float):
            assert got is not None
            taken.append(got.request_id)
            if len(taken) <= 2:
                q.put(10 + len(taken), {"a": "1"})  # arriving while the batch goes out
    # The four of the full batch, not one record per put while the queue hovers at four.
    assert taken == [1, 2, 3, 4] and q.take_nowait(waiter) == 60.0
