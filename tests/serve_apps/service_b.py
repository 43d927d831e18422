"""Service B of the fleet test: an HTTP service that makes the PromptLayer request span.

It continues the caller's trace from the `traceparent` header (W3C trace context, the SDK's
default propagator), makes a server span and, below it, the LLM span that carries
`promptlayer.request_id`; `?step=` puts `promptlayer.metadata.step` on its server span. Spans go
to `otel-metadata serve` through the SDK's real OTLP/gRPC exporter (endpoint in argv[1]), and are
flushed before each answer, so they reach the receiver before the caller's root span ends.
It prints its port, and stops when its stdin closes.
"""

from __future__ import annotations

import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from opentelemetry import propagate
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind

provider = TracerProvider(resource=Resource.create({"service.name": "service-b"}))
provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=sys.argv[1],
                                                                insecure=True)))
tracer = provider.get_tracer("service-b")


class Handler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def do_GET(self) -> None:  # noqa: N802
        query = parse_qs(urlsplit(self.path).query)
        context = propagate.extract({k.lower(): v for k, v in self.headers.items()})
        with tracer.start_as_current_span("GET /answer", context=context,
                                          kind=SpanKind.SERVER) as span:
            if "step" in query:
                span.set_attribute("promptlayer.metadata.step", query["step"][0])
            with tracer.start_as_current_span("chat gpt-test") as llm:
                llm.set_attribute("gen_ai.request.model", "gpt-test")
                llm.set_attribute("promptlayer.request_id", int(query["request_id"][0]))
        ok = provider.force_flush(10_000)
        self.send_response(200 if ok else 500)
        self.send_header("Content-Length", "0")
        self.end_headers()


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
threading.Thread(target=server.serve_forever, daemon=True).start()
print(server.server_address[1], flush=True)
sys.stdin.read()
server.shutdown()
provider.shutdown()
