"""A track-metadata endpoint on 127.0.0.1 for the benchmarks, in its own process.

Prints its base URL, then serves until stdin says ``quit``; ``report`` prints (as one JSON line)
what it received since the last report and forgets it.

It checks every request with the test server's own rules (`testing.track_metadata.validate`,
SPEC §2) and keeps the metadata with the API's replace-per-key semantics, but it is one asyncio
loop of protocol callbacks rather than `http.server`'s thread per connection. A real API does not
share the client's two cores: the threaded server spent several times more CPU per request than
the client it was measuring, and 64 of its threads waking at once from the added latency queued
for one GIL, which set the floor of the burst benchmark (`bench_scale.py` ratio) instead of the
client. Faults are the tests' business; here every request is answered after `--latency`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import selectors
import sys
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

from otel_metadata.testing.track_metadata import PATH, validate

_MAX_HEAD = 64 * 1024
_SERVER = "otel-metadata-bench asyncio/" + sys.version.split()[0]
_MAX_BODY = 1024 * 1024


class _Headers(dict[str, str]):
    """Header fields by lower-cased name; `get` takes any case, as `email.message` does."""

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        return dict.get(self, name.lower(), default)


class Received:
    """What the endpoint was sent since the last report."""

    def __init__(self) -> None:
        self.statuses: dict[int, int] = {}
        self.metadata: dict[Any, dict[str, str]] = {}

    def record(self, status: int, rid: Any, md: Any) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if status == 200:
            self.metadata.setdefault(rid, {}).update(md)

    def report(self) -> str:
        out = json.dumps({"posts": sum(self.statuses.values()),
                          "statuses": self.statuses,
                          "metadata": [[k, v] for k, v in self.metadata.items()]})
        self.statuses, self.metadata = {}, {}
        return out


class _Connection(asyncio.Protocol):
    """One keep-alive connection: requests answered in order, each `latency` after it came."""

    def __init__(self, received: Received, api_key: str, latency: float) -> None:
        self.received = received
        self.api_key = api_key
        self.latency = latency
        self.buf = b""
        self.answering = False  # an answer is due: later requests wait in `buf`
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.answering:
            self._next()

    def _next(self) -> None:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > _MAX_HEAD:
                self._answer(431, {"success": False}, close=True)
            return
        lines = self.buf[:end].decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        headers = _Headers()
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                self._answer(400, {"success": False, "message": "bad header"}, close=True)
                return
            headers[name.strip().lower()] = value.strip()
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            self._answer(400, {"success": False, "message": "bad request line"}, close=True)
            return
        close = headers.get("connection", "").lower() == "close"
        length = headers.get("content-length")
        if parts[0] == "POST" and (length is None or not length.isdigit()
                                   or int(length) > _MAX_BODY):
            self._answer(411, {"success": False, "message": "Content-Length"}, close=True)
            return
        n = int(length or 0)
        if len(self.buf) < end + 4 + n:
            return  # the body is still coming
        raw = self.buf[end + 4:end + 4 + n]
        self.buf = self.buf[end + 4 + n:]
        if parts[1] != PATH:
            self._answer(404, {"success": False, "message": "not found"}, close)
        elif parts[0] != "POST":
            self._answer(405, {"success": False}, close)
        else:
            status, reason, rid, md = validate(headers, raw, self.api_key)
            self.received.record(status, rid, md)
            payload = ({"success": True, "message": "Metadata tracked"} if status == 200
                       else {"success": False, "message": reason})
            self._answer(status, payload, close)

    def _answer(self, status: int, payload: Any, close: bool = False) -> None:
        body = json.dumps(payload).encode()
        # The head `http.server` sends (Server, Date), so a client parses what it did before.
        data = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nServer: {_SERVER}\r\n"
                f"Date: {formatdate(usegmt=True)}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n"
                + ("Connection: close\r\n" if close else "") + "\r\n").encode() + body
        self.answering = True
        if self.latency:
            asyncio.get_running_loop().call_later(self.latency, self._send, data, close)
        else:
            self._send(data, close)

    def _send(self, data: bytes, close: bool) -> None:
        self.answering = False
        if self.transport is None:
            return
        self.transport.write(data)
        if close:
            self.transport.close()
        elif self.buf:
            self._next()


async def serve(api_key: str, latency: float) -> None:
    loop = asyncio.get_running_loop()
    received = Received()
    server = await loop.create_server(lambda: _Connection(received, api_key, latency),
                                      "127.0.0.1", 0, backlog=512)
    port = server.sockets[0].getsockname()[1]
    print(f"http://127.0.0.1:{port}", flush=True)
    done = loop.create_future()

    def command() -> None:
        line = sys.stdin.readline()
        if not line or line.strip() == "quit":
            if not done.done():
                done.set_result(None)
        elif line.strip() == "report":
            print(received.report(), flush=True)

    loop.add_reader(sys.stdin.fileno(), command)
    await done
    server.close()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--latency", type=float, default=0.0)
    p.add_argument("--api-key", required=True)
    args = p.parse_args()
    # select(2) waits to the microsecond; epoll, asyncio's default, rounds each wait up to
    # the next millisecond, which would add up to 1 ms to every answer's latency.
    loop = asyncio.SelectorEventLoop(selectors.SelectSelector())
    try:
        loop.run_until_complete(serve(args.api_key, args.latency))
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
