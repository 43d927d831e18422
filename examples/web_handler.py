"""A web app sets the user once, in middleware; every LLM call below gets it.

The handler span carries ``user.id`` and the conversation; the LLM calls are made two levels
down, in a helper that knows nothing about users. A per-tenant `metadata_context` adds more.

    python examples/web_handler.py     # serves on 127.0.0.1, sends itself 3 requests, prints
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import requests
from _local import promptlayer_or_local
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from otel_metadata import MetadataSpanProcessor, metadata_context, set_request_id

tracer = trace.get_tracer(__name__)
_next_id = iter(range(5000, 6000))


def call_llm(prompt: str) -> str:
    """Deep in the app: an LLM call, logged by PromptLayer, which returns a request ID."""
    with tracer.start_as_current_span("chat gpt-4o-mini"):
        time.sleep(0.002)
        set_request_id(next(_next_id))
        return prompt.upper()


def answer(question: str) -> str:
    with tracer.start_as_current_span("rag.answer"):
        context = call_llm(f"rewrite: {question}")
        return call_llm(f"answer: {question} using {context}")


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    body = answer(environ.get("QUERY_STRING", ""))
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [body.encode()]


def user_middleware(inner: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
    """Where the user is known: set it once on the request's span, and the tenant in context."""

    def wrapped(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        with tracer.start_as_current_span(f"{environ['REQUEST_METHOD']} {environ['PATH_INFO']}",
                                          kind=trace.SpanKind.SERVER) as span:
            span.set_attribute("user.id", environ.get("HTTP_X_USER_ID", "anonymous"))
            span.set_attribute("gen_ai.conversation.id", environ.get("HTTP_X_CONVERSATION", ""))
            with metadata_context(tenant=environ.get("HTTP_X_TENANT", "default")):
                return list(inner(environ, start_response))

    return wrapped


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


def main() -> None:
    with promptlayer_or_local() as local:
        provider = TracerProvider()
        provider.add_span_processor(MetadataSpanProcessor())
        trace.set_tracer_provider(provider)

        httpd = make_server("127.0.0.1", 0, user_middleware(app), handler_class=QuietHandler)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{httpd.server_port}/ask"
        for user, conversation, tenant in [("ana", "c1", "acme"), ("ben", "c2", "globex"),
                                           ("ana", "c1", "acme")]:
            requests.get(url, params="what is otel", timeout=5, headers={
                "X-User-Id": user, "X-Conversation": conversation, "X-Tenant": tenant})
        httpd.shutdown()

        provider.shutdown()
        if local is not None:
            for request_id, metadata in sorted(local.metadata.items()):
                print(request_id, metadata)


if __name__ == "__main__":
    main()
