"""An embedded track-metadata server on 127.0.0.1, as strict as the real API (SPEC §2).

`otel-metadata demo` posts to it, and the tests use it as their PromptLayer: it checks every
request the way the API does, keeps the metadata per request ID with the API's replace-per-key
semantics, and can inject the faults a real network has (`Faults`).
"""

from __future__ import annotations

import json
import random
import socket
import struct
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from email.message import Message
from typing import Any, cast

from ._http import JSONHandler, LocalServer

PATH = "/rest/track-metadata"


@dataclass
class Faults:
    """What share of requests fail, and how. Drawn from a seeded RNG so runs repeat.

    `status` maps an HTTP status (500, 502, 503, 504, 429) to its share of requests; a 429
    carries ``Retry-After: retry_after``. `reset` resets the connection (TCP RST) instead of
    answering, without applying the update. `slow` applies the update but answers only after
    `slow_s` (meant to be beyond the client's timeout, so the client cannot know it landed).
    `refuse_for_s`: a window that opens with the first connection after `Faults` is installed,
    during which every connection is reset before its request is read (a server still starting).
    `first` scripts the answers to the first requests, before any share applies: each an HTTP
    status, ``"reset"`` or ``"slow"`` (for tests that need one exact sequence).
    """

    status: Mapping[int, float] = field(default_factory=dict)
    retry_after: str = "1"
    reset: float = 0.0
    slow: float = 0.0
    slow_s: float = 1.0
    refuse_for_s: float = 0.0
    first: Sequence[int | str] = ()
    seed: int = 0
    _rng: random.Random = field(init=False, repr=False)
    _refuse_until: float | None = field(init=False, repr=False, default=None)
    _drawn: int = field(init=False, repr=False, default=0)
    _lock: threading.Lock = field(init=False, repr=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def refusing(self) -> bool:
        """Whether the refusal window, opened by the first call, is still open."""
        now = time.monotonic()
        with self._lock:
            if self._refuse_until is None:
                self._refuse_until = now + self.refuse_for_s
            return now < self._refuse_until

    def draw(self) -> tuple[str, Any]:
        """('ok', None) | ('status', code) | ('reset', None) | ('slow', seconds)."""
        with self._lock:
            scripted = self.first[self._drawn] if self._drawn < len(self.first) else None
            self._drawn += 1
            x = self._rng.random()
        if isinstance(scripted, int):
            return ("status", scripted)
        if scripted is not None:
            return (scripted, self.slow_s if scripted == "slow" else None)
        for code, share in self.status.items():
            if x < share:
                return ("status", code)
            x -= share
        if x < self.reset:
            return ("reset", None)
        x -= self.reset
        if x < self.slow:
            return ("slow", self.slow_s)
        return ("ok", None)


@dataclass(frozen=True)
class Post:
    """One request the server answered: what it decided and what it was sent.

    `status` 0 means no answer (reset or refused); `at` is when it arrived (monotonic clock);
    `in_flight` how many requests the server was handling then, this one included (0: not
    counted, a connection reset before its request was read).
    """

    status: int
    request_id: Any
    metadata: Any
    reason: str = ""
    at: float = field(default_factory=time.monotonic)
    in_flight: int = 0


class TrackMetadataServer(LocalServer):
    """A local PromptLayer track-metadata endpoint. Use as a context manager or start()/stop()."""

    def __init__(self, api_key: str = "pl-local-demo-key", latency_s: float = 0.0) -> None:
        """`latency_s` is added to every answer, injected faults' too (an overloaded API
        answers 503 late, not at once)."""
        super().__init__()
        self.api_key = api_key
        self.latency_s = latency_s
        # POSTs being handled now, and the most at once since start (or `peak_in_flight = 0`).
        self.in_flight = 0
        self.peak_in_flight = 0
        self.faults: Faults | None = None
        self.metadata: dict[Any, dict[str, str]] = {}
        self.posts: list[Post] = []
        # While `gate` is an Event not yet set, requests wait at it (after one `waiting.release()`
        # each, so a test knows a sender is stuck there), then go on as usual.
        self.gate: threading.Event | None = None
        self.waiting = threading.Semaphore(0)

    def start(self) -> TrackMetadataServer:
        return cast(TrackMetadataServer, super().start())

    def __enter__(self) -> TrackMetadataServer:
        return self.start()

    def accepted(self) -> list[Post]:
        with self._lock:
            return [p for p in self.posts if p.status == 200]

    def statuses(self) -> dict[int, int]:
        with self._lock:
            counts: dict[int, int] = {}
            for p in self.posts:
                counts[p.status] = counts.get(p.status, 0) + 1
            return counts

    def _arrive(self) -> int:
        with self._lock:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            return self.in_flight

    def _leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def _record(self, post: Post) -> None:
        with self._lock:
            self.posts.append(post)
            if post.status == 200:
                # The API replaces the value of each key it is sent; other keys stay.
                self.metadata.setdefault(post.request_id, {}).update(post.metadata)


def validate(
    headers: Mapping[str, str] | Message, raw: bytes, api_key: str
) -> tuple[int, str, Any, Any]:
    """Check a request as the API does: (status, reason, request_id, metadata)."""
    if headers.get("X-API-KEY") != api_key:
        return 401, "invalid or missing X-API-KEY", None, None
    if (headers.get("Content-Type") or "").split(";")[0].strip() != "application/json":
        return 400, "Content-Type must be application/json", None, None
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        return 400, "body is not JSON", None, None
    if not isinstance(body, dict):
        return 400, "body must be a JSON object", None, None
    if "api_key" in body:
        return 400, "api_key must not be sent in the body", None, None
    extra = set(body) - {"request_id", "metadata"}
    if extra:
        return 422, f"unexpected fields {sorted(extra)}", None, None
    rid, md = body.get("request_id"), body.get("metadata")
    valid_id = (isinstance(rid, int) and not isinstance(rid, bool)) or (
        isinstance(rid, str) and rid.strip() != "")
    if not valid_id:
        return 422, "request_id must be an int or a non-empty string", rid, md
    if not isinstance(md, dict) or not md:
        return 422, "metadata must be a non-empty object", rid, md
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in md.items()):
        return 422, "metadata keys and values must be strings", rid, md
    return 200, "", rid, md


class _Handler(JSONHandler):
    owner: TrackMetadataServer
    # An answer's head and body leave in one write, as a production server sends a small
    # answer (`http.server` flushes after each request): not two segments, two client wake-ups.
    wbufsize = -1

    def _reset(self, reason: str) -> None:
        """Record `reason` and reset the connection: a zero linger makes the close send RST."""
        self.owner._record(Post(0, None, None, reason))
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()  # the fd closes once the handler's reader and writer do

    def handle(self) -> None:
        faults = self.owner.faults
        if faults is not None and faults.refusing():
            self._reset("refused")
            return
        super().handle()

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        owner = self.owner
        faults = owner.faults
        if faults is not None and faults.refusing():  # a keep-alive connection from before
            self._reset("refused")
            return
        raw = self.read_body()
        if raw is None:
            return
        if self.path != PATH:
            self.answer(404, {"success": False, "message": "not found"})
            return
        level = owner._arrive()
        try:
            self._track(raw, faults, level)
        finally:
            owner._leave()

    def _track(self, raw: bytes, faults: Faults | None, level: int) -> None:
        owner = self.owner
        gate = owner.gate
        if gate is not None and not gate.is_set():
            owner.waiting.release()
            while not gate.wait(0.05) and not owner._stopping.is_set():
                pass
        kind: str
        arg: Any
        kind, arg = faults.draw() if faults else ("ok", None)
        if kind == "reset":
            self._reset("reset")
            return
        if kind == "status":
            owner._record(Post(arg, None, None, "injected", in_flight=level))
            if owner.latency_s:
                time.sleep(owner.latency_s)
            extra = {"Retry-After": faults.retry_after} if arg == 429 and faults else {}
            self.answer(arg, {"success": False, "message": "injected fault"}, extra)
            return
        status, reason, rid, md = validate(self.headers, raw, owner.api_key)
        owner._record(Post(status, rid, md, reason or ("answered late" if kind == "slow" else ""),
                           in_flight=level))
        if kind == "slow":
            owner._stopping.wait(arg)
        elif owner.latency_s:
            time.sleep(owner.latency_s)
        if status == 200:
            self.answer(200, {"success": True, "message": "Metadata tracked"})
        else:
            self.answer(status, {"success": False, "message": reason})

    def do_GET(self) -> None:  # noqa: N802
        self.answer(405 if self.path == PATH else 404, {"success": False})


TrackMetadataServer.handler = _Handler
