"""`otel-metadata demo`: a small traced chat app, an embedded PromptLayer, and what arrived.

No key, no network: the track-metadata endpoint is `testing.track_metadata.TrackMetadataServer`
on 127.0.0.1, and PromptLayer itself (for the SDK part) `testing.promptlayer_api.PromptLayerAPI`.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any, TextIO

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider

from .context import metadata_context, set_request_id
from .processor import MetadataSpanProcessor
from .testing.track_metadata import TrackMetadataServer

_request_ids = itertools.count(9001)


def fake_llm_call(tracer: Any, model: str, **attributes: str) -> int:
    """Stands in for an LLM client call that PromptLayer logged: a span and a request ID."""
    with tracer.start_as_current_span(f"chat {model}") as span:
        span.set_attribute("gen_ai.request.model", model)
        span.set_attribute("gen_ai.prompt", "never leaves the process")
        for key, value in attributes.items():
            span.set_attribute(f"promptlayer.metadata.{key}", value)
        time.sleep(0.005)
        request_id = next(_request_ids)
        set_request_id(request_id)
        return request_id


def handle_chat(tracer: Any, user: str, conversation: str, plan: str) -> list[int]:
    """A web handler: sets the user once on its own span; LLM calls happen further down."""
    with tracer.start_as_current_span("POST /chat") as span:
        span.set_attribute("user.id", user)
        span.set_attribute("gen_ai.conversation.id", conversation)
        with metadata_context(plan=plan):
            with tracer.start_as_current_span("retrieve"):
                ids = [fake_llm_call(tracer, "embed-small", step="embed")]
            with tracer.start_as_current_span("answer"):
                ids.append(fake_llm_call(tracer, "gpt-demo", step="answer"))
    return ids


def run(out: TextIO) -> int:
    with TrackMetadataServer() as server:
        provider = TracerProvider(resource=Resource.create(
            {"service.name": "demo-chat", "promptlayer.metadata.environment": "demo"}))
        processor = MetadataSpanProcessor(api_key=server.api_key, base_url=server.base_url)
        provider.add_span_processor(processor)
        tracer = provider.get_tracer("otel-metadata-demo")

        sent: list[int] = []
        for user, conversation, plan in [("alice", "conv-1", "pro"), ("bob", "conv-2", "free"),
                                         ("alice", "conv-3", "pro")]:
            sent += handle_chat(tracer, user, conversation, plan)
        delivered = processor.force_flush(10_000)
        provider.shutdown()

        out.write("Traced app: 3 chats, each a root span with user.id and a conversation,\n"
                  "two LLM calls below it, plan set in metadata_context, environment on the "
                  "resource.\n\n")
        out.write(render_table(sent, server.metadata))
        stats = processor.stats()
        out.write(f"\n{len(server.metadata)} of {len(sent)} requests got metadata; "
                  f"{stats.get('posts', 0)} POSTs; flush "
                  f"{'delivered everything' if delivered else 'did NOT deliver everything'}.\n")
        ok = delivered and len(server.metadata) == len(sent)
        return 0 if run_promptlayer(out, server) and ok else 1


def run_promptlayer(out: TextIO, server: TrackMetadataServer) -> bool:
    """The same, through the PromptLayer SDK against a local PromptLayer: no ID plumbing at
    all, `PromptLayerInstrumentor` links each request the SDK logs. Skipped (True) without
    the `promptlayer` package."""
    try:
        from promptlayer import PromptLayer  # type: ignore[import-untyped]
    except ImportError:
        out.write("\n(pip install promptlayer to see the same through the PromptLayer SDK)\n")
        return True
    from .promptlayer import PromptLayerInstrumentor
    from .testing.promptlayer_api import MODEL, PromptLayerAPI

    instrumentor = PromptLayerInstrumentor()
    instrumentor.instrument()
    saved = {k: os.environ.get(k) for k in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    try:
        with PromptLayerAPI(server.api_key, track_metadata=server) as api:
            # run() calls the model with the OpenAI client, which reads these.
            os.environ.update(OPENAI_API_KEY=api.llm_api_key, OPENAI_BASE_URL=api.llm_base_url)
            provider = TracerProvider()
            processor = MetadataSpanProcessor(api_key=server.api_key, base_url=server.base_url)
            provider.add_span_processor(processor)
            tracer = provider.get_tracer("otel-metadata-demo")
            client = PromptLayer(api_key=api.api_key, base_url=api.base_url)
            openai = client.openai.OpenAI()
            for user in ("carol", "dave"):
                with tracer.start_as_current_span("POST /chat") as span:
                    span.set_attribute("user.id", user)  # once; no set_request_id anywhere
                    client.run("greeting", input_variables={"name": user})
                    for _ in client.run("greeting", input_variables={"name": user},
                                        stream=True):
                        pass
                    openai.chat.completions.create(
                        model=MODEL, messages=[{"role": "user", "content": "and then?"}])
            delivered = processor.force_flush(10_000)
            provider.shutdown()
            logged = api.ids()
    finally:
        instrumentor.uninstrument()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    out.write("\nThrough the PromptLayer SDK (PromptLayerInstrumentor): per chat a run(), a "
              "streamed run() and a client.openai proxy call, user.id set once on the "
              "handler, no request-ID plumbing:\n\n")
    out.write(render_table(logged, server.metadata))
    got = sum(1 for rid in logged if rid in server.metadata)
    out.write(f"\n{got} of {len(logged)} requests PromptLayer logged got metadata.\n")
    return delivered and got == len(logged) > 0


def render_table(request_ids: Iterable[Any], received: Mapping[Any, Mapping[str, str]]) -> str:
    """A plain-text table: one row per request ID, one column per metadata key."""
    request_ids = list(request_ids)
    keys = sorted({k for rid in request_ids for k in received.get(rid, {})},
                  key=lambda k: ({"user_id": 0, "conversation_id": 1}.get(k, 2), k))
    rows = [["request_id", *keys]]
    for rid in request_ids:
        got = received.get(rid)
        rows.append([str(rid), *((got or {}).get(k, "-") for k in keys)] if got
                    else [str(rid), "(nothing received)"])
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"
