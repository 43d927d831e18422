"""The API key stays secret (logs at DEBUG, reprs, exception messages, bodies), a key the API
rejects stops the sending with one clear line, and our own HTTP calls are never traced."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import requests
from conftest import API_KEY, send
from opentelemetry.instrumentation.requests import RequestsInstrumentor
from opentelemetry.instrumentation.urllib3 import URLLib3Instrumentor
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from otel_metadata import MetadataSpanProcessor
from otel_metadata.config import is_plain_http_to_remote, resolve
from otel_metadata.delivery import Delivery
from otel_metadata.queue import RecordQueue
from otel_metadata.stats import Stats
from otel_metadata.testing.track_metadata import Faults, TrackMetadataServer
from otel_metadata.transport import Transport

WRONG_KEY = "pl-wrong-but-secret-4f9a2c"


def _everything_logged(caplog: pytest.LogCaptureFixture) -> str:
    """Every message, argument and traceback that reached any logger."""
    parts = [caplog.text]
    for record in caplog.records:
        parts += [record.getMessage(), repr(record.args), record.exc_text or ""]
    return "\n".join(parts)


def test_the_key_is_never_logged_even_at_debug(
    server: TrackMetadataServer, make_pipeline: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, the transport's connection logs included
    server.faults = Faults(first=(503, "reset", "slow", 429), retry_after="0", slow_s=1.0)
    good = make_pipeline(request_timeout_s=0.3)
    send(good, 1, {"a": "b"})
    assert good.flush() is True
    rejected = make_pipeline(api_key=WRONG_KEY)
    send(rejected, 2, {"a": "b"})
    assert rejected.flush() is False

    logged = _everything_logged(caplog)
    assert API_KEY not in logged and WRONG_KEY not in logged
    # The test saw what it claims to: the transport's debug lines and our retry and 401 lines.
    assert any(r.name == "otel_metadata.transport" and r.levelno == logging.DEBUG
               for r in caplog.records)
    assert "next try in" in logged and "HTTP 401" in logged


def test_a_rejected_key_from_the_environment_logs_once_names_its_source_and_stops(
    server: TrackMetadataServer, make_pipeline: Any, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PROMPTLAYER_API_KEY", WRONG_KEY)
    p = make_pipeline(api_key=None, max_concurrency=8)
    for rid in range(20):  # many at once, on 8 senders
        send(p, rid, {"a": "b"})
    assert p.flush() is False
    lines = [r.getMessage() for r in caplog.records if "401" in r.getMessage()]
    assert len(lines) == 1 and "PROMPTLAYER_API_KEY" in lines[0] and WRONG_KEY not in lines[0]
    stats = p.processor.stats()
    # Only what was already in flight reached the server; every record is accounted for.
    assert server.statuses() == {401: stats["rejected.401"]} and stats["rejected.401"] <= 8
    assert stats["dropped.rejected"] + stats["dropped.unauthorized"] == 20
    send(p, 99, {"a": "b"})
    assert p.flush() is False
    assert server.statuses() == {401: stats["rejected.401"]}  # no POST after the 401


def test_the_key_is_in_no_repr() -> None:
    settings = resolve(api_key=API_KEY, base_url="http://127.0.0.1:9")
    transport = Transport(settings.endpoint, API_KEY, 1)
    delivery = Delivery(RecordQueue(1, 1, 0), transport, settings, Stats())
    processor = MetadataSpanProcessor(api_key=API_KEY, base_url="http://127.0.0.1:9")
    try:
        for thing in (settings, transport, delivery, processor):
            assert API_KEY not in repr(thing) and API_KEY not in str(thing)
        assert "the api_key argument" in repr(processor)  # where it came from, not what it is
    finally:
        delivery.shutdown(0)
        processor.shutdown()
        transport.close()


def test_an_error_that_quotes_the_key_is_redacted() -> None:
    # requests refuses a header holding a newline and quotes the value in its message; the
    # configuration never lets such a key through, and the transport redacts all the same.
    key = "pl-line\nbreak-secret"
    transport = Transport("http://127.0.0.1:9/rest/track-metadata", key, 1)
    outcome = transport.post(1, {"a": "b"}, timeout=1)
    assert outcome.status is None and outcome.error == "InvalidHeader"
    assert "break-secret" not in outcome.detail and "<redacted>" in outcome.detail
    transport.close()


def test_redaction_leaves_no_prefix_of_a_key_cut_at_the_limit() -> None:
    transport = Transport("http://127.0.0.1:9/x", API_KEY, 1)
    text = "x" * 290 + API_KEY + " tail"
    assert transport.redact(text, 300) == "x" * 290 + "<redacted>"
    assert API_KEY[:8] not in transport.redact(text, 300)
    transport.close()


@pytest.mark.parametrize("bad", ["pl-has space", "pl-tab\there", "pl-ctrl\x00", "pl-snow☃",
                                 "pl-nl\nx"])
def test_a_key_no_header_can_carry_is_ignored_without_being_echoed(
    bad: str, caplog: pytest.LogCaptureFixture,
) -> None:
    processor = MetadataSpanProcessor(api_key=bad)
    assert "cannot carry" in caplog.text and "the api_key argument" in caplog.text
    assert bad.strip() not in caplog.text and bad[3:].strip() not in caplog.text
    assert "active=False" in repr(processor)  # inert: the app runs on, nothing is sent
    processor.shutdown()


def test_the_key_is_never_in_a_body(server: TrackMetadataServer, make_pipeline: Any) -> None:
    p = make_pipeline()
    for rid in range(5):
        send(p, rid, {"user": f"u{rid}"})
    assert p.flush()
    # The server refuses (400) any body with an api_key field; none was refused, none held it.
    assert server.statuses() == {200: 5}
    assert all(API_KEY not in repr(post) for post in server.posts)


@pytest.mark.parametrize(("url", "warned"), [
    ("http://api.example.com", True),
    ("http://10.0.0.7:8080", True),
    ("https://api.example.com", False),
    ("http://127.0.0.1:9", False),
    ("http://localhost:9", False),
    ("http://[::1]:9", False),
])
def test_plain_http_to_a_remote_host_warns(
    url: str, warned: bool, caplog: pytest.LogCaptureFixture,
) -> None:
    assert is_plain_http_to_remote(url) is warned
    processor = MetadataSpanProcessor(api_key=API_KEY, base_url=url)
    processor.shutdown()
    assert ("unencrypted" in caplog.text) is warned
    assert API_KEY not in caplog.text


@pytest.fixture
def instrumented_http() -> Any:
    """requests and urllib3 instrumented (globally, as opentelemetry-instrument would)."""
    instrumentors = [RequestsInstrumentor(), URLLib3Instrumentor()]
    yield instrumentors
    for instrumentor in instrumentors:
        instrumentor.uninstrument()


def test_our_posts_are_never_traced_even_with_http_instrumentation(
    server: TrackMetadataServer, make_pipeline: Any, instrumented_http: Any,
) -> None:
    server.faults = Faults(first=(503, "reset", 429), retry_after="0")  # retries too
    p = make_pipeline()
    spans = InMemorySpanExporter()
    p.provider.add_span_processor(SimpleSpanProcessor(spans))
    for instrumentor in instrumented_http:
        instrumentor.instrument(tracer_provider=p.provider)

    requests.get(server.base_url + "/health", timeout=5)  # the app's own call: traced
    for rid in range(10):
        send(p, rid, {"a": "b"})
    assert p.flush() is True
    assert len(server.posts) == 13

    finished = spans.get_finished_spans()
    http_spans = [s for s in finished if s.name != "llm"]
    assert http_spans, "the instrumentation traced nothing: this test would prove nothing"
    assert all(s.name.startswith("GET") for s in http_spans)
    assert not any("/rest/track-metadata" in str(v)
                   for s in finished for v in (s.attributes or {}).values())
