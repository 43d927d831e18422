"""What a review found with small scripts (issue 10); each test failed before its fix."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from types import MappingProxyType
from typing import Any

import pytest
from conftest import request_in, send, worker_stuck
from opentelemetry import baggage, context, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.sdk.trace import ReadableSpan

from otel_metadata import MetadataSpanProcessor, set_request_id
from otel_metadata.lineage import TraceJoin
from otel_metadata.testing.track_metadata import TrackMetadataServer


def _request_under_a_user_root(p: Any, request_id: int) -> None:
    with p.tracer.start_as_current_span("handler") as root:
        root.set_attribute("user.id", "u")
        with p.tracer.start_as_current_span("llm"):
            set_request_id(request_id)


@pytest.fixture
def renamed_private_fields(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """An SDK release that renamed `ReadableSpan._attributes` (its public face unchanged)."""
    original = ReadableSpan.__init__

    def init(self: ReadableSpan, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if type(self) is ReadableSpan:  # what on_end gets; the live Span keeps its own
            self._renamed = self.__dict__.pop("_attributes")  # type: ignore[attr-defined]

    def attributes(self: ReadableSpan) -> Any:
        raw = self.__dict__.get("_renamed", self.__dict__.get("_attributes"))
        return MappingProxyType(raw or {})

    monkeypatch.setattr(ReadableSpan, "__init__", init)
    monkeypatch.setattr(ReadableSpan, "attributes", property(attributes))
    yield


@pytest.mark.parametrize("when", ["before the processor starts", "after it started"])
def test_a_renamed_private_sdk_field_falls_back_to_the_public_api(
    server: TrackMetadataServer, make_pipeline: Any, request: pytest.FixtureRequest, when: str,
) -> None:
    """Defect 1: every span became an error, and force_flush still said True."""
    if when == "before the processor starts":  # the start-up probe sees it
        request.getfixturevalue("renamed_private_fields")
        p = make_pipeline()
    else:  # the probe passed; on_end meets it later
        p = make_pipeline()
        request.getfixturevalue("renamed_private_fields")
    for rid in (1, 2):
        _request_under_a_user_root(p, rid)
    assert p.flush() is True
    assert server.metadata == {1: {"user_id": "u"}, 2: {"user_id": "u"}}
    assert p.processor.stats()["errors"] == 0


def test_a_span_that_cannot_be_read_makes_the_next_flush_false(make_pipeline: Any) -> None:
    """Defect 6: `errors` (and dropped.backlog, dropped.shutdown) never made a flush False."""
    p = make_pipeline()
    p.processor.on_end(object())  # type: ignore[arg-type]  # not a span at all
    assert p.flush() is False
    assert p.processor.stats()["errors"] == 1
    assert p.flush() is True  # told once: nothing was lost since


def test_a_span_ending_after_shutdown_makes_the_loss_known(make_pipeline: Any) -> None:
    p = make_pipeline()
    p.processor.shutdown()
    send(p, 1, {"a": "b"})
    stats = p.processor.stats()
    assert (stats["dropped.shutdown"], stats["held_traces"]) == (1, 0)


def test_stats_after_shutdown_hold_no_traces(server: TrackMetadataServer,
                                             make_pipeline: Any) -> None:
    """Defect 8: `held_traces` stayed > 0 after shutdown()."""
    p = make_pipeline(max_trace_wait_millis=600_000)
    root = p.tracer.start_span("session")  # never ends: its trace is held
    with trace.use_span(root):
        _request_under_a_user_root(p, 1)
    assert p.settled_stats()["held_traces"] == 1
    p.processor.shutdown()
    assert p.processor.stats()["held_traces"] == 0
    assert server.metadata == {1: {"user_id": "u"}}  # shutdown posted what it held


def test_stats_say_what_waits_without_waiting_for_it(make_pipeline: Any) -> None:
    """Defect 9: stats() drained the hand-off on the caller's thread (up to 1 s)."""
    p = make_pipeline()
    with worker_stuck(p):
        for rid in range(3):
            send(p, rid, {"a": "b"})
        assert p.processor.stats()["backlog"] >= 3  # each request's span (and its link)
    assert p.settled_stats()["backlog"] == 0


def test_an_idle_worker_sleeps(make_pipeline: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Defect 9: the lineage worker woke every 0.5 s with nothing to do."""
    calls: list[float] = []
    expire = TraceJoin.expire

    def counting(self: TraceJoin) -> float | None:
        calls.append(time.monotonic())
        return expire(self)

    monkeypatch.setattr(TraceJoin, "expire", counting)
    make_pipeline()
    time.sleep(0.7)  # longer than the old tick; nothing happens, so nothing is waited for
    assert calls == []


def test_one_thousand_truncation_warnings_do_not_silence_the_401(
    make_pipeline: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    """Defect 5: one budget of 1 000 warned keys for every kind; then the 401 was never said."""
    with TrackMetadataServer(api_key="another-key") as other:
        p = make_pipeline(base_url=other.base_url, max_value_length=1)
        for rid in range(10):  # the SDK keeps 128 attributes per span
            send(p, rid, {f"k{rid}-{i}": "long" for i in range(101)})
        assert p.flush() is False
    assert sum("truncating" in r.getMessage() for r in caplog.records) == 1000
    assert any("HTTP 401" in r.getMessage() for r in caplog.records)


def test_baggage_seen_by_two_threads_is_never_mixed_up(
    server: TrackMetadataServer, make_pipeline: Any,
) -> None:
    """Defect 2: the baggage relevance cache was two attributes written one after the other;
    a thread switch between them made a request lose its baggage user_id.

    Every interleaving at line granularity: before each line thread A runs of `on_start`,
    thread B starts (and ends) a whole span under other baggage.
    """
    p = make_pipeline()
    code = MetadataSpanProcessor.on_start.__code__
    step, stepped = threading.Semaphore(0), threading.Semaphore(0)
    done = threading.Event()

    def other_thread() -> None:
        token = context.attach(baggage.set_baggage("http.route", "/other"))
        try:
            while step.acquire(timeout=10) and not done.is_set():
                with p.tracer.start_as_current_span("other"):
                    pass
                stepped.release()
        finally:
            context.detach(token)

    def line_by_line(frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code is not code:
            return None

        def each_line(frame: Any, event: str, arg: Any) -> Any:
            if event == "line":
                step.release()
                assert stepped.acquire(timeout=10)
            return each_line

        return each_line

    other = threading.Thread(target=other_thread)
    other.start()
    token = context.attach(baggage.set_baggage("user.id", "user"))
    try:
        sys.settrace(line_by_line)
        try:
            span = p.tracer.start_span("llm")
        finally:
            sys.settrace(None)
        with trace.use_span(span, end_on_exit=True):
            set_request_id(1)
    finally:
        context.detach(token)
        done.set()
        step.release()
        other.join(10)
    assert p.flush()
    assert server.metadata == {1: {"user_id": "user"}}


def test_baggage_properties_are_not_part_of_the_value(
    server: TrackMetadataServer, make_pipeline: Any,
) -> None:
    """Defect 7: `user.id=bob%20smith;prop=1` arrived as "bob smith;prop=1" (SPEC §5)."""
    p = make_pipeline()
    header = {"baggage": "user.id=bob%20smith;prop=1, promptlayer.metadata.plan = pro ;x;y=2"}
    request_in(p, W3CBaggagePropagator().extract(header))
    assert p.flush()
    assert server.metadata == {1: {"user_id": "bob smith", "plan": "pro"}}
