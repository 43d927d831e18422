"""A traced app with no processor code: test_zero_code.py runs it under opentelemetry-instrument.

It sets the user once on the handler's span and the conversation with `metadata_context`, and
marks LLM calls with `set_request_id`; everything else comes from the environment. Its last line
on stdout is a JSON probe of the configured provider, so the tests can tell how many metadata
processors ended up on it.
"""

from __future__ import annotations

import json
import sys

from opentelemetry import trace

from otel_metadata import MetadataSpanProcessor, metadata_context, set_request_id

tracer = trace.get_tracer("zero-code-app")


def handle_chat(user: str, conversation: str, request_ids: list[int]) -> None:
    """A web handler: the user on its own span, LLM calls in child spans further down."""
    with tracer.start_as_current_span("POST /chat") as span:
        span.set_attribute("user.id", user)
        with metadata_context(conversation_id=conversation, plan="pro"):
            for request_id in request_ids:
                with tracer.start_as_current_span("llm call") as llm:
                    llm.set_attribute("promptlayer.metadata.step", f"step-{request_id}")
                    set_request_id(request_id)


def metadata_processors() -> int:
    """How many MetadataSpanProcessors the global provider runs (a test probe, not app code)."""
    multi = getattr(trace.get_tracer_provider(), "_active_span_processor", None)
    return sum(isinstance(p, MetadataSpanProcessor) for p in getattr(multi, "_span_processors", ()))


if __name__ == "__main__":
    handle_chat("ana", "conv-1", [7001, 7002])
    handle_chat("ben", "conv-2", [7003])
    sys.stdout.write(json.dumps({"metadata_processors": metadata_processors()}) + "\n")
