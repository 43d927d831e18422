"""Delivery at scale: concurrency that follows the API's answers, no loss at a joinable rate."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from conftest import send, wait_for

from otel_metadata.delivery import AdaptiveConcurrency
from otel_metadata.testing.track_metadata import Faults, TrackMetadataServer


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _round_trip(limit: AdaptiveConcurrency, clock: Clock, status: int | None,
                rtt: float = 0.05) -> None:
    """One POST through `limit` that takes `rtt` and ends with `status`."""
    started = limit.acquire()
    clock.now += rtt
    limit.release(started, status)


@pytest.mark.parametrize("status", [429, 503, None])
def test_the_limit_halves_once_per_round_trip_on_back_pressure(status: int | None) -> None:
    clock = Clock()
    limit = AdaptiveConcurrency(64, clock)
    _round_trip(limit, clock, 200)  # the usual round trip is now known: 50 ms
    assert limit.limit == 64
    starts = [limit.acquire() for _ in range(8)]
    clock.now += 0.05
    for started in starts:  # eight overloaded answers at once are one signal
        limit.release(started, status)
    assert limit.limit == 32
    clock.now += 0.06
    _round_trip(limit, clock, status)
    assert limit.limit == 16


def _window(limit: AdaptiveConcurrency, clock: Clock, in_flight: int) -> None:
    """`in_flight` POSTs at once, each answered 200 after one round trip (50 ms)."""
    starts = [limit.acquire() for _ in range(in_flight)]
    clock.now += 0.05
    for started in starts:
        limit.release(started, 200)


def test_the_limit_grows_by_one_per_round_trip_that_reached_it() -> None:
    clock = Clock()
    limit = AdaptiveConcurrency(4, clock)
    _round_trip(limit, clock, 503)
    _round_trip(limit, clock, 503, rtt=0.06)
    assert limit.limit == 1
    grown = []
    for _ in range(5):
        _window(limit, clock, limit.limit)  # the limit is what holds the sender back
        grown.append(limit.limit)
    assert grown == [2, 3, 4, 4, 4]  # one step per round trip, capped at the maximum
    # Round trips below the limit are no reason to raise it: the load did not need more.
    _round_trip(limit, clock, 503)
    assert limit.limit == 2
    for _ in range(5):
        _window(limit, clock, 1)
    assert limit.limit == 2


def test_the_limit_halves_when_round_trips_double() -> None:
    clock = Clock()
    limit = AdaptiveConcurrency(64, clock)
    for _ in range(5):
        _round_trip(limit, clock, 200, rtt=0.05)
    assert limit.limit == 64
    _round_trip(limit, clock, 200, rtt=0.2)  # four times the usual: the API is struggling
    assert limit.limit == 32


@pytest.mark.parametrize("status", [429, 503])
def test_posts_in_flight_shrink_on_overload_and_grow_back_at_the_server(
    server: TrackMetadataServer, make_pipeline: Any, status: int,
) -> None:
    server.latency_s = 0.05  # a round trip long enough for POSTs to overlap
    server.faults = Faults(status={status: 1.0}, retry_after="0")
    p = make_pipeline(max_concurrency=16, export_timeout_millis=60_000, schedule_delay_millis=1)
    n = 150
    for rid in range(n):
        with p.tracer.start_as_current_span("llm", attributes={
                "promptlayer.request_id": rid, "promptlayer.metadata.n": str(rid)}):
            pass

    def overloaded() -> list[int]:
        return [post.in_flight for post in list(server.posts) if post.status == status]

    # At first many POSTs overlap; while every answer says "overloaded", few do.
    assert wait_for(lambda: len(overloaded()) > 40 and max(overloaded()[-15:]) <= 2, 15)
    assert max(overloaded()) > 4
    cleared_at = len(server.posts)
    server.faults = None
    assert p.flush(30_000)
    assert server.metadata == {rid: {"n": str(rid)} for rid in range(n)}
    after = [post.in_flight for post in server.posts[cleared_at:]]
    assert max(after) >= 8  # the limit grew back once the API answered well again


def test_no_loss_at_a_rate_the_worker_can_join(
    server: TrackMetadataServer, make_pipeline: Any,
) -> None:
    server.latency_s = 0.02
    p = make_pipeline(schedule_delay_millis=5000)  # delivery defaults otherwise
    n, rate = 1500, 1000.0
    start = time.monotonic()
    for i in range(n):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # pacing the app, not waiting for a result
        with p.tracer.start_as_current_span("POST /chat", attributes={"user.id": f"u{i}"}):
            with p.tracer.start_as_current_span("llm", attributes={
                    "promptlayer.request_id": i, "promptlayer.metadata.step": "answer"}):
                pass
    assert p.flush(30_000)
    stats = p.processor.stats()
    assert {k: v for k, v in stats.items() if k.startswith("dropped.") and v} == {}
    assert server.metadata == {i: {"user_id": f"u{i}", "step": "answer"} for i in range(n)}


def _senders() -> int:
    return sum(t.name.startswith("otel-metadata-sender") for t in threading.enumerate())


def test_many_posts_in_flight_cost_no_thread_each(
    server: TrackMetadataServer, make_pipeline: Any,
) -> None:
    server.gate = threading.Event()  # every request waits at the server until the gate opens
    p = make_pipeline(max_concurrency=32, schedule_delay_millis=1)
    threads = _senders()
    for rid in range(32):
        send(p, rid, {"n": str(rid)})
    for _ in range(32):  # all 32 reached the server: in flight at once
        assert server.waiting.acquire(timeout=10)
    assert _senders() == threads  # on the one loop thread there was already
    server.gate.set()
    assert p.flush()
    assert server.metadata == {rid: {"n": str(rid)} for rid in range(32)}
