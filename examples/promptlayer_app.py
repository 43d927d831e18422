"""A web handler that uses the PromptLayer SDK, with PromptLayer metadata and no ID plumbing.

The handler sets the user once, on its own span, and makes three PromptLayer calls below it: a
``run()``, a streamed ``run()`` and a call through the ``client.openai`` proxy. It never handles
a request ID: ``PromptLayerInstrumentor``, which ``opentelemetry-instrument`` loads because
``promptlayer`` is installed, links each request the SDK logs to the handler's span, and the
metadata processor posts the user to each of them.

    pip install otel-metadata promptlayer
    export OTEL_TRACES_EXPORTER=promptlayer_metadata
    export OTEL_METRICS_EXPORTER=none OTEL_LOGS_EXPORTER=none
    export PROMPTLAYER_API_KEY=pl_... OPENAI_API_KEY=sk-...
    opentelemetry-instrument python examples/promptlayer_app.py

With no ``PROMPTLAYER_API_KEY`` it runs against local fakes instead (no key, no network): a
PromptLayer (`otel_metadata.testing.promptlayer_api`, with its prompt ``greeting`` and an
OpenAI-compatible model) in front of the embedded track-metadata server, and prints what that
server received. Run plainly (``python examples/promptlayer_app.py``) it asks for the same
set-up itself, as ``opentelemetry-instrument`` would.
"""

from __future__ import annotations

import os
from contextlib import ExitStack

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from otel_metadata.testing.promptlayer_api import MODEL, PromptLayerAPI
from otel_metadata.testing.track_metadata import TrackMetadataServer

local = ExitStack()
server: TrackMetadataServer | None = None
if not os.environ.get("PROMPTLAYER_API_KEY"):
    server = local.enter_context(TrackMetadataServer())
    api = local.enter_context(PromptLayerAPI(server.api_key, track_metadata=server))
    os.environ.update(PROMPTLAYER_API_KEY=api.api_key, PROMPTLAYER_BASE_URL=api.base_url,
                      OPENAI_API_KEY=api.llm_api_key, OPENAI_BASE_URL=api.llm_base_url)

if not isinstance(trace.get_tracer_provider(), TracerProvider):  # no opentelemetry-instrument
    from opentelemetry.instrumentation import auto_instrumentation

    os.environ.setdefault("OTEL_TRACES_EXPORTER", "promptlayer_metadata")
    os.environ.setdefault("OTEL_METRICS_EXPORTER", "none")
    os.environ.setdefault("OTEL_LOGS_EXPORTER", "none")
    auto_instrumentation.initialize()

# Imported only now, once the instrumentation is in place (as under opentelemetry-instrument).
from promptlayer import PromptLayer  # noqa: E402

tracer = trace.get_tracer("promptlayer-example")
promptlayer = PromptLayer()  # PROMPTLAYER_API_KEY, PROMPTLAYER_BASE_URL
openai = promptlayer.openai.OpenAI()  # OPENAI_API_KEY, OPENAI_BASE_URL


def handle_chat(user: str, question: str) -> list[str]:
    """POST /chat: the user once, on the handler's span; three PromptLayer calls below it."""
    with tracer.start_as_current_span("POST /chat") as span:
        span.set_attribute("user.id", user)
        greeting = promptlayer.run("greeting", input_variables={"name": user})
        streamed = "".join(
            chunk["raw_response"].choices[0].delta.content or ""
            for chunk in promptlayer.run("greeting", input_variables={"name": user}, stream=True)
            if chunk["raw_response"].choices)
        answer = openai.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": question}])
        return [greeting["raw_response"].choices[0].message.content, streamed,
                answer.choices[0].message.content]


if __name__ == "__main__":
    with local:
        handle_chat("ana", "What is OpenTelemetry?")
        handle_chat("ben", "And PromptLayer?")
        trace.get_tracer_provider().force_flush()  # type: ignore[attr-defined]
        if server is not None:
            for request_id, metadata in sorted(server.metadata.items()):
                print(request_id, metadata)
