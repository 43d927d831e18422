"""A local PromptLayer for the `promptlayer` SDK, on 127.0.0.1: strict, and with a model to run.

The SDK reads one base URL (``PromptLayer(base_url=...)`` or ``PROMPTLAYER_BASE_URL``) and calls,
below it, the endpoints served here, each checked as PromptLayer's published reference describes
it (docs.promptlayer.com/reference):

- ``POST /prompt-templates/{identifier}`` (Get Prompt Template): ``X-API-KEY`` header; body fields
  ``version`` (int > 0), ``workspace_id``, ``label``, ``provider`` (openai | anthropic),
  ``input_variables``, ``metadata_filters``, plus what the SDK also sends (``api_key``,
  ``model``, ``model_parameter_overrides``). Answers the template with ``llm_kwargs`` rendered
  for OpenAI and ``provider_base_url`` pointing at the model below.
- ``POST /track-request`` (also ``/rest/track-request``; Track Request): the key is the body's
  ``api_key``; ``function_name``, ``kwargs``, ``request_response``, ``request_start_time``,
  ``request_end_time`` required. Answers ``{"success", "message", "request_id"}`` (and the
  ``prompt_blueprint`` when ``return_prompt_blueprint``).
- ``POST /log-request`` (Log Request): ``X-API-KEY`` header; ``provider``, ``model``, ``input``
  and ``output`` (prompt blueprints whose content is a list of blocks) required. Answers 201
  ``{"id", "prompt_version", "status", "error_type", "error_message"}``.
- ``POST /v1/traces`` (OTLP/HTTP, the 1.5 SDK's tracing) and ``POST /spans-bulk`` (the 1.4 SDK's
  tracing): ``X-Api-Key`` header; counted, not kept.
- ``POST /rest/track-metadata``: forwarded to a `TrackMetadataServer` when one is given, so one
  ``PROMPTLAYER_BASE_URL`` serves both the SDK and this package's processor, as the real API does.

A field of the wrong type, a missing required one or one neither the reference nor the SDK sends
is refused (400/401/404/422, recorded in `refused`), so an SDK call that the real API would
refuse fails here too. Every request ID issued is recorded in `logged`.

The model, answering "You asked: <last message>", streamed as server-sent events when ``stream``
is true, in two dialects:

- ``POST /v1/chat/completions``, OpenAI-compatible (bearer `llm_api_key`);
- ``POST /v1/messages``, Anthropic's Messages API (`anthropic_base_url`): `llm_api_key` as
  ``x-api-key`` or as a bearer token (the ``anthropic`` client sends one or the other, by
  version) and an ``anthropic-version`` header; ``model``, ``max_tokens`` (int > 0) and
  ``messages`` (user/assistant turns, the first a user's) required; a field the reference does
  not list is refused, as the API's "Extra inputs are not permitted" does. Streamed as its
  reference's events: ``message_start``, ``content_block_start``, ``ping``,
  ``content_block_delta`` per word, ``content_block_stop``, ``message_delta``,
  ``message_stop``.

`fail_llm` makes the next calls fail with a 400, as a provider refusing a request does.
"""

from __future__ import annotations

import http.client
import itertools
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import unquote, urlsplit

from ._http import JSONHandler, LocalServer
from .track_metadata import PATH as TRACK_METADATA_PATH
from .track_metadata import TrackMetadataServer

MODEL = "gpt-4o-mini"
ANTHROPIC_MODEL = "claude-haiku-4-5"
_BLUEPRINT_TYPES = {"chat", "completion"}
_STATUSES = {"SUCCESS", "WARNING", "ERROR"}


class Refused(Exception):
    """A request the API would refuse: HTTP `status` with `reason` as its message."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Logged:
    """A request ID the fake issued: by which endpoint, for which body."""

    request_id: int
    endpoint: str
    body: Mapping[str, Any]

    @property
    def status(self) -> str:
        """SUCCESS, WARNING or ERROR, as the SDK logged it."""
        return str(self.body.get("status") or "SUCCESS")


@dataclass
class Template:
    """A prompt in the registry: one user message, an f-string over `input_variables`."""

    id: int
    text: str
    input_variables: list[str] = field(default_factory=list)


# Type checks: a field's name -> what it must be. `None` is accepted for every optional field.
def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_str(v: object) -> bool:
    return isinstance(v, str)


def _is_object(v: object) -> bool:
    return isinstance(v, dict)


def _is_str_list(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _is_str_map(v: object) -> bool:
    return isinstance(v, dict) and all(
        isinstance(k, str) and len(k) <= 1024 and isinstance(x, str) for k, x in v.items())


def _is_time(v: object) -> bool:  # a Unix timestamp, or the reference's date-time string
    return _is_number(v) or (isinstance(v, str) and v.strip() != "")


Check = Callable[[object], bool]

_TEMPLATE_FIELDS: dict[str, Check] = {
    "version": lambda v: _is_int(v) and v > 0,  # type: ignore[operator]
    "workspace_id": _is_int, "label": _is_str,
    "provider": lambda v: v in ("openai", "anthropic"),
    "input_variables": _is_object, "metadata_filters": _is_object,
    # Sent by the SDK beyond the reference's list.
    "api_key": _is_str, "model": _is_str, "model_parameter_overrides": _is_object,
}
_TRACK_REQUIRED: dict[str, Check] = {
    "function_name": lambda v: isinstance(v, str) and v != "", "kwargs": _is_object,
    "request_response": _is_object, "request_start_time": _is_number,
    "request_end_time": _is_number, "api_key": _is_str,
}
_TRACK_OPTIONAL: dict[str, Check] = {
    "tags": _is_str_list, "metadata": _is_str_map, "prompt_id": lambda v: _is_int(v) or _is_str(v),
    "prompt_input_variables": _is_object, "prompt_version": _is_int, "group_id": _is_int,
    # Sent by the SDK beyond the reference's list.
    "provider_type": _is_str, "args": lambda v: isinstance(v, list),
    "return_prompt_blueprint": lambda v: isinstance(v, bool), "span_id": _is_str,
    "status": lambda v: v in _STATUSES, "error_type": _is_str, "error_message": _is_str,
}
_LOG_REQUIRED: dict[str, Check] = {
    "provider": lambda v: isinstance(v, str) and v != "",
    "model": lambda v: isinstance(v, str) and v != "",
    "input": lambda v: _is_blueprint(v), "output": lambda v: _is_blueprint(v),
    "request_start_time": _is_time, "request_end_time": _is_time,
}
_LOG_OPTIONAL: dict[str, Check] = {
    "parameters": _is_object, "tags": _is_str_list, "metadata": _is_str_map,
    "prompt_name": _is_str, "prompt_id": _is_int,
    "prompt_version_number": lambda v: _is_int(v) and v > 0,  # type: ignore[operator]
    "prompt_input_variables": _is_object,
    "input_tokens": lambda v: _is_int(v) and v >= 0,  # type: ignore[operator]
    "output_tokens": lambda v: _is_int(v) and v >= 0,  # type: ignore[operator]
    "price": lambda v: _is_number(v) and v >= 0,  # type: ignore[operator]
    "function_name": _is_str, "score": lambda v: _is_int(v) and 0 <= v <= 100,  # type: ignore[operator]
    "score_name": _is_str, "api_type": _is_str, "status": lambda v: v in _STATUSES,
    "error_type": _is_str, "error_message": _is_str,
}

# Anthropic's Messages API (docs.anthropic.com, "Messages"): the body fields it lists.
_MESSAGES_REQUIRED: dict[str, Check] = {
    "model": lambda v: isinstance(v, str) and v != "",
    "max_tokens": lambda v: _is_int(v) and v > 0,  # type: ignore[operator]
    "messages": lambda v: isinstance(v, list) and all(
        isinstance(m, dict) and m.get("role") in ("user", "assistant")
        and (_is_str(m.get("content")) or _is_blocks(m.get("content"))) for m in v),
}
_MESSAGES_OPTIONAL: dict[str, Check] = {
    "system": lambda v: _is_str(v) or _is_blocks(v), "stream": lambda v: isinstance(v, bool),
    "metadata": _is_object, "stop_sequences": _is_str_list, "temperature": _is_number,
    "top_p": _is_number, "top_k": _is_int, "tools": lambda v: isinstance(v, list),
    "tool_choice": _is_object, "thinking": _is_object, "service_tier": _is_str,
    "container": _is_str, "mcp_servers": lambda v: isinstance(v, list),
}


def _is_blocks(v: object) -> bool:
    return isinstance(v, list) and all(
        isinstance(b, dict) and isinstance(b.get("type"), str) for b in v)


def _is_blueprint(v: object) -> bool:
    """A prompt blueprint: chat messages or completion content, content always a list of blocks."""
    if not isinstance(v, dict) or v.get("type") not in _BLUEPRINT_TYPES:
        return False
    if v["type"] == "completion":
        return _is_blocks(v.get("content"))
    messages = v.get("messages")
    return isinstance(messages, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and _is_blocks(m.get("content"))
        for m in messages)


def check_fields(body: Mapping[str, Any], required: Mapping[str, Check],
                 optional: Mapping[str, Check], status: int = 422) -> None:
    """Refuse (`status`) a body missing a required field, with a wrongly typed or an unknown
    one."""
    unknown = set(body) - set(required) - set(optional)
    if unknown:
        raise Refused(status, f"unexpected fields {sorted(unknown)}: Extra inputs are not "
                              "permitted")
    for name, check in required.items():
        if name not in body or not check(body[name]):
            raise Refused(status, f"{name} is missing or of the wrong type")
    for name, check in optional.items():
        if body.get(name) is not None and not check(body[name]):
            raise Refused(status, f"{name} is of the wrong type")


class PromptLayerAPI(LocalServer):
    """Start with ``with PromptLayerAPI(...) as api:``; point the SDK at `base_url` (what it
    takes as ``base_url`` / ``PROMPTLAYER_BASE_URL``)."""

    def __init__(self, api_key: str = "pl-local-demo-key", *,
                 track_metadata: TrackMetadataServer | None = None,
                 llm_api_key: str = "sk-local-stub", llm_base_url: str | None = None,
                 first_request_id: int = 90_001) -> None:
        super().__init__()
        self.api_key = api_key
        self.llm_api_key = llm_api_key
        self.track_metadata = track_metadata
        self._llm_base_url = llm_base_url
        self.templates: dict[str, Template] = {
            "greeting": Template(1, "Say hello to {name}.", ["name"])}
        self.logged: list[Logged] = []
        self.refused: list[tuple[str, int, str]] = []
        self.spans_posts = 0
        self.fail_llm = 0
        self._ids = itertools.count(first_request_id)

    @property
    def llm_base_url(self) -> str:
        """The OpenAI-compatible endpoint the templates run on (``provider_base_url``)."""
        return self._llm_base_url or f"{self.base_url}/v1"

    @property
    def anthropic_base_url(self) -> str:
        """Where the ``anthropic`` client finds the Messages API (``ANTHROPIC_BASE_URL``)."""
        return self.base_url

    def __enter__(self) -> PromptLayerAPI:
        return cast(PromptLayerAPI, self.start())

    def ids(self, endpoint: str | None = None) -> list[int]:
        """The request IDs issued so far (by one endpoint, if given), in order."""
        with self._lock:
            return [e.request_id for e in self.logged if endpoint in (None, e.endpoint)]

    # The endpoints: each takes the parsed body and headers, returns (status, answer).

    def _issue(self, endpoint: str, body: Mapping[str, Any]) -> int:
        with self._lock:
            request_id = next(self._ids)
            self.logged.append(Logged(request_id, endpoint, body))
        return request_id

    def _key(self, given: object) -> None:
        if given != self.api_key:
            raise Refused(401, "Invalid API key")

    def get_template(self, identifier: str, body: Mapping[str, Any],
                     headers: Mapping[str, str]) -> tuple[int, Any]:
        self._key(headers.get("X-API-KEY"))
        check_fields(body, {}, _TEMPLATE_FIELDS)
        if body.get("api_key") is not None:
            self._key(body["api_key"])
        template = self.templates.get(identifier)
        if template is None:
            raise Refused(404, f"Prompt template {identifier!r} not found")
        variables = {k: str(v) for k, v in (body.get("input_variables") or {}).items()}
        missing = set(template.input_variables) - set(variables)
        if missing:
            raise Refused(422, f"input_variables missing {sorted(missing)}")
        text = template.text.format(**variables)
        model = {"provider": "openai", "name": MODEL, "parameters": {}}
        return 200, {
            "id": template.id, "prompt_name": identifier, "version": 1, "commit_message": None,
            "prompt_template": {
                "type": "chat", "input_variables": template.input_variables,
                "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}]},
            "metadata": {"model": model},
            "llm_kwargs": {"model": MODEL, "messages": [{"role": "user", "content": text}]},
            "provider_base_url": {"url": self.llm_base_url},
        }

    def track_request(self, body: Mapping[str, Any], headers: Mapping[str, str]) -> tuple[int, Any]:
        self._key(body.get("api_key"))
        check_fields(body, _TRACK_REQUIRED, _TRACK_OPTIONAL)
        answer: dict[str, Any] = {"success": True, "message": "Request tracked",
                                  "request_id": self._issue("track-request", body)}
        if body.get("return_prompt_blueprint"):
            answer["prompt_blueprint"] = {"prompt_template": {"type": "chat", "messages": []},
                                          "metadata": {"model": {"provider": "openai",
                                                                 "name": MODEL}}}
        return 200, answer

    def log_request(self, body: Mapping[str, Any], headers: Mapping[str, str]) -> tuple[int, Any]:
        self._key(headers.get("X-API-KEY"))
        check_fields(body, _LOG_REQUIRED, _LOG_OPTIONAL)
        return 201, {"id": self._issue("log-request", body), "prompt_version": None,
                     "status": body.get("status") or "SUCCESS",
                     "error_type": body.get("error_type"),
                     "error_message": body.get("error_message")}

    def spans(self, headers: Mapping[str, str]) -> None:
        self._key(headers.get("X-Api-Key"))
        with self._lock:
            self.spans_posts += 1

    def chat(self, body: Mapping[str, Any], headers: Mapping[str, str]) -> str:
        """The model, OpenAI's way: the answer to the last message."""
        if headers.get("Authorization") != f"Bearer {self.llm_api_key}":
            raise Refused(401, "Incorrect API key provided")
        if not isinstance(body.get("model"), str) or not isinstance(body.get("messages"), list):
            raise Refused(400, "model and messages are required")
        return self._answer(body["messages"][-1]["content"])

    def messages(self, body: Mapping[str, Any], headers: Mapping[str, str]) -> str:
        """The model, Anthropic's way (Messages API): the answer to the last message."""
        if self.llm_api_key not in (headers.get("x-api-key"),
                                    (headers.get("Authorization") or "").removeprefix("Bearer ")):
            raise Refused(401, "invalid x-api-key")
        if not headers.get("anthropic-version"):
            raise Refused(400, "anthropic-version header is required")
        check_fields(body, _MESSAGES_REQUIRED, _MESSAGES_OPTIONAL, status=400)
        turns = body["messages"]
        if not turns or turns[0].get("role") != "user":
            raise Refused(400, "messages: the first message must use the user role")
        return self._answer(turns[-1]["content"])

    def _answer(self, last: object) -> str:
        """'You asked: <last>' (refused while `fail_llm` > 0)."""
        with self._lock:
            failing = self.fail_llm > 0
            self.fail_llm -= failing
        if failing:
            raise Refused(400, "The model refused this request")
        return f"You asked: {last}"


def _chunks(answer: str, model: str, usage: bool) -> Iterator[dict[str, Any]]:
    """The answer as OpenAI chat-completion chunks: role, words, stop, then usage if asked."""
    base = {"id": "chatcmpl-local", "object": "chat.completion.chunk", "created": 1_700_000_000,
            "model": model}
    yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                "finish_reason": None}]}
    for word in answer.split(" "):
        yield {**base, "choices": [{"index": 0, "delta": {"content": word + " "},
                                    "finish_reason": None}]}
    yield {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    if usage:
        yield {**base, "choices": [], "usage": _USAGE}


_USAGE = {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}


def _message_events(answer: str, model: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """The answer as the Messages API streams it: (event name, data) in the reference's order."""
    message: dict[str, Any] = {
        "id": "msg_local", "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 9, "output_tokens": 1}}
    yield "message_start", {"type": "message_start", "message": message}
    yield "content_block_start", {"type": "content_block_start", "index": 0,
                                  "content_block": {"type": "text", "text": ""}}
    yield "ping", {"type": "ping"}
    for word in answer.split(" "):
        yield "content_block_delta", {"type": "content_block_delta", "index": 0,
                                      "delta": {"type": "text_delta", "text": word + " "}}
    yield "content_block_stop", {"type": "content_block_stop", "index": 0}
    yield "message_delta", {"type": "message_delta",
                            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                            "usage": {"output_tokens": 5}}
    yield "message_stop", {"type": "message_stop"}


class _Handler(JSONHandler):
    owner: PromptLayerAPI

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path = urlsplit(self.path).path
        owner = self.owner
        try:
            if path == TRACK_METADATA_PATH:
                self._forward(raw)
            elif path in ("/v1/traces", "/spans-bulk"):
                owner.spans(self.headers)  # type: ignore[arg-type]
                self.send_bytes(200, b"" if path == "/v1/traces" else b'{"success": true}',
                           "application/x-protobuf" if path == "/v1/traces" else "application/json")
            else:
                self._route(path, self._body(raw))
        except Refused as refused:
            with owner._lock:
                owner.refused.append((path, refused.status, refused.reason))
            if path == "/v1/chat/completions":
                self.answer(refused.status, {"error": {"message": refused.reason,
                                                      "type": "invalid_request_error"}})
            elif path == "/v1/messages":
                kind = ("authentication_error" if refused.status == 401
                        else "invalid_request_error")
                self.answer(refused.status, {"type": "error", "error": {
                    "type": kind, "message": refused.reason}})
            else:
                self.answer(refused.status, {"success": False, "message": refused.reason})

    def _body(self, raw: bytes) -> dict[str, Any]:
        if (self.headers.get("Content-Type") or "").split(";")[0].strip() != "application/json":
            raise Refused(400, "Content-Type must be application/json")
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, ValueError):
            raise Refused(400, "body is not JSON") from None
        if not isinstance(body, dict):
            raise Refused(400, "body must be a JSON object")
        return body

    def _route(self, path: str, body: dict[str, Any]) -> None:
        owner, headers = self.owner, self.headers
        if path.startswith("/prompt-templates/"):
            self.answer(*owner.get_template(unquote(path.removeprefix("/prompt-templates/")),
                                           body, headers))  # type: ignore[arg-type]
        elif path in ("/track-request", "/rest/track-request"):
            self.answer(*owner.track_request(body, headers))  # type: ignore[arg-type]
        elif path == "/log-request":
            self.answer(*owner.log_request(body, headers))  # type: ignore[arg-type]
        elif path == "/v1/chat/completions":
            self._answer_chat(body)
        elif path == "/v1/messages":
            self._answer_messages(body)
        else:
            raise Refused(404, f"no route {path}")

    def _answer_chat(self, body: dict[str, Any]) -> None:
        answer = self.owner.chat(body, self.headers)  # type: ignore[arg-type]
        model = body["model"]
        if not body.get("stream"):
            self.answer(200, {
                "id": "chatcmpl-local", "object": "chat.completion", "created": 1_700_000_000,
                "model": model, "usage": _USAGE,
                "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                             "message": {"role": "assistant", "content": answer}}]})
            return
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        events = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n"
                          for c in _chunks(answer, model, usage))
        self.send_bytes(200, events + b"data: [DONE]\n\n", "text/event-stream")

    def _answer_messages(self, body: dict[str, Any]) -> None:
        answer = self.owner.messages(body, self.headers)  # type: ignore[arg-type]
        model = body["model"]
        if not body.get("stream"):
            self.answer(200, {
                "id": "msg_local", "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": answer}], "stop_reason": "end_turn",
                "stop_sequence": None, "usage": {"input_tokens": 9, "output_tokens": 5}})
            return
        events = b"".join(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
                          for name, data in _message_events(answer, model))
        self.send_bytes(200, events, "text/event-stream")

    def _forward(self, raw: bytes) -> None:
        """Hand a track-metadata POST to the TrackMetadataServer, and its answer back."""
        target = self.owner.track_metadata
        if target is None:
            raise Refused(404, "no track-metadata server behind this fake")
        host, port = urlsplit(target.base_url).netloc.split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        try:
            headers = {k: v for k, v in self.headers.items()
                       if k.lower() in ("x-api-key", "content-type")}
            conn.request("POST", TRACK_METADATA_PATH, raw, headers)
            answer = conn.getresponse()
            self.send_bytes(answer.status, answer.read(),
                       answer.getheader("Content-Type") or "application/json")
        finally:
            conn.close()


PromptLayerAPI.handler = _Handler
