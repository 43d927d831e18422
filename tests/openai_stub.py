"""An OpenAI-compatible chat-completions endpoint on 127.0.0.1, for the OpenAI example's tests.

The official ``openai`` client talks to it as to the real API (``OPENAI_BASE_URL`` =
`OpenAIStub.base_url`): it checks the bearer key, answers ``POST /v1/chat/completions`` with a
well-formed completion that echoes the question, and remembers what it was asked.
"""

from __future__ import annotations

import itertools
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class OpenAIStub:
    """Start with ``with OpenAIStub() as stub:``; `requests` lists the parsed request bodies."""

    def __init__(self, api_key: str = "sk-local-stub") -> None:
        self.api_key = api_key
        self.requests: list[dict[str, Any]] = []
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "stub not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}/v1"

    def __enter__(self) -> OpenAIStub:
        stub = self

        class Handler(_Handler):
            owner = stub

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, name="openai-stub", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def completion(self, body: dict[str, Any]) -> dict[str, Any]:
        """A chat completion answering the last message of `body`."""
        with self._lock:
            self.requests.append(body)
            number = next(self._ids)
        question = str(body["messages"][-1]["content"])
        return {
            "id": f"chatcmpl-stub-{number}",
            "object": "chat.completion",
            "created": 1_700_000_000 + number,
            "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                         "message": {"role": "assistant", "content": f"You asked: {question}"}}],
            "usage": {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14},
        }


class _Handler(BaseHTTPRequestHandler):
    owner: OpenAIStub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass

    def _answer(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path != "/v1/chat/completions":
            self._answer(404, {"error": {"message": f"no route {self.path}"}})
        elif self.headers.get("Authorization") != f"Bearer {self.owner.api_key}":
            self._answer(401, {"error": {"message": "Incorrect API key provided"}})
        else:
            self._answer(200, self.owner.completion(json.loads(raw)))
