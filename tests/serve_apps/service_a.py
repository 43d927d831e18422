"""Service A of the fleet test: the front service, which knows the user.

Its server span carries `user.id`; it calls service B (URL in argv[2]) twice, each call in a
client span whose context goes along in `traceparent`, the first with `?step=first`. Spans go to
`otel-metadata serve` through the SDK's real OTLP/HTTP exporter (endpoint in argv[1]); the
provider's shutdown flushes them before the process exits.
"""

from __future__ import annotations

import sys
import urllib.request

from opentelemetry import propagate
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind

provider = TracerProvider(resource=Resource.create({"service.name": "service-a"}))
provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=sys.argv[1])))
tracer = provider.get_tracer("service-a")

with tracer.start_as_current_span("POST /chat", kind=SpanKind.SERVER) as root:
    root.set_attribute("user.id", "alice")
    for request_id, query in ((101, "&step=first"), (102, "")):
        with tracer.start_as_current_span("call service-b", kind=SpanKind.CLIENT):
            headers: dict[str, str] = {}
            propagate.inject(headers)
            url = f"{sys.argv[2]}/answer?request_id={request_id}{query}"
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                        timeout=30) as answer:
                assert answer.status == 200
provider.shutdown()
