"""The app's thread only hands ended spans over; the lineage worker joins them (SPEC §7)."""

from __future__ import annotations

import threading

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanContext, TraceFlags
from test_lineage import server_wait_for, tracing_log_handler

from otel_metadata import set_request_id


def _request_under_a_user_root(p, request_id: int) -> None:
    with p.tracer.start_as_current_span("handler") as root:
        root.set_attribute("user.id", "u")
        with p.tracer.start_as_current_span("llm"):
            set_request_id(request_id)


def test_a_request_goes_out_without_a_flush_once_its_root_ends(server, make_pipeline) -> None:
    # A trace wait far beyond the test: only the worker seeing the root end can post it.
    p = make_pipeline(max_trace_wait_millis=600_000)
    _request_under_a_user_root(p, 1)
    assert server_wait_for(server, lambda: server.metadata.get(1) == {"user_id": "u"})


def test_span_end_does_not_wait_while_the_worker_is_inside_the_join(server, make_pipeline) -> None:
    p = make_pipeline()
    ended = threading.Event()

    def app() -> None:
        for rid in range(1, 51):
            _request_under_a_user_root(p, rid)
        ended.set()

    with p.processor._join._lock:  # as when the worker is busy joining a large trace
        thread = threading.Thread(target=app, daemon=True)
        thread.start()
        assert ended.wait(10), "span.end() waited for the lineage join"
    assert p.flush()
    assert server.metadata == {rid: {"user_id": "u"} for rid in range(1, 51)}


def test_stats_and_flush_count_spans_ended_just_before(server, make_pipeline) -> None:
    p = make_pipeline(max_trace_wait_millis=600_000)
    root = p.tracer.start_span("session")
    root.set_attribute("user.id", "u")
    with trace.use_span(root), p.tracer.start_as_current_span("llm"):
        set_request_id(7)
    assert p.processor.stats()["held_traces"] == 1  # waiting for its root, not lost in transit
    root.end()
    assert p.flush()
    assert server.metadata == {7: {"user_id": "u"}}


def test_a_request_ending_after_shutdown_is_counted_not_left_behind(server, make_pipeline) -> None:
    p = make_pipeline()
    llm = p.tracer.start_span("llm")
    p.processor.shutdown()
    llm.set_attribute("promptlayer.metadata.step", "late")
    set_request_id(3, llm)
    llm.end()
    stats = p.processor.stats()
    assert stats["dropped.shutdown"] == 1
    assert server.metadata == {}


def test_a_span_made_by_our_own_logging_during_a_drain_does_not_hang(make_pipeline) -> None:
    """After shutdown, spans are joined on the thread that ends them; a warning logged while
    joining reaches a handler that makes a span, which ends on that same thread."""
    p = make_pipeline()
    ended = threading.Event()
    ctx = SpanContext(trace_id=7, span_id=1, is_remote=False,
                      trace_flags=TraceFlags(TraceFlags.SAMPLED))
    # An empty request ID is ignored with a warning, logged while the span is joined.
    span = ReadableSpan(name="llm", context=ctx,
                        attributes={"promptlayer.request_id": "", "user.id": "u"})

    def app() -> None:
        p.processor.on_end(span)
        ended.set()

    with tracing_log_handler(p):
        p.processor.shutdown()
        threading.Thread(target=app, daemon=True).start()
        assert ended.wait(10), "span.end() hung in a drain of its own thread"
        assert p.processor.stats()["ignored_request_ids"] == 1
