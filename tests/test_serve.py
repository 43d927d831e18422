"""Fleet mode (SPEC §10): OTLP decoding, the OTLP/HTTP and OTLP/gRPC receivers, `serve`.

Clients are the SDK's real OTLP exporters (or raw HTTP/gRPC calls where a test needs a body no
exporter sends); the receiver posts to the strict local track-metadata server. The fleet, SIGTERM
and port tests run `otel-metadata serve` and the services as subprocesses.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
import requests
from conftest import API_KEY, FAST_RETRY, tcp_sockets, wait_until
from google.protobuf import json_format
from google.rpc import error_details_pb2, status_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.trace import SpanContext

from otel_metadata import config
from otel_metadata import intake as intake_module
from otel_metadata.cli import main
from otel_metadata.otlp import DecodeError, Parent, decode_json, decode_protobuf
from otel_metadata.pipeline import Pipeline
from otel_metadata.serve import MAX_BODY, Serve
from otel_metadata.testing.track_metadata import TrackMetadataServer

APPS = Path(__file__).parent / "serve_apps"
EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
PROTOBUF = {"Content-Type": "application/x-protobuf"}
JSON = {"Content-Type": "application/json"}


# -- spans as the SDK makes them, and their OTLP encodings --

_ids = iter(range(1, 1 << 30))


def sdk_span(trace_id: int, span_id: int, parent_id: int | None = None,
             attributes: dict[str, Any] | None = None,
             resource: Resource | None = None) -> ReadableSpan:
    """A finished span of the SDK's own type; a parent from another process (remote)."""
    return ReadableSpan(
        "span", context=SpanContext(trace_id, span_id, is_remote=False),
        parent=SpanContext(trace_id, parent_id, is_remote=True) if parent_id else None,
        attributes=attributes, resource=resource or Resource.create({}),
        start_time=1, end_time=2)


def request_trace(request_id: int, user: str = "alice", *, root: bool = True,
                  resource: Resource | None = None, **extra: Any) -> list[ReadableSpan]:
    """A request span under a handler span carrying `user.id`. Without the handler: an orphan
    whose trace never completes, carrying its own conversation ID."""
    trace_id, handler, llm = next(_ids) << 64 | 7, next(_ids), next(_ids)
    own = {**extra, **({} if root else {"gen_ai.conversation.id": f"c{request_id}"})}
    spans = [sdk_span(trace_id, llm, handler, {"promptlayer.request_id": request_id,
                                                "gen_ai.prompt": "secret", **own}, resource)]
    if root:
        spans.append(sdk_span(trace_id, handler, None, {"user.id": user}, resource))
    return spans


def protobuf_body(spans: Sequence[ReadableSpan]) -> bytes:
    return encode_spans(spans).SerializeToString()


def otlp_json(message: ExportTraceServiceRequest) -> dict[str, Any]:
    """OTLP/JSON of a request: protobuf's JSON mapping, with hex IDs and integer enums."""
    doc = json_format.MessageToDict(message, use_integers_for_enums=True)
    for resource_spans in doc.get("resourceSpans", []):
        for scope_spans in resource_spans.get("scopeSpans", []):
            for span in scope_spans.get("spans", []):
                for key in ("traceId", "spanId", "parentSpanId"):
                    if key in span:
                        span[key] = base64.b64decode(span[key]).hex()
    return doc


# -- decoding (pure functions) --

_scalars = st.one_of(st.text(), st.booleans(), st.integers(-(2**63), 2**63 - 1),
                     st.floats(allow_nan=False))
_values = st.one_of(_scalars, st.lists(st.text(), max_size=3), st.lists(st.booleans(), max_size=3),
                    st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3),
                    st.lists(st.floats(allow_nan=False), max_size=3))
_attributes = st.dictionaries(st.text(min_size=1, max_size=20), _values, max_size=6)
_trace_ids = st.integers(1, 2**128 - 1)
_span_ids = st.integers(1, 2**64 - 1)


def _attribute_value(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


@st.composite
def _sdk_batches(draw: st.DrawFn) -> list[ReadableSpan]:
    resources = [Resource(draw(_attributes)) for _ in range(draw(st.integers(1, 2)))]
    return [sdk_span(draw(_trace_ids), draw(_span_ids), draw(st.none() | _span_ids),
                     draw(_attributes), draw(st.sampled_from(resources)))
            for _ in range(draw(st.integers(1, 4)))]


def _expected(spans: Sequence[ReadableSpan]) -> list[tuple[Any, ...]]:
    return sorted(((s.context.trace_id, s.context.span_id,
                   Parent(s.context.trace_id, s.parent.span_id, False) if s.parent else None,
                   {k: _attribute_value(v) for k, v in (s.attributes or {}).items()},
                   dict(s.resource.attributes)) for s in spans), key=repr)


def _got(spans: Sequence[Any]) -> list[tuple[Any, ...]]:
    return sorted(((s.trace_id, s.span_id, s.parent, s.attrs, dict(s.resource.attributes))
                   for s in spans), key=repr)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_sdk_batches())
def test_protobuf_round_trip_from_the_sdk_encoder(spans: list[ReadableSpan]) -> None:
    """What the SDK's OTLP encoder writes decodes to the same IDs, attributes and resources;
    a parent is never remote for lineage here (the receiver sees every service's spans)."""
    decoded = decode_protobuf(protobuf_body(spans))
    assert decoded.rejected == 0
    assert _got(decoded.spans) == _expected(spans)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_sdk_batches(), st.booleans())
def test_otlp_json_decodes_as_the_protobuf_does(spans: list[ReadableSpan], upper: bool) -> None:
    """OTLP/JSON: hex IDs (either case), int64 as decimal strings, integer enums."""
    doc = otlp_json(encode_spans(spans))
    body = json.dumps(doc)
    if upper:
        body = re.sub(r'"(traceId|spanId|parentSpanId)": "([0-9a-f]+)"',
                      lambda m: f'"{m[1]}": "{m[2].upper()}"', body)
    decoded = decode_json(body.encode())
    assert decoded.rejected == 0
    assert _got(decoded.spans) == _expected(spans)


def _proto_request(values: dict[str, AnyValue]) -> bytes:
    request = encode_spans([sdk_span(5, 6)])
    span = request.resource_spans[0].scope_spans[0].spans[0]
    span.attributes.extend(KeyValue(key=k, value=v) for k, v in values.items())
    return request.SerializeToString()


def _any(**kwargs: Any) -> AnyValue:
    return json_format.ParseDict(kwargs, AnyValue())


STRINGIFIED = {  # AnyValue (protobuf JSON form) -> the attribute value (SPEC §5)
    "kv": ({"kvlistValue": {"values": [
        {"key": "plan", "value": {"stringValue": "pro"}},
        {"key": "seats", "value": {"intValue": "3"}},
        {"key": "raw", "value": {"bytesValue": "AAE="}}]}},
        '{"plan": "pro", "seats": 3, "raw": "AAE="}'),
    "bytes": ({"bytesValue": base64.b64encode(b"\x00\xffid").decode()}, "AP9pZA=="),
    "mixed": ({"arrayValue": {"values": [{"stringValue": "a"}, {"intValue": "1"}]}}, '["a", 1]'),
    "nested": ({"arrayValue": {"values": [{"arrayValue": {"values": [{"boolValue": True}]}}]}},
               "[[true]]"),
    "array": ({"arrayValue": {"values": [{"doubleValue": 1.5}, {"doubleValue": 2}]}},
              (1.5, 2.0)),
    "int": ({"intValue": "-9223372036854775808"}, -(2**63)),
}


@pytest.mark.parametrize("kind", sorted(STRINGIFIED))
def test_values_an_attribute_cannot_hold_are_stringified(kind: str) -> None:
    any_value, expected = STRINGIFIED[kind]
    proto = decode_protobuf(_proto_request({"v": _any(**any_value), "empty": AnyValue()}))
    doc = otlp_json(ExportTraceServiceRequest.FromString(_proto_request({"v": _any(**any_value)})))
    doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["attributes"].append(
        {"key": "empty", "value": {}})
    from_json = decode_json(json.dumps(doc))
    for decoded in (proto, from_json):
        assert decoded.spans[0].attrs == {"v": expected}  # an empty value carries nothing


def test_otlp_json_forms_of_numbers_and_unknown_fields() -> None:
    body = {"resourceSpans": [{"futureField": 1, "resource": {"attributes": [
        {"key": "promptlayer.metadata.env", "value": {"stringValue": "prod"}}]},
        "scopeSpans": [{"scope": {"name": "x"}, "spans": [{
            "traceId": "0AF7651916CD43DD8448EB211C80319C", "spanId": "b7ad6b7169203331",
            "parentSpanId": "", "kind": 2, "status": {"code": 1}, "unknown": {"a": [1]},
            "attributes": [
                {"key": "n", "value": {"intValue": 42}},
                {"key": "s", "value": {"intValue": "-7"}},
                {"key": "nan", "value": {"doubleValue": "NaN"}},
                {"key": "inf", "value": {"doubleValue": "-Infinity"}},
                {"key": "d", "value": {"doubleValue": 3}},
                {"key": "x", "value": {"stringValue": "ok", "later": 1}}]}]}]}]}
    (span,) = decode_json(json.dumps(body)).spans
    assert span.trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    assert span.span_id == 0xB7AD6B7169203331 and span.parent is None
    attrs = dict(span.attrs or {})
    assert attrs.pop("nan") != attrs.pop("nan", 0.0)  # NaN
    assert attrs == {"n": 42, "s": -7, "inf": float("-inf"), "d": 3.0, "x": "ok"}
    assert dict(span.resource.attributes) == {"promptlayer.metadata.env": "prod"}


def test_spans_with_invalid_ids_are_rejected_and_the_rest_kept() -> None:
    good = sdk_span(11, 12, None, {"user.id": "u"})
    request = encode_spans([good, sdk_span(11, 13), sdk_span(11, 14, 12)])
    spans = request.resource_spans[0].scope_spans[0].spans
    spans[1].trace_id = b"\x01" * 8  # 8 bytes: not a trace ID
    spans[2].span_id = b"\x00" * 8
    decoded = decode_protobuf(request.SerializeToString())
    assert [s.span_id for s in decoded.spans] == [12]
    assert decoded.rejected == 2 and "invalid ID" in decoded.error

    doc = otlp_json(encode_spans([good, sdk_span(11, 13)]))
    doc["resourceSpans"][0]["scopeSpans"][0]["spans"][1]["spanId"] = base64.b64encode(
        (13).to_bytes(8, "big")).decode()  # base64, as json_format would write it: not OTLP
    decoded = decode_json(json.dumps(doc))
    assert [s.span_id for s in decoded.spans] == [12]
    assert decoded.rejected == 1 and "hex" in decoded.error


BAD_JSON = [
    b"{not json", b"[]", b'{"resourceSpans": {}}', b'{"resourceSpans": [1]}',
    json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [{
        "traceId": "01" * 16, "spanId": "01" * 8, "attributes": {}}]}]}]}).encode(),
    *(json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [{
        "traceId": "01" * 16, "spanId": "01" * 8,
        "attributes": [{"key": "k", "value": value}]}]}]}]}).encode()
      for value in ({"stringValue": 1}, {"intValue": "1.5"}, {"intValue": "99999999999999999999"},
                    {"boolValue": "true"}, {"doubleValue": "fast"}, {"bytesValue": "!!"},
                    {"arrayValue": {"values": 1}})),
    json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [{
        "traceId": "01" * 16, "spanId": "01" * 8, "attributes": [{"value": {}}]}]}]}]}).encode(),
]


@pytest.mark.parametrize("body", BAD_JSON)
def test_bad_json_bodies_raise_decode_error(body: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_json(body)


@pytest.mark.parametrize("body", [b"\xff\xff\xff", b"\x0a\x05abc", protobuf_body(
    [sdk_span(1, 2)])[:-3]])
def test_bad_protobuf_bodies_raise_decode_error(body: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_protobuf(body)


def test_a_resource_sent_again_is_the_same_object() -> None:
    """Every request of a service carries its resource; the pipeline maps each object once."""
    resource = Resource({"service.name": "b", "promptlayer.metadata.env": "prod"})
    first = decode_protobuf(protobuf_body([sdk_span(1, 2, None, None, resource)]))
    again = decode_protobuf(protobuf_body([sdk_span(3, 4, None, None, resource)]))
    assert first.spans[0].resource is again.spans[0].resource


# -- the receiver, in this process, posting to the local server --


class Receiving:
    """A running `Serve` on ephemeral ports, with its HTTP and gRPC endpoints."""

    def __init__(self, serve: Serve) -> None:
        self.serve = serve
        self.url = f"http://127.0.0.1:{serve.http_port}"
        self.traces_url = self.url + "/v1/traces"
        self.grpc_target = f"127.0.0.1:{serve.grpc_port}"

    def grpc_export(self, body: bytes, timeout: float = 10) -> tuple[bytes, Any]:
        """A raw TraceService/Export call with `body`: (response bytes, call)."""
        with grpc.insecure_channel(self.grpc_target) as channel:
            call = channel.unary_unary(EXPORT)
            return call.with_call(body, timeout=timeout)  # type: ignore[no-any-return]


class GatedPipeline:
    """A real pipeline whose intake reports no room while `open` is clear (a full hand-off)."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.open = threading.Event()
        self.open.set()

    @property
    def intake(self) -> GatedPipeline:
        return self

    def room(self) -> int:
        return self.pipeline.intake.room() if self.open.is_set() else 0

    def ended(self, *span: Any) -> bool:
        return self.pipeline.intake.ended(*span)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.pipeline.force_flush(timeout_millis)

    def shutdown(self, timeout_s: float | None = None) -> None:
        self.pipeline.shutdown(timeout_s)

    def stats(self) -> dict[str, int]:
        return self.pipeline.stats()


@pytest.fixture
def receive(server: TrackMetadataServer,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Receiving]]:
    """Start receivers (HTTP and gRPC on ephemeral ports) over a real pipeline."""
    started: list[Serve] = []

    def start(gated: bool = False, capacity: int | None = None, **options: Any) -> Receiving:
        settings = config.resolve(**{"api_key": API_KEY, "base_url": server.base_url,
                                     "schedule_delay_millis": 20, "max_trace_wait_millis": 2000,
                                     **options})
        if capacity:
            monkeypatch.setattr(intake_module, "MAX_BACKLOG", capacity)
        pipeline: Any = Pipeline(settings, retry=FAST_RETRY)
        if gated:
            pipeline = GatedPipeline(pipeline)
        serve = Serve(pipeline, ("127.0.0.1", 0), ("127.0.0.1", 0))
        serve.start()
        started.append(serve)
        return Receiving(serve)

    yield start
    for serve in started:
        serve.stop(5.0)


def test_json_body_over_http(receive: Callable[..., Receiving],
                             server: TrackMetadataServer) -> None:
    r = receive()
    body = json.dumps(otlp_json(encode_spans(request_trace(501, "ana"))))
    answer = requests.post(r.traces_url, data=body, headers=JSON, timeout=10)
    assert answer.status_code == 200
    assert answer.headers["Content-Type"] == "application/json"
    assert answer.json() == {}  # no partial success: everything taken
    wait_until(lambda: 501 in server.metadata, what="the request's metadata")
    assert server.metadata[501] == {"user_id": "ana"}  # from its parent; never the prompt


def test_gzip_from_the_real_http_exporter_and_gzip_json(
        receive: Callable[..., Receiving], server: TrackMetadataServer) -> None:
    r = receive()
    exporter = HttpExporter(endpoint=r.traces_url, compression=Compression.Gzip)
    assert exporter.export(request_trace(511, "bo")) is SpanExportResult.SUCCESS
    exporter.shutdown()
    body = gzip.compress(json.dumps(otlp_json(encode_spans(request_trace(512, "cy")))).encode())
    answer = requests.post(r.traces_url, data=body, timeout=10,
                           headers={**JSON, "Content-Encoding": "gzip"})
    assert answer.status_code == 200
    wait_until(lambda: {511, 512} <= set(server.metadata), what="both requests")
    assert server.metadata[511] == {"user_id": "bo"} and server.metadata[512] == {"user_id": "cy"}


def test_the_real_grpc_exporter_with_gzip(receive: Callable[..., Receiving],
                                          server: TrackMetadataServer) -> None:
    r = receive()
    exporter = GrpcExporter(endpoint=r.grpc_target, insecure=True,
                            compression=grpc.Compression.Gzip)
    assert exporter.export(request_trace(521, "di")) is SpanExportResult.SUCCESS
    exporter.shutdown()
    wait_until(lambda: 521 in server.metadata, what="the request")
    assert server.metadata[521] == {"user_id": "di"}


_BOMB = gzip.compress(b"\0" * (MAX_BODY + 1))

BAD_HTTP = {  # name: (headers, body, status)
    "protobuf garbage": (PROTOBUF, b"\xff\xff\xff", 400),
    "json garbage": (JSON, b"{nope", 400),
    "bad gzip": ({**PROTOBUF, "Content-Encoding": "gzip"}, b"not gzip at all", 400),
    "truncated gzip": ({**JSON, "Content-Encoding": "gzip"}, gzip.compress(b"{}" * 100)[:-12],
                       400),
    "other content type": ({"Content-Type": "text/plain"}, b"hello", 415),
    "no content type": ({}, b"{}", 415),
    "other encoding": ({**JSON, "Content-Encoding": "br"}, b"{}", 415),
    "too large": (PROTOBUF, b"\0" * (MAX_BODY + 1), 413),
    "gzip bomb": ({**PROTOBUF, "Content-Encoding": "gzip"}, _BOMB, 413),
}


@pytest.mark.parametrize("name", sorted(BAD_HTTP))
def test_bad_http_input(receive: Callable[..., Receiving], server: TrackMetadataServer,
                        name: str) -> None:
    """Each is refused with its status and a google.rpc.Status in the request's content type;
    nothing reaches the pipeline."""
    headers, body, status = BAD_HTTP[name]
    r = receive()
    answer = requests.post(r.traces_url, data=body, headers=headers, timeout=30)
    assert answer.status_code == status
    if headers.get("Content-Type") == PROTOBUF["Content-Type"]:
        assert status_pb2.Status.FromString(answer.content).message
    else:
        assert json.loads(answer.content)["message"]
    assert r.serve.receiver.counts()["bad_requests"] == 1
    assert r.serve.receiver.counts()["accepted_spans"] == 0
    # The connection is still good for the next request.
    ok = requests.post(r.traces_url, data=protobuf_body(request_trace(531)), headers=PROTOBUF,
                       timeout=10)
    assert ok.status_code == 200


def test_wrong_path_is_404(receive: Callable[..., Receiving]) -> None:
    r = receive()
    assert requests.post(r.url + "/v1/logs", data=b"", headers=PROTOBUF,
                         timeout=10).status_code == 404


def test_grpc_body_that_does_not_decode_is_invalid_argument(
        receive: Callable[..., Receiving]) -> None:
    r = receive()
    with pytest.raises(grpc.RpcError) as refused:
        r.grpc_export(b"\xff\xff\xff")
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_grpc_takes_requests_up_to_20_mib(receive: Callable[..., Receiving],
                                          server: TrackMetadataServer) -> None:
    """gRPC's own default limit is 4 MiB; a Collector's batches may be larger."""
    r = receive()
    raw, _ = r.grpc_export(protobuf_body(request_trace(581, "gus", big="x" * (5 << 20))))
    assert not ExportTraceServiceResponse.FromString(raw).HasField("partial_success")
    with pytest.raises(grpc.RpcError) as refused:
        r.grpc_export(protobuf_body(request_trace(582, big="x" * MAX_BODY)))
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    wait_until(lambda: 581 in server.metadata, what="the 5 MiB request")
    assert server.metadata[581] == {"user_id": "gus"}


def _with_a_bad_span(request_id: int) -> ExportTraceServiceRequest:
    request = encode_spans([*request_trace(request_id, "ed"), sdk_span(99, 98)])
    request.resource_spans[0].scope_spans[0].spans[2].trace_id = b"short"
    return request


def test_partial_success_over_http_json_and_grpc(receive: Callable[..., Receiving],
                                                 server: TrackMetadataServer) -> None:
    """A span with an invalid ID is refused and said so; the rest of the request is taken."""
    r = receive()
    answer = requests.post(r.traces_url, data=_with_a_bad_span(541).SerializeToString(),
                           headers=PROTOBUF, timeout=10)
    assert answer.status_code == 200 and answer.headers["Content-Type"] == PROTOBUF[
        "Content-Type"]
    partial = ExportTraceServiceResponse.FromString(answer.content).partial_success
    assert partial.rejected_spans == 1 and "invalid ID" in partial.error_message

    answer = requests.post(r.traces_url, data=json.dumps(otlp_json(_with_a_bad_span(542))),
                           headers=JSON, timeout=10)
    partial_json = answer.json()["partialSuccess"]
    assert int(partial_json["rejectedSpans"]) == 1 and partial_json["errorMessage"]

    raw, _ = r.grpc_export(_with_a_bad_span(543).SerializeToString())
    assert ExportTraceServiceResponse.FromString(raw).partial_success.rejected_spans == 1

    wait_until(lambda: {541, 542, 543} <= set(server.metadata), what="the three requests")
    assert all(server.metadata[i] == {"user_id": "ed"} for i in (541, 542, 543))


def _export_in_thread(exporter: Any, spans: list[ReadableSpan]) -> tuple[threading.Thread,
                                                                          list[Any]]:
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(exporter.export(spans)), daemon=True)
    thread.start()
    return thread, result


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_backpressure_the_real_exporter_retries(receive: Callable[..., Receiving],
                                                server: TrackMetadataServer,
                                                protocol: str) -> None:
    """While the hand-off has no room the request is refused whole (503 + Retry-After, or
    UNAVAILABLE + RetryInfo); the exporter waits as told and retries, and nothing is lost."""
    r = receive(gated=True)
    pipeline = r.serve.pipeline
    assert isinstance(pipeline, GatedPipeline)
    pipeline.open.clear()
    exporter: Any = (HttpExporter(endpoint=r.traces_url, timeout=20) if protocol == "http"
                     else GrpcExporter(endpoint=r.grpc_target, insecure=True, timeout=20))
    thread, result = _export_in_thread(exporter, request_trace(551, "flo"))
    wait_until(lambda: r.serve.receiver.counts()["busy_refusals"] >= 1, what="a refusal")
    assert r.serve.receiver.counts()["accepted_spans"] == 0
    pipeline.open.set()
    thread.join(30)
    assert result == [SpanExportResult.SUCCESS]
    exporter.shutdown()
    wait_until(lambda: 551 in server.metadata, what="the retried request")
    assert server.metadata[551] == {"user_id": "flo"}


def test_a_full_record_queue_is_backpressure_not_loss(
        receive: Callable[..., Receiving], server: TrackMetadataServer) -> None:
    """While PromptLayer holds every POST, the record queue fills up: further requests are
    refused as busy instead of accepted and then dropped as dropped.queue_full."""
    server.gate = threading.Event()  # the API answers nothing until the gate opens
    r = receive(max_queue_size=2, max_export_batch_size=1, max_concurrency=1)

    def post(*request_ids: int) -> requests.Response:
        spans = [s for rid in request_ids for s in request_trace(rid, f"u{rid}")]
        return requests.post(r.traces_url, data=protobuf_body(spans), headers=PROTOBUF,
                             timeout=10)

    assert post(700).status_code == 200
    assert server.waiting.acquire(timeout=10)  # the only sender is stuck on request 700
    assert post(701, 702).status_code == 200  # two records wait: the queue is full
    wait_until(lambda: r.serve.pipeline.stats()["queued"] == 3, what="the queue to fill")
    refused = post(800)
    assert refused.status_code == 503 and refused.headers["Retry-After"]
    server.gate.set()
    wait_until(lambda: len(server.metadata) == 3, what="the first requests")
    assert post(800).status_code == 200  # the sender's retry, once there is room
    wait_until(lambda: 800 in server.metadata, what="the retried request")
    assert r.serve.pipeline.stats()["dropped.queue_full"] == 0


def test_backpressure_answers_say_when_to_retry(receive: Callable[..., Receiving]) -> None:
    r = receive(gated=True)
    pipeline = r.serve.pipeline
    assert isinstance(pipeline, GatedPipeline)
    pipeline.open.clear()
    body = protobuf_body(request_trace(561))
    answer = requests.post(r.traces_url, data=body, headers=PROTOBUF, timeout=10)
    assert answer.status_code == 503 and int(answer.headers["Retry-After"]) >= 1
    with pytest.raises(grpc.RpcError) as refused:
        r.grpc_export(body)
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
    trailers = dict(refused.value.trailing_metadata())  # type: ignore[attr-defined]
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    retry = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(retry) and retry.retry_delay.seconds >= 1


def test_a_request_larger_than_the_hand_off_goes_in_parts(
        receive: Callable[..., Receiving], server: TrackMetadataServer) -> None:
    r = receive(capacity=8)
    spans = [span for i in range(15) for span in request_trace(600 + i, f"u{i}")]
    answer = requests.post(r.traces_url, data=protobuf_body(spans), headers=PROTOBUF,
                           timeout=10)
    assert answer.status_code == 200
    assert not ExportTraceServiceResponse.FromString(answer.content).HasField("partial_success")
    wait_until(lambda: len(server.metadata) == 15, what="all 15 requests")
    assert server.metadata == {600 + i: {"user_id": f"u{i}"} for i in range(15)}


def test_memory_stays_bounded_under_traces_that_never_complete(
        receive: Callable[..., Receiving], server: TrackMetadataServer) -> None:
    """Request spans whose handler never arrives hold their traces; past max_traces the oldest
    is posted with what is known and forgotten, so memory stays bounded and nothing is lost."""
    r = receive(max_traces=20, max_trace_wait_millis=60_000)
    held: list[int] = []
    for batch in range(10):
        spans = [s for i in range(30) for s in request_trace(1000 + batch * 30 + i, root=False)]
        answer = requests.post(r.traces_url, data=protobuf_body(spans), headers=PROTOBUF,
                               timeout=10)
        assert answer.status_code == 200
        held.append(r.serve.pipeline.stats()["held_traces"])
    assert max(held) <= 20
    wait_until(lambda: r.serve.pipeline.stats()["traces_evicted"] >= 280,
             what="the join to evict the oldest traces")
    wait_until(lambda: len(server.metadata) >= 280, what="the evicted requests' posts")
    assert server.metadata[1000] == {"conversation_id": "c1000"}


def test_health(receive: Callable[..., Receiving]) -> None:
    r = receive()
    answer = requests.get(r.url + "/health", timeout=10)
    assert answer.status_code == 200 and answer.json()["status"] == "ok"
    r.serve.receiver.close()
    answer = requests.get(r.url + "/health", timeout=10)
    assert answer.status_code == 503 and answer.json()["status"] == "stopping"
    refused = requests.post(r.traces_url, data=protobuf_body(request_trace(571)),
                            headers=PROTOBUF, timeout=10)
    assert refused.status_code == 503 and "Retry-After" in refused.headers


# -- `otel-metadata serve` and the services as processes --


class ServeProcess:
    """`otel-metadata serve` in a subprocess, with the ports it announced."""

    def __init__(self, server: TrackMetadataServer, *args: str, **env: str) -> None:
        child_env = {k: v for k, v in os.environ.items()
                     if not k.startswith(("OTEL_", "PROMPTLAYER_"))}
        child_env.update(PROMPTLAYER_API_KEY=API_KEY, PROMPTLAYER_BASE_URL=server.base_url,
                         OTEL_BSP_SCHEDULE_DELAY="20", **env)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "otel_metadata.cli", "serve", *args], env=child_env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        self.http_port = self.grpc_port = 0
        expected = 2 - args.count("none")
        for _ in range(expected):
            line = self.process.stdout.readline()
            if not line:
                self.process.wait(10)
                pytest.fail(f"serve did not start: {self.process.stderr.read()}")  # type: ignore
            if m := re.search(r"OTLP/HTTP on http://[^ ]*:(\d+)/v1/traces", line):
                self.http_port = int(m[1])
            if m := re.search(r"OTLP/gRPC on [^ ]*:(\d+)$", line.strip()):
                self.grpc_port = int(m[1])

    def health(self) -> dict[str, Any]:
        return requests.get(f"http://127.0.0.1:{self.http_port}/health",  # type: ignore
                            timeout=10).json()

    def stop(self) -> tuple[int, str]:
        """SIGTERM; the exit code and what it printed after."""
        self.process.send_signal(signal.SIGTERM)
        out, _ = self.process.communicate(timeout=30)
        return self.process.returncode, out

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate(timeout=10)


@pytest.fixture
def serve_process(server: TrackMetadataServer) -> Iterator[Callable[..., ServeProcess]]:
    started: list[ServeProcess] = []

    def start(*args: str, **env: str) -> ServeProcess:
        started.append(ServeProcess(server, *args, **env))
        return started[-1]

    yield start
    for process in started:
        process.kill()


ON_EPHEMERAL_PORTS = ("--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0")


def test_fleet_lineage_across_two_services(serve_process: Callable[..., ServeProcess],
                                           server: TrackMetadataServer) -> None:
    """Service A (OTLP/HTTP) sets user.id and calls B with traceparent; B (OTLP/gRPC) makes the
    request spans. Each request gets A's user; the step set on one of B's server spans reaches
    only the request below it, never its sibling."""
    serve = serve_process(*ON_EPHEMERAL_PORTS, PROMPTLAYER_METADATA_MAX_TRACE_WAIT="3000",
                          OTEL_RESOURCE_ATTRIBUTES="promptlayer.metadata.env=prod")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PROMPTLAYER_"))}
    b = subprocess.Popen([sys.executable, str(APPS / "service_b.py"),
                          f"127.0.0.1:{serve.grpc_port}"], env={
                              **env, "OTEL_RESOURCE_ATTRIBUTES": "promptlayer.metadata.tier=b"},
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert b.stdout is not None
        b_port = int(b.stdout.readline())
        subprocess.run([sys.executable, str(APPS / "service_a.py"),
                        f"http://127.0.0.1:{serve.http_port}/v1/traces",
                        f"http://127.0.0.1:{b_port}"], env=env, check=True, timeout=60)
    finally:
        b.communicate("", timeout=30)
    wait_until(lambda: {101, 102} <= set(server.metadata), what="both requests")
    # tier: B's resource (the request spans' own); env: serve's own resource is not used.
    assert server.metadata[101] == {"user_id": "alice", "step": "first", "tier": "b"}
    assert server.metadata[102] == {"user_id": "alice", "tier": "b"}
    assert serve.stop()[0] == 0


def test_sigterm_flushes_and_exits_0(serve_process: Callable[..., ServeProcess],
                                     server: TrackMetadataServer) -> None:
    """A request held for its trace (which would wait a minute) is posted at SIGTERM."""
    serve = serve_process(*ON_EPHEMERAL_PORTS, PROMPTLAYER_METADATA_MAX_TRACE_WAIT="60000")
    exporter = HttpExporter(endpoint=f"http://127.0.0.1:{serve.http_port}/v1/traces")
    assert exporter.export(request_trace(701, root=False)) is SpanExportResult.SUCCESS
    exporter.shutdown()
    wait_until(lambda: serve.health()["accepted_spans"] == 1, what="the span taken")
    assert 701 not in server.metadata
    code, out = serve.stop()
    assert code == 0, out
    assert 701 in server.metadata and "all delivered" in out


def _listening_ports(pid: int) -> set[int]:
    """TCP ports process `pid` listens on (Linux /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return {int(fields[1].rsplit(":", 1)[1], 16) for fields in tcp_sockets()
            if fields[3] == "0A" and fields[9] in inodes}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("off", ["--grpc", "--http"])
def test_none_turns_a_port_off(serve_process: Callable[..., ServeProcess], off: str) -> None:
    on = "--http" if off == "--grpc" else "--grpc"
    serve = serve_process(on, "127.0.0.1:0", off, "none")
    port = serve.http_port or serve.grpc_port
    assert port and not (serve.http_port and serve.grpc_port)
    assert _listening_ports(serve.process.pid) == {port}
    assert serve.stop()[0] == 0


def test_cli_refuses_what_cannot_serve(monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--http", "none", "--grpc", "none"]) == 2
    assert "nothing to serve" in capsys.readouterr().out
    assert main(["serve", "--http", "127.0.0.1:0", "--grpc", "none"]) == 2  # no API key
    assert "PROMPTLAYER_API_KEY" in capsys.readouterr().out
    with pytest.raises(SystemExit) as usage:
        main(["serve", "--http", "localhost"])
    assert usage.value.code == 2


def test_check_tells_a_running_serve_a_free_port_and_a_taken_one(
        receive: Callable[..., Receiving]) -> None:
    """`otel-metadata check --serve`: each port is a running serve or free for one."""
    from otel_metadata.check import serve_ports

    r = receive()
    running = serve_ports(("127.0.0.1", r.serve.http_port), ("127.0.0.1", r.serve.grpc_port))
    assert [v.ok for v in running] == [True, True]
    assert "otel-metadata serve answers" in running[0].message
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    assert serve_ports(("127.0.0.1", port), None)[0].message.endswith("serve can listen there")
    with socket.create_server(("127.0.0.1", 0)) as other:  # listens, answers no HTTP
        taken = serve_ports(("127.0.0.1", other.getsockname()[1]), None, timeout_s=0.5)[0]
    assert not taken.ok and "not otel-metadata serve" in taken.message
    r.serve.receiver.close()
    stopping = serve_ports(("127.0.0.1", r.serve.http_port), None)[0]
    assert not stopping.ok and "health: stopping" in stopping.message
