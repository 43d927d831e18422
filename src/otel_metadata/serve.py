"""`otel-metadata serve`: an OTLP trace receiver that the OpenTelemetry Collector feeds (SPEC §10).

Spans decoded from OTLP/gRPC (`TraceService/Export`) and OTLP/HTTP (`POST /v1/traces`, protobuf
or JSON, gzip or deflate) enter one pipeline (join, queue, delivery) built from the same settings
and environment variables as the processor. Behind the Collector's `load_balancing` exporter
(`routing_key: traceID`) every span of a trace reaches one instance, so a request inherits
metadata from every service of its trace.

A request is taken whole or not at all: when the pipeline's hand-off has no room for all of its
spans, the answer is HTTP 503 with `Retry-After`, or gRPC `UNAVAILABLE` with a `RetryInfo`, and
the sender retries; nothing is accepted and then dropped. Spans refused for what they are
(invalid IDs) are reported as OTLP partial success.

OTLP/HTTP runs on the standard library's threading HTTP server: a receiver behind a Collector
serves a few long-lived connections, its cost is decoding and joining (bound by the GIL whatever
the server), and no further dependency is needed. `GET /health` on the HTTP port answers 200
while the receiver takes spans and 503 once it is stopping.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import sys
import threading
import time
import zlib
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any, Protocol, TextIO

import grpc
from google.protobuf import json_format
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTracePartialSuccess,
    ExportTraceServiceResponse,
)

from . import config
from .otlp import Decoded, DecodeError, decode_json, decode_protobuf
from .pipeline import Pipeline

_logger = logging.getLogger("otel_metadata")

MAX_BODY = 20 * 1024 * 1024  # bytes, compressed or not (OTLP receivers' usual limit)
RETRY_AFTER_S = 1  # what a refused sender is told to wait
# A request larger than the whole hand-off is fed in parts as room frees up, for this long.
_LARGE_REQUEST_WAIT_S = 2.0
# Bytes of an oversized body read and discarded after the 413, so the sender can read it.
_MAX_DISCARD = 64 * 1024 * 1024
_SOCKET_TIMEOUT_S = 30.0
_GRPC_WORKERS = 4
_GRPC_SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
_PROTOBUF = "application/x-protobuf"
_JSON = "application/json"


class IntakeLike(Protocol):
    """What the receiver needs of `otel_metadata.intake.Intake`."""

    def ended(self, trace_id: int, span_id: int, parent: Any, attrs: Any, started: Any,
              resource: Any) -> bool: ...

    def room(self) -> int: ...


class PipelineLike(Protocol):
    """What `serve` needs of `otel_metadata.pipeline.Pipeline`."""

    @property
    def intake(self) -> IntakeLike: ...

    def force_flush(self, timeout_millis: int = ...) -> bool: ...

    def shutdown(self, timeout_s: float | None = None) -> None: ...

    def stats(self) -> dict[str, int]: ...


@dataclass(frozen=True)
class Outcome:
    """What became of one export request. `busy`: refused whole, the sender should retry."""

    busy: bool
    rejected: int = 0
    error: str = ""


class Receiver:
    """Feeds decoded requests to the intake, whole or not at all; shared by both protocols."""

    def __init__(self, intake: IntakeLike, clock: Callable[[], float] = time.monotonic) -> None:
        self._intake = intake
        self._clock = clock
        self._lock = threading.Lock()  # one request fed at a time: room() then ended()
        self._count_lock = threading.Lock()  # not held while feeding: /health never waits
        self._capacity = intake.room()  # the hand-off is empty now
        self._closed = False
        self._counts = {"accepted_spans": 0, "rejected_spans": 0, "busy_refusals": 0,
                        "bad_requests": 0}

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Refuse further requests (as busy); returns once a request being fed is done."""
        with self._lock:
            self._closed = True

    def counts(self) -> dict[str, int]:
        return dict(self._counts)

    def bad_request(self) -> None:
        with self._count_lock:
            self._counts["bad_requests"] += 1

    def accept(self, decoded: Decoded) -> Outcome:
        spans = decoded.spans
        with self._lock:
            room = self._intake.room()
            self._capacity = max(self._capacity, room)
            # Too large for the hand-off even when empty: fed in parts as room frees up.
            fed = self._feed(spans, room) if not self._closed and (
                room >= len(spans) or len(spans) > self._capacity) else 0
        refused = len(spans) - fed
        with self._count_lock:
            if fed == 0 and spans:
                self._counts["busy_refusals"] += 1
                return Outcome(busy=True)
            self._counts["accepted_spans"] += fed
            self._counts["rejected_spans"] += decoded.rejected + refused
        error = decoded.error
        if refused and not error:
            error = (f"{refused} of {len(spans)} spans refused: the request is larger than the "
                     f"receiver's hand-off ({self._capacity} spans) could take in "
                     f"{_LARGE_REQUEST_WAIT_S:g} s; lower the Collector's send_batch_max_size")
        return Outcome(busy=False, rejected=decoded.rejected + refused, error=error)

    def _feed(self, spans: list[Any], room: int) -> int:
        """Hand `spans` to the intake, `room` first; a request larger than the hand-off goes in
        parts as the worker frees room, within `_LARGE_REQUEST_WAIT_S`. Returns how many were
        taken."""
        ended = self._intake.ended
        deadline = self._clock() + _LARGE_REQUEST_WAIT_S
        fed = 0
        while True:
            for span in spans[fed:fed + room]:
                if not ended(span.trace_id, span.span_id, span.parent, span.attrs, None,
                             span.resource):
                    return fed  # shutting down under us: the rest are reported as rejected
                fed += 1
            if fed == len(spans) or self._clock() >= deadline:
                return fed
            time.sleep(0.005)  # the worker joins what was handed over; bounded by `deadline`
            room = self._intake.room()


# -- OTLP/HTTP --


class HttpError(Exception):
    """An HTTP answer other than 200: status, message, extra headers."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None,
                 close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.headers = dict(headers or {})
        self.close = close


_GRPC_CODE_OF_STATUS = {400: code_pb2.INVALID_ARGUMENT, 404: code_pb2.NOT_FOUND,
                        411: code_pb2.INVALID_ARGUMENT, 413: code_pb2.RESOURCE_EXHAUSTED,
                        415: code_pb2.INVALID_ARGUMENT, 503: code_pb2.UNAVAILABLE}


def inflate(body: bytes, encoding: str, limit: int = MAX_BODY) -> bytes:
    """Decompress a gzip (every member) or deflate body, never past `limit` bytes (a gzip bomb
    is refused with 413 after `limit` bytes of output, not expanded)."""
    wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
    out = bytearray()
    data = body
    try:
        while data:
            inflater = zlib.decompressobj(wbits)
            out += inflater.decompress(data, limit + 1 - len(out))
            if len(out) > limit or inflater.unconsumed_tail:
                raise HttpError(413, f"the decompressed body exceeds {limit} bytes")
            if not inflater.eof:
                raise HttpError(400, f"truncated {encoding} body")
            data = inflater.unused_data if encoding == "gzip" else b""
    except zlib.error as exc:
        raise HttpError(400, f"the body is not valid {encoding}: {exc}") from exc
    return bytes(out)


def _response(decoded_as: str, outcome: Outcome) -> bytes:
    message = ExportTraceServiceResponse()
    if outcome.rejected or outcome.error:
        message.partial_success.CopyFrom(ExportTracePartialSuccess(
            rejected_spans=outcome.rejected, error_message=outcome.error))
    return _encode(message, decoded_as)


def _encode(message: Message, content_type: str) -> bytes:
    if content_type == _JSON:
        return json_format.MessageToJson(message, indent=None).encode()
    return message.SerializeToString()


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    receiver: Receiver

    def handle_error(self, request: Any, client_address: Any) -> None:
        _logger.debug("otel-metadata serve: HTTP connection error", exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: an exporter reuses its connection
    timeout = _SOCKET_TIMEOUT_S
    server: _HttpServer
    _discard = 0  # bytes of an oversized body to read and drop after answering 413

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        _logger.debug("otel-metadata serve: " + format, *args)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path.split("?", 1)[0] != "/health":
            self._answer(404, _JSON, json.dumps({"error": "not found"}).encode())
            return
        receiver = self.server.receiver
        body = json.dumps({"status": "stopping" if receiver.closed else "ok",
                           **receiver.counts()}).encode()
        self._answer(503 if receiver.closed else 200, _JSON, body)

    def do_POST(self) -> None:  # noqa: N802
        content_type = (self.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        answer_as = content_type if content_type in (_PROTOBUF, _JSON) else _JSON
        try:
            if self.path.split("?", 1)[0] != "/v1/traces":
                raise HttpError(404, f"no such path {self.path!r}; OTLP traces go to /v1/traces",
                                close=True)
            if answer_as != content_type:
                raise HttpError(415, f"unsupported Content-Type {content_type!r}; send "
                                     f"{_PROTOBUF} or {_JSON}", close=True)
            encoding = (self.headers.get("Content-Encoding") or "identity").strip().lower()
            if encoding not in ("identity", "gzip", "deflate"):
                raise HttpError(415, f"unsupported Content-Encoding {encoding!r}; send gzip, "
                                     "deflate or none", close=True)
            body = self._read_body()
            if encoding != "identity":
                body = inflate(body, encoding)
            try:
                decoded = decode_protobuf(body) if content_type == _PROTOBUF else decode_json(body)
            except DecodeError as exc:
                raise HttpError(400, str(exc)) from exc
            outcome = self.server.receiver.accept(decoded)
            if outcome.busy:
                raise HttpError(503, "the receiver's pipeline is full or stopping; retry later",
                                {"Retry-After": str(RETRY_AFTER_S)})
        except HttpError as exc:
            if exc.status in (400, 411, 413, 415):
                self.server.receiver.bad_request()
            status = status_pb2.Status(code=_GRPC_CODE_OF_STATUS.get(exc.status, code_pb2.UNKNOWN),
                                       message=str(exc))
            self._answer(exc.status, answer_as, _encode(status, answer_as), exc.headers,
                         exc.close)
            return
        self._answer(200, answer_as, _response(answer_as, outcome))

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            return self._read_chunked()
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            raise HttpError(411, "a Content-Length (or chunked transfer) is required", close=True)
        try:
            length = int(length_header)
            if length < 0:
                raise ValueError
        except ValueError:
            raise HttpError(400, f"bad Content-Length {length_header!r}", close=True) from None
        if length > MAX_BODY:
            self._discard = length
            raise HttpError(413, f"the body ({length} bytes) exceeds {MAX_BODY} bytes",
                            close=True)
        body = self.rfile.read(length)
        if len(body) < length:
            raise HttpError(400, "the body ended before its Content-Length", close=True)
        return body

    def _read_chunked(self) -> bytes:
        body = bytearray()
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise HttpError(400, "malformed chunked body", close=True) from None
            if size == 0:
                while self.rfile.readline(1024).strip():  # trailers
                    pass
                return bytes(body)
            if len(body) + size > MAX_BODY:
                raise HttpError(413, f"the body exceeds {MAX_BODY} bytes", close=True)
            body += self.rfile.read(size)
            self.rfile.readline(1024)  # the CRLF after each chunk

    def _answer(self, status: int, content_type: str, body: bytes,
                headers: Mapping[str, str] | None = None, close: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        if self._discard:  # read (and drop) a bounded part of the oversized body being sent
            left, self._discard = min(self._discard, _MAX_DISCARD), 0
            self.connection.settimeout(1.0)
            try:
                while left > 0 and (chunk := self.rfile.read(min(left, 1 << 20))):
                    left -= len(chunk)
            except OSError:
                pass


def start_http(host: str, port: int, receiver: Receiver) -> _HttpServer:
    """Listen for OTLP/HTTP on (host, port) in a background thread."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    class Server(_HttpServer):
        address_family = family

    httpd = Server((host, port), _Handler)
    httpd.receiver = receiver
    threading.Thread(target=httpd.serve_forever, args=(0.1,), name="otel-metadata-serve-http",
                     daemon=True).start()
    return httpd


# -- OTLP/gRPC --


def _retry_metadata() -> tuple[tuple[str, bytes], ...]:
    """RetryInfo both where the OTLP specification puts it (in the `google.rpc.Status` details
    of `grpc-status-details-bin`, which the Collector reads) and as `google.rpc.retryinfo-bin`,
    which OpenTelemetry Python's exporter reads."""
    retry = error_details_pb2.RetryInfo(retry_delay=Duration(seconds=RETRY_AFTER_S))
    detail = status_pb2.Status(code=code_pb2.UNAVAILABLE, message=_BUSY_MESSAGE)
    detail.details.add().Pack(retry)
    return (("grpc-status-details-bin", detail.SerializeToString()),
            ("google.rpc.retryinfo-bin", retry.SerializeToString()))


_BUSY_MESSAGE = "the receiver's pipeline is full or stopping; retry later"


def start_grpc(host: str, port: int, receiver: Receiver) -> tuple[grpc.Server, int]:
    """Serve `TraceService/Export` on (host, port); returns the server and the bound port."""

    def export(body: bytes, context: grpc.ServicerContext) -> ExportTraceServiceResponse:
        try:
            decoded = decode_protobuf(body)
        except DecodeError as exc:
            receiver.bad_request()
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        outcome = receiver.accept(decoded)
        if outcome.busy:
            context.set_trailing_metadata(_retry_metadata())
            context.abort(grpc.StatusCode.UNAVAILABLE, _BUSY_MESSAGE)
        response = ExportTraceServiceResponse()
        if outcome.rejected or outcome.error:
            response.partial_success.rejected_spans = outcome.rejected
            response.partial_success.error_message = outcome.error
        return response

    handler = grpc.method_handlers_generic_handler(_GRPC_SERVICE, {
        # No request deserializer: the bytes come to `export`, so a body that does not decode
        # is INVALID_ARGUMENT (grpc's own failure would be INTERNAL).
        "Export": grpc.unary_unary_rpc_method_handler(
            export, response_serializer=ExportTraceServiceResponse.SerializeToString),
    })
    server = grpc.server(
        ThreadPoolExecutor(max_workers=_GRPC_WORKERS, thread_name_prefix="otel-metadata-grpc"),
        handlers=[handler],
        options=(("grpc.max_receive_message_length", MAX_BODY),),
    )
    bound = server.add_insecure_port(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    if not bound and port:
        raise OSError(f"cannot listen on {host}:{port}")
    server.start()
    return server, bound


# -- the command --


class Serve:
    """The receiver's listeners and pipeline; `start`, then `stop` (what SIGTERM does)."""

    def __init__(self, pipeline: PipelineLike, http: tuple[str, int] | None,
                 grpc_address: tuple[str, int] | None) -> None:
        self.pipeline = pipeline
        self.receiver = Receiver(pipeline.intake)
        self._http_address, self._grpc_address = http, grpc_address
        self.http: _HttpServer | None = None
        self.grpc: grpc.Server | None = None
        self.http_port = self.grpc_port = 0

    def start(self) -> None:
        try:
            if self._http_address is not None:
                self.http = start_http(*self._http_address, self.receiver)
                self.http_port = self.http.server_address[1]
            if self._grpc_address is not None:
                self.grpc, self.grpc_port = start_grpc(*self._grpc_address, self.receiver)
        except (OSError, RuntimeError):
            self._close_listeners(0.0)
            raise

    def listening(self) -> list[str]:
        out = []
        if self.http is not None:
            host = self._http_address[0] if self._http_address else ""
            out.append(f"OTLP/HTTP on http://{_join(host, self.http_port)}/v1/traces "
                       f"(health: /health)")
        if self.grpc is not None:
            host = self._grpc_address[0] if self._grpc_address else ""
            out.append(f"OTLP/gRPC on {_join(host, self.grpc_port)}")
        return out

    def stop(self, timeout_s: float) -> bool:
        """Stop intake (new requests are refused as busy, listeners close), then flush what
        was taken; within `timeout_s`. True when everything taken was delivered."""
        deadline = time.monotonic() + timeout_s
        self.receiver.close()
        self._close_listeners(min(1.0, timeout_s / 4))
        left_ms = int(max(0.0, deadline - time.monotonic()) * 1000)
        flushed = self.pipeline.force_flush(left_ms)
        self.pipeline.shutdown(max(0.0, deadline - time.monotonic()))
        return flushed

    def _close_listeners(self, grace_s: float) -> None:
        if self.grpc is not None:
            self.grpc.stop(grace_s).wait(grace_s + 0.5)
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def run(out: TextIO, http: tuple[str, int] | None, grpc_address: tuple[str, int] | None) -> int:
    """Serve until SIGTERM or SIGINT; 0 after a clean stop."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(message)s")
    if http is None and grpc_address is None:
        print("otel-metadata serve: both --http and --grpc are 'none'; nothing to serve",
              file=out)
        return 2
    settings = config.resolve()
    if settings.disabled or settings.api_key is None:
        why = ("OTEL_SDK_DISABLED=true" if settings.disabled
               else f"no PromptLayer API key (set {config.ENV_API_KEY})")
        print(f"otel-metadata serve: {why}; not serving", file=out)
        return 2
    serve = Serve(Pipeline(settings, component_type="otel_metadata_receiver"), http,
                  grpc_address)
    try:
        serve.start()
    except (OSError, RuntimeError) as exc:
        print(f"otel-metadata serve: cannot listen: {exc}", file=out)
        serve.pipeline.shutdown()
        return 1
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for line in serve.listening():
            print(f"otel-metadata serve: {line}", file=out, flush=True)
        while not stop.wait(1.0):
            pass
        timeout_s = settings.shutdown_timeout_s
        print(f"otel-metadata serve: stopping; flushing within {timeout_s:g} s", file=out,
              flush=True)
        flushed = serve.stop(timeout_s)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    counts = {**serve.receiver.counts(), **serve.pipeline.stats()}
    print(f"otel-metadata serve: stopped ({'all' if flushed else 'NOT all'} delivered); "
          + ", ".join(f"{k}={v}" for k, v in sorted(counts.items()) if v), file=out, flush=True)
    return 0
