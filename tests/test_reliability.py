"""Faults on the wire: every request ID's metadata arrives exactly, whatever the server does.

The local server injects the faults a real network has (`Faults`); the client retries what may
succeed later and gives up, counted and logged once, on what will not.
"""

from __future__ import annotations

import logging
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from conftest import API_KEY, send

from otel_metadata.testing.track_metadata import Faults, TrackMetadataServer

# -- the fault modes themselves, seen by a plain client --

def _post(server: TrackMetadataServer, session: requests.Session, timeout: float = 0.3) -> Any:
    try:
        return session.post(server.base_url + "/rest/track-metadata", timeout=timeout,
                            json={"request_id": 1, "metadata": {"k": "v"}},
                            headers={"X-API-KEY": API_KEY})
    except requests.RequestException as exc:
        return type(exc)


@pytest.mark.parametrize("code", [500, 502, 503, 504])
def test_status_faults_answer_with_that_status(server: TrackMetadataServer, code: int) -> None:
    server.faults = Faults(status={code: 1.0})
    assert _post(server, requests.Session()).status_code == code
    assert server.metadata == {}


def test_429_fault_carries_retry_after(server: TrackMetadataServer) -> None:
    server.faults = Faults(status={429: 1.0}, retry_after="7")
    answer = _post(server, requests.Session())
    assert (answer.status_code, answer.headers["Retry-After"]) == (429, "7")


def test_reset_fault_resets_the_connection_without_applying(server: TrackMetadataServer) -> None:
    server.faults = Faults(reset=1.0)
    assert _post(server, requests.Session()) is requests.ConnectionError
    assert server.metadata == {} and [p.reason for p in server.posts] == ["reset"]


def test_slow_fault_applies_the_update_but_answers_after_the_timeout(
    server: TrackMetadataServer,
) -> None:
    server.faults = Faults(slow=1.0, slow_s=5.0)
    assert _post(server, requests.Session(), timeout=0.2) is requests.ReadTimeout
    assert server.metadata == {1: {"k": "v"}}
    assert [p.reason for p in server.posts] == ["answered late"]


def test_refusal_window_resets_every_connection_then_closes(server: TrackMetadataServer) -> None:
    server.faults = Faults(refuse_for_s=0.3)
    session = requests.Session()
    assert _post(server, session) is requests.ConnectionError
    assert _post(server, session) is requests.ConnectionError
    deadline = time.monotonic() + 5
    while (answer := _post(server, session)) is requests.ConnectionError:
        assert time.monotonic() < deadline, "the refusal window never closed"
    assert answer.status_code == 200
    assert {p.reason for p in server.posts if p.status == 0} == {"refused"}


def test_scripted_faults_come_first_in_order(server: TrackMetadataServer) -> None:
    server.faults = Faults(first=(503, "reset", 429))
    session = requests.Session()
    outcomes = [_post(server, session) for _ in range(4)]
    assert [getattr(o, "status_code", o) for o in outcomes] == [
        503, requests.ConnectionError, 429, 200]


# -- the pipeline through faults: nothing lost --

# Nearly a third of all POSTs fail, in every way the server knows, after a refusal window.
FAULT_MIX = {
    "status": {500: 0.04, 502: 0.04, 503: 0.04, 504: 0.04, 429: 0.03},
    "retry_after": "1",
    "reset": 0.06,
    "slow": 0.02,
    "slow_s": 1.5,  # beyond the client's request timeout
    "refuse_for_s": 0.3,
    "seed": 7,
}
N_REQUESTS = 300


def test_hundreds_of_request_ids_through_every_fault_lose_nothing(
    server: TrackMetadataServer, make_pipeline: Any,
) -> None:
    server.faults = Faults(**FAULT_MIX)  # type: ignore[arg-type]
    # A request timeout no busy scheduler reaches: only `slow` answers time out, and those were
    # applied on arrival, so no stale POST can land after a newer one (that would be the
    # server's doing, not ours: see the idempotency test).
    p = make_pipeline(request_timeout_s=1.0, export_timeout_millis=20_000)
    ids: list[int | str] = [i if i % 2 else f"req-{i}" for i in range(N_REQUESTS)]
    expected: dict[int | str, dict[str, str]] = {}
    for rid in ids:  # first pass
        first = {"step": "1", "note": f"naïve ☃ \"{rid}\"\n\t\x01", "user": f"u{rid}"}
        send(p, rid, first)
        expected[rid] = dict(first)
    # A flush that times out gives up waiting, not records; it lets the second pass meet first
    # records in flight and in retry, so updates must wait for them, not overtake them.
    p.flush(200)
    for rid in ids:  # second pass: updates that must win over the first, retried or not
        send(p, rid, {"step": "2", "extra": "x"})
        expected[rid].update(step="2", extra="x")

    started = time.monotonic()
    flushed = p.flush(30_000)
    took = time.monotonic() - started

    assert flushed is True
    assert server.metadata == expected
    stats = p.processor.stats()
    assert stats["queued"] == 2 * N_REQUESTS
    assert {k: v for k, v in stats.items() if k.startswith("dropped") and v} == {}
    # Every fault really happened, and the client's counts match what the server saw.
    statuses, reasons = server.statuses(), {post.reason for post in server.posts}
    assert {500, 502, 503, 504, 429} <= set(statuses)
    assert {"refused", "reset", "answered late"} <= reasons
    # The transport sends again at once what a reset kept-alive connection did not answer.
    assert stats["posts"] + stats.get("resent", 0) == len(server.posts)
    answered_in_time = [x for x in server.accepted() if x.reason != "answered late"]
    assert stats["delivered"] == len(answered_in_time)
    assert stats["retried"] == stats["posts"] - stats["delivered"]
    print(f"\nfault mix {FAULT_MIX}: delivered {len(server.metadata)}/{len(expected)} request "
          f"IDs exactly; {stats['posts']} POSTs, {stats['retried']} retried, server saw "
          f"{statuses} (0 = reset/refused); final flush took {took:.2f} s")


def test_a_retry_after_a_timeout_is_idempotent(server: TrackMetadataServer, make_pipeline) -> None:
    # The first POST lands but is answered too late: the client cannot know, so it sends again.
    server.faults = Faults(first=("slow",), slow_s=3.0)
    p = make_pipeline(request_timeout_s=0.2)
    send(p, 9, {"a": "1", "b": "x"})
    assert p.flush()
    assert [(x.request_id, x.metadata, x.reason) for x in server.accepted()] == [
        (9, {"a": "1", "b": "x"}, "answered late"), (9, {"a": "1", "b": "x"}, "")]
    assert server.metadata == {9: {"a": "1", "b": "x"}}
    # The duplicate changed nothing: a later update still wins, and other keys stay.
    send(p, 9, {"a": "2"})
    assert p.flush()
    assert server.metadata == {9: {"a": "2", "b": "x"}}
    assert p.processor.stats()["retried"] == 1


def test_retry_after_is_honoured(server: TrackMetadataServer, make_pipeline) -> None:
    server.faults = Faults(first=(429,), retry_after="1")
    p = make_pipeline()
    send(p, 1, {"a": "b"})
    assert p.flush()
    refused, accepted = server.posts
    assert (refused.status, accepted.status) == (429, 200)
    assert accepted.at - refused.at >= 1.0  # the fast test policy alone would retry in 10 ms


@pytest.mark.parametrize("retry_after", ["²", "0.05", "soon"])
def test_a_429_with_any_retry_after_is_retried_not_lost(
    server: TrackMetadataServer, make_pipeline: Any, retry_after: str,
) -> None:
    """A Retry-After we cannot read ("²" passes str.isdigit) falls back to our own backoff."""
    server.faults = Faults(first=(429,), retry_after=retry_after)
    p = make_pipeline()
    send(p, 1, {"a": "b"})
    assert p.flush()
    assert server.metadata == {1: {"a": "b"}}
    assert p.processor.stats()["dropped.error"] == 0


def test_400_and_422_are_not_retried_and_logged_once_per_kind(
    server: TrackMetadataServer, make_pipeline: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    server.faults = Faults(first=(400, 422, 400, 422))
    p = make_pipeline()
    for rid in range(4):
        send(p, rid, {"a": "b"})
    assert p.flush() is False
    assert server.statuses() == {400: 2, 422: 2}  # one POST each: none retried
    stats = p.processor.stats()
    assert (stats["rejected.400"], stats["rejected.422"], stats["dropped.rejected"]) == (2, 2, 4)
    assert stats["retried"] == 0
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert sum("HTTP 400" in line for line in lines) == 1
    assert sum("HTTP 422" in line for line in lines) == 1
    # Refusals are not sticky: the next record goes through, and its flush says so.
    send(p, 99, {"a": "b"})
    assert p.flush() is True
    assert server.metadata == {99: {"a": "b"}}


def test_a_server_failing_past_the_export_timeout_drops_counted_and_logged_once(
    server: TrackMetadataServer, make_pipeline: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    server.faults = Faults(status={503: 1.0})
    p = make_pipeline(export_timeout_millis=300)
    send(p, 1, {"a": "b"})
    send(p, 2, {"a": "b"})
    assert p.flush() is False
    stats = p.processor.stats()
    assert stats["dropped.retries_exhausted"] == 2 and stats["retried"] > 0
    assert sum("giving up" in r.getMessage() for r in caplog.records) == 1


# -- deadlines: flush and shutdown never hang on the network --

def test_force_flush_honours_its_timeout_against_a_server_that_never_answers(
    server: TrackMetadataServer, make_pipeline: Any,
) -> None:
    server.gate = threading.Event()  # closed: requests wait, unanswered
    p = make_pipeline(request_timeout_s=30, export_timeout_millis=60_000)
    send(p, 1, {"a": "b"})
    started = time.monotonic()
    assert p.flush(500) is False
    took = time.monotonic() - started
    assert 0.5 <= took < 0.5 + 2.0
    # Timing out lost nothing: once the server answers, the same record is delivered.
    server.gate.set()
    assert p.flush() is True
    assert server.metadata == {1: {"a": "b"}}


class _SlowHandler(logging.Handler):
    """A log handler that blocks on the sender's "next try" line, as a slow log shipper would:
    the sender's loop is held up until `seconds` have passed."""

    def __init__(self, seconds: float) -> None:
        super().__init__(logging.DEBUG)
        self.seconds = seconds

    def emit(self, record: logging.LogRecord) -> None:
        if "next try in" in record.getMessage():
            time.sleep(self.seconds)


def test_a_retry_that_could_start_only_after_the_export_timeout_is_counted_and_told(
    server: TrackMetadataServer, make_pipeline: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    """A retry due before the record's export timeout, but held up past it (the sender's loop
    busy, here in a slow log handler): the record is given up on like any other, counted and
    told once, never dropped unsaid."""
    server.faults = Faults(first=[503])
    caplog.set_level(logging.DEBUG, logger="otel_metadata")
    # Beyond the export timeout, which leaves the 503 a second to come back in, on a busy
    # machine too (the retry is due ~10 ms after it).
    slow = _SlowHandler(1.1)
    logging.getLogger("otel_metadata").addHandler(slow)
    try:
        p = make_pipeline(export_timeout_millis=1000)
        send(p, 1, {"a": "b"})
        assert p.flush(5000) is False
    finally:
        logging.getLogger("otel_metadata").removeHandler(slow)
    stats = p.processor.stats()
    # One POST, and no retry counted: the retry never started.
    assert stats["dropped.retries_exhausted"] == 1 and stats["posts"] == 1
    assert stats["retried"] == 0
    told = [r.getMessage() for r in caplog.records if "giving up" in r.getMessage()]
    assert len(told) == 1 and "HTTP 503" in told[0], told


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield sock.getsockname()[1]


def test_a_connect_that_never_completes_is_retried_then_dropped_counted_and_told(
    make_pipeline: Any, unaccepting_port: int, caplog: pytest.LogCaptureFixture,
) -> None:
    p = make_pipeline(base_url=f"http://127.0.0.1:{unaccepting_port}",
                      export_timeout_millis=1000, request_timeout_s=0.2)
    send(p, 1, {"a": "b"})
    assert p.flush(5000) is False
    stats = p.processor.stats()
    assert stats["dropped.retries_exhausted"] == 1 and stats["retried"] >= 1
    assert stats["delivered"] == 0
    told = [r.getMessage() for r in caplog.records if "giving up" in r.getMessage()]
    assert len(told) == 1 and "ConnectTimeout" in told[0]


def test_the_sender_connects_to_the_hosts_next_address_when_one_refuses(
    server: TrackMetadataServer, make_pipeline: Any, lookups: dict[str, Any],
) -> None:
    lookups["answers"] = ["127.0.0.2", "127.0.0.1"]  # the first refuses
    p = make_pipeline(base_url=server.base_url.replace("127.0.0.1", "api.example.test"))
    for rid in range(1, 9):
        send(p, rid, {"a": "b"})
    assert p.flush() is True
    assert sorted(server.metadata) == list(range(1, 9))
    stats = p.processor.stats()
    assert stats["delivered"] == 8 and stats.get("retried", 0) == 0
    assert lookups["calls"]["api.example.test"] == 1


def test_shutdown_with_an_unreachable_server_returns_within_the_export_timeout(
    make_pipeline: Any, silent_port: int,
) -> None:
    p = make_pipeline(base_url=f"http://127.0.0.1:{silent_port}", export_timeout_millis=1000,
                      request_timeout_s=30)
    send(p, 1, {"a": "b"})
    started = time.monotonic()
    p.processor.shutdown()
    assert time.monotonic() - started < 1.0 + 1.5
    stats = p.processor.stats()
    assert stats["dropped.shutdown"] + stats["dropped.retries_exhausted"] == 1
    assert stats["delivered"] == 0
    started = time.monotonic()
    p.processor.shutdown()  # idempotent: nothing left to wait for
    assert time.monotonic() - started < 0.5


_EXIT_SCRIPT = """
import atexit, sys, time
from opentelemetry.sdk.trace import TracerProvider
from otel_metadata import MetadataSpanProcessor, set_request_id

ended = []
# Registered before the provider's own exit hook, so it runs after it (atexit is LIFO).
atexit.register(lambda: print(f"exit hooks took {time.monotonic() - ended[0]:.3f} s"))
provider = TracerProvider()
processor = MetadataSpanProcessor(base_url=sys.argv[1], export_timeout_millis=1000)
provider.add_span_processor(processor)
with provider.get_tracer("t").start_as_current_span("llm") as span:
    span.set_attribute("user.id", "u-1")
    set_request_id(1)
deadline = time.monotonic() + 10
while processor.stats()["queued"] < 1 and time.monotonic() < deadline:
    time.sleep(0.01)  # the lineage worker queues it
assert processor.stats()["queued"] == 1
ended.append(time.monotonic())
"""


@pytest.mark.parametrize("where", ["silent", "refused"])
def test_interpreter_exit_is_not_held_up_by_an_unreachable_server(
    where: str, silent_port: int, closed_port: int,
) -> None:
    port = silent_port if where == "silent" else closed_port
    env = {"PROMPTLAYER_API_KEY": API_KEY, "PATH": "/usr/bin:/bin"}
    # The bound: interpreter start-up plus the 1 s export timeout, with a wide margin.
    done = subprocess.run([sys.executable, "-c", _EXIT_SCRIPT, f"http://127.0.0.1:{port}"],
                          env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "at shutdown: dropped." in done.stderr  # the loss is told, not silent
    took = float(re.search(r"exit hooks took ([\d.]+) s", done.stdout).group(1))  # type: ignore
    assert took < 1.0 + 1.5
    print(f"\n{where}: exit hooks took {took:.3f} s")
