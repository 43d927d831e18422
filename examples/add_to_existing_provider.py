"""Add PromptLayer metadata to an app that already has a TracerProvider.

    python examples/add_to_existing_provider.py      # embedded local server, no key needed
    PROMPTLAYER_API_KEY=pl_... python examples/add_to_existing_provider.py   # the real API
"""

from __future__ import annotations

import io

from _local import promptlayer_or_local
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

from otel_metadata import MetadataSpanProcessor, set_request_id


def main() -> None:
    with promptlayer_or_local() as local:
        # The app's existing tracing setup (your exporters stay as they are)...
        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter(out=io.StringIO())))
        # ...plus one line. It reads PROMPTLAYER_API_KEY (and PROMPTLAYER_BASE_URL).
        provider.add_span_processor(MetadataSpanProcessor())
        trace.set_tracer_provider(provider)
        tracer = trace.get_tracer(__name__)

        with tracer.start_as_current_span("POST /summarize") as span:
            span.set_attribute("user.id", "user-42")
            span.set_attribute("promptlayer.metadata.feature", "summarize")
            with tracer.start_as_current_span("openai.chat"):
                request_id = 123456  # what PromptLayer returned for this LLM call
                set_request_id(request_id)

        provider.shutdown()  # flushes; at interpreter exit this happens by itself
        if local is not None:
            print(f"metadata received for request {request_id}: {local.metadata[request_id]}")


if __name__ == "__main__":
    main()
