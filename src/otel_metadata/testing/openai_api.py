"""An OpenAI-compatible chat-completions endpoint on 127.0.0.1, for the OpenAI example/tests.

The official ``openai`` client talks to it as to the real API (``OPENAI_BASE_URL`` =
`OpenAIStub.base_url`): it checks the bearer key, answers ``POST /v1/chat/completions`` with a
well-formed completion that echoes the question, and remembers what it was asked.
"""

from __future__ import annotations

import itertools
import json
from typing import Any, cast

from ._http import JSONHandler, LocalServer


class OpenAIStub(LocalServer):
    """Start with ``with OpenAIStub() as stub:``; `requests` lists the parsed request bodies."""

    path_prefix = "/v1"

    def __init__(self, api_key: str = "sk-local-stub") -> None:
        super().__init__()
        self.api_key = api_key
        self.requests: list[dict[str, Any]] = []
        self._ids = itertools.count(1)

    def __enter__(self) -> OpenAIStub:
        return cast(OpenAIStub, self.start())

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


class _Handler(JSONHandler):
    owner: OpenAIStub

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        raw = self.read_body()
        if raw is None:
            return
        if self.path != "/v1/chat/completions":
            self.answer(404, {"error": {"message": f"no route {self.path}"}})
        elif self.headers.get("Authorization") != f"Bearer {self.owner.api_key}":
            self.answer(401, {"error": {"message": "Incorrect API key provided"}})
        else:
            self.answer(200, self.owner.completion(json.loads(raw)))


OpenAIStub.handler = _Handler
