"""The app's thread only hands ended spans over; the lineage worker joins them (SPEC §7)."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
from conftest import wait_for, worker_stuck
from opentelemetry import trace

from otel_metadata import intake as intake_module
from otel_metadata import metadata_context, set_request_id


def _request_under_a_user_root(p, request_id: int) -> None:
    with p.tracer.start_as_current_span("handler") as root:
        root.set_attribute("user.id", "u")
        with p.tracer.start_as_current_span("llm"):
            set_request_id(request_id)


def _requests_on_an_app_thread(p, count: int) -> threading.Event:
    """Start a thread making requests 1..count under user roots; the event is set when done."""
    ended = threading.Event()

    def app() -> None:
        for rid in range(1, count + 1):
            _request_under_a_user_root(p, rid)
        ended.set()

    threading.Thread(target=app, daemon=True).start()
    return ended


def test_a_request_goes_out_without_a_flush_once_its_root_ends(server, make_pipeline) -> None:
    # A trace wait far beyond the test: only the worker seeing the root end can post it.
    p = make_pipeline(max_trace_wait_millis=600_000)
    _request_under_a_user_root(p, 1)
    assert wait_for(lambda: server.metadata.get(1) == {"user_id": "u"})


def test_span_end_does_not_wait_while_the_worker_is_stuck_in_a_pass(server, make_pipeline) -> None:
    p = make_pipeline()
    with worker_stuck(p):
        ended = _requests_on_an_app_thread(p, 50)
        assert ended.wait(10), "span.end() waited for the lineage join"
    assert p.flush()
    assert server.metadata == {rid: {"user_id": "u"} for rid in range(1, 51)}


def test_stats_and_flush_count_spans_ended_just_before(server, make_pipeline) -> None:
    p = make_pipeline(max_trace_wait_millis=600_000)
    root = p.tracer.start_span("session")
    root.set_attribute("user.id", "u")
    with trace.use_span(root), p.tracer.start_as_current_span("llm"):
        set_request_id(7)
    assert p.settled_stats()["held_traces"] == 1  # waiting for its root, not lost in transit
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


def test_a_log_handler_calling_back_into_the_processor_does_not_stall_it(
        server, make_pipeline) -> None:
    """A log shipper that flushes telemetry on every record, reached by a warning we log while
    joining spans on the worker thread."""
    p = make_pipeline(max_trace_wait_millis=600_000)

    class FlushingHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            p.processor.force_flush(600_000)

    handler = FlushingHandler()
    logging.getLogger("otel_metadata").addHandler(handler)
    try:
        with p.tracer.start_as_current_span("llm") as llm:
            llm.set_attribute("promptlayer.request_id", "")  # ignored, with a warning
        _request_under_a_user_root(p, 2)
        assert wait_for(lambda: server.metadata.get(2) == {"user_id": "u"},
                               timeout=10)
    finally:
        logging.getLogger("otel_metadata").removeHandler(handler)


def test_a_bare_root_ending_while_its_request_is_being_joined_completes_it(
        server, make_pipeline) -> None:
    """The root carries nothing; it must still reach the join after its request span."""
    p = make_pipeline(max_trace_wait_millis=600_000)
    with metadata_context(user_id="u"):
        root = p.tracer.start_span("handler")
        with trace.use_span(root):
            # the worker takes the request, then is held before it joins it
            with worker_stuck(p, **{"promptlayer.request_id": 5}):
                root.end()
    assert wait_for(lambda: server.metadata.get(5, {}).get("user_id") == "u")


def test_force_flush_honours_its_timeout_while_the_worker_is_stuck(server, make_pipeline) -> None:
    p = make_pipeline()
    with worker_stuck(p):
        _request_under_a_user_root(p, 1)
        _request_under_a_user_root(p, 2)
        returned = threading.Event()
        result: list[bool] = []
        flusher = threading.Thread(target=lambda: (result.append(p.flush(200)), returned.set()))
        flusher.start()
        assert returned.wait(10), "force_flush(200) did not return while the worker was stuck"
        assert result == [False]
    assert p.flush()
    assert server.metadata == {1: {"user_id": "u"}, 2: {"user_id": "u"}}


def test_a_backlog_past_the_bound_drops_and_counts_without_waiting(
        server, make_pipeline, monkeypatch) -> None:
    monkeypatch.setattr(intake_module, "MAX_BACKLOG", 4)
    p = make_pipeline()
    with worker_stuck(p):  # the worker cannot keep up (here: cannot move at all)
        ended = _requests_on_an_app_thread(p, 20)
        assert ended.wait(10), "span.end() waited for the worker"
    assert p.flush() is False  # what was dropped is told to the next flush (SPEC §7)...
    assert p.flush() is True  # ...and to that one only
    stats = p.processor.stats()
    assert stats["dropped.backlog"] > 0
    # What reached the server has its lineage; every request that did not is counted (its own
    # span or its root's was dropped).
    assert all(md == {"user_id": "u"} for md in server.metadata.values())
    assert stats["dropped.backlog"] >= 20 - len(server.metadata) > 0


def test_a_backlog_holds_only_spans_of_traces_that_need_them(server, make_pipeline) -> None:
    """While the worker is behind, spans of traces nobody holds are not queued behind it."""
    p = make_pipeline(max_trace_wait_millis=600_000)
    with worker_stuck(p):
        root = p.tracer.start_span("session")
        root.set_attribute("user.id", "u")
        with trace.use_span(root), p.tracer.start_as_current_span("llm"):
            set_request_id(9)
        waiting = p.processor.stats()["backlog"]
        for _ in range(100):  # other traces, carrying nothing for us
            with p.tracer.start_as_current_span("GET /health"):
                pass
        assert p.processor.stats()["backlog"] == waiting
        root.end()  # its trace's root still follows its request into the join
        assert p.processor.stats()["backlog"] == waiting + 1
    assert p.flush()
    assert server.metadata[9] == {"user_id": "u"}


def test_a_lost_request_is_counted_once(server, make_pipeline, monkeypatch) -> None:
    """dropped.backlog counts request IDs, not the spans and links each lost request had."""
    monkeypatch.setattr(intake_module, "MAX_BACKLOG", 4)
    p = make_pipeline()
    with worker_stuck(p):  # the stall itself and its span fill the hand-off
        for rid in range(1, 11):
            with p.tracer.start_as_current_span("llm") as span:
                span.set_attribute("promptlayer.metadata.n", str(rid))
                set_request_id(rid)  # a link, then the span: two refusals, one request
    assert p.flush() is False
    lost = 10 - len(server.metadata)
    assert lost > 0 and p.processor.stats()["dropped.backlog"] == lost


def _lineage_wake_ups() -> int:
    """How many times the lineage worker thread has gone to sleep and woken so far (its
    voluntary context switches: every wait, a timed one or a GIL hand-over, is one)."""
    worker = next(t for t in threading.enumerate() if t.name == "otel-metadata-lineage")
    status = Path(f"/proc/self/task/{worker.native_id}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines()
                    if line.startswith("voluntary_ctxt_switches")))


linux_only = pytest.mark.skipif(not Path("/proc/self/task").is_dir(),
                                reason="reads the thread's context switches from /proc")


@linux_only
def test_the_worker_wakes_a_bounded_number_of_times_under_a_steady_stream(
        server, make_pipeline) -> None:
    """~2 000 traces/s for a second, each handing its handler span over: the worker passes
    a few dozen times (a wake-up costs more CPU than the pass), not once per few spans."""
    p = make_pipeline(max_trace_wait_millis=600_000)
    _request_under_a_user_root(p, 1)
    assert p.flush()
    before, start = _lineage_wake_ups(), time.monotonic()
    traces = 0
    while time.monotonic() - start < 1.0:
        for _ in range(20):
            traces += 1
            with p.tracer.start_as_current_span("handler") as root:
                root.set_attribute("user.id", f"u{traces}")
                with p.tracer.start_as_current_span("llm"):
                    if traces % 10 == 0:
                        set_request_id(1 + traces // 10)
        time.sleep(0.01)  # pacing the stream, not waiting for anything
    wake_ups = (_lineage_wake_ups() - before) / (time.monotonic() - start)
    assert p.flush()
    assert len(server.metadata) == 1 + traces // 10  # the worker joined the whole stream
    assert server.metadata[1 + traces // 10] == {"user_id": f"u{traces // 10 * 10}"}
    assert wake_ups <= 40, f"{wake_ups:.0f} wake-ups/s over {traces} traces"


@linux_only
def test_an_idle_worker_with_nothing_held_sleeps_without_waking(server, make_pipeline) -> None:
    p = make_pipeline(max_trace_wait_millis=100)
    _request_under_a_user_root(p, 1)
    assert wait_for(lambda: server.metadata.get(1) == {"user_id": "u"})
    assert wait_for(lambda: p.processor.stats()["held_traces"] == 0)  # its linger is over
    before = _lineage_wake_ups()
    time.sleep(0.3)  # the window observed: a periodic wake-up would show several times
    assert _lineage_wake_ups() - before <= 1  # the one that put it to sleep, at most


def test_sources_wake_a_gathering_worker_only_when_the_hand_off_fills(
        server, make_pipeline, monkeypatch) -> None:
    """With a gather period longer than the test, only a hand-off past a quarter of
    MAX_BACKLOG can start the next pass."""
    monkeypatch.setattr(intake_module, "MAX_BACKLOG", 64)
    monkeypatch.setattr(intake_module, "GATHER_S", 600.0)
    p = make_pipeline(max_trace_wait_millis=600_000)

    def roots(count: int) -> None:
        for _ in range(count):
            with p.tracer.start_as_current_span("handler") as root:
                root.set_attribute("user.id", "u")

    roots(1)  # wakes the idle worker, whose pass finds spans: it gathers from then on
    assert wait_for(lambda: p.processor.stats()["backlog"] == 0)
    roots(10)
    time.sleep(0.3)  # the window observed: a hand-off that woke the worker would show
    assert p.processor.stats()["backlog"] == 10
    roots(10)  # 20 waiting: past 64 // 4
    assert wait_for(lambda: p.processor.stats()["backlog"] == 0)
