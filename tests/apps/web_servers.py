"""One app for the signal tests, served by real uvicorn (FastAPI) and real gunicorn (WSGI).

Each request is a handler span carrying `user.id` and one PromptLayer request span below it,
whose ID is the request's `?id=`. The processor reads PROMPTLAYER_* from the environment; its
default 5 s schedule delay keeps records queued until something flushes them.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

from fastapi import FastAPI
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from otel_metadata import MetadataSpanProcessor, set_request_id

provider = TracerProvider()
provider.add_span_processor(MetadataSpanProcessor())
trace.set_tracer_provider(provider)
tracer = trace.get_tracer("web-app")


def handle(request_id: int) -> str:
    with tracer.start_as_current_span("GET /chat") as span:
        span.set_attribute("user.id", f"user-{request_id}")
        with tracer.start_as_current_span("llm"):
            set_request_id(request_id)
    return "ok"


app = FastAPI()


@app.get("/chat")
def chat(id: int) -> dict[str, str]:  # noqa: A002 - the query parameter's name
    return {"answer": handle(id)}


def wsgi(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    request_id = int(parse_qs(environ.get("QUERY_STRING", ""))["id"][0])
    body = handle(request_id).encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]
