"""What the local stand-ins share: a threaded HTTP server on 127.0.0.1 with a JSON handler."""

from __future__ import annotations

import json
import socket
import sys
import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class _Server(ThreadingHTTPServer):
    # socketserver's default backlog of 5 overflows under a burst of reconnects (every reset
    # costs one), and a SYN dropped by a full backlog is only retried after a second.
    request_queue_size = 128
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up (its timeout, a reset we injected) is normal here: stay quiet."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class JSONHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive, quiet, answering JSON. `owner` is the `LocalServer` it serves."""

    owner: Any
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in two writes: without this, Nagle's algorithm and the
        # client's delayed ACK add 40 ms to every keep-alive answer.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.owner.connected()

    def read_body(self) -> bytes | None:
        """The request's body; None (after answering 400) for a bad Content-Length."""
        try:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        except ValueError:
            self.answer(400, {"success": False, "message": "bad Content-Length"})
            return None

    def answer(self, status: int, payload: Any,
               headers: Mapping[str, str] | None = None) -> None:
        self.send_bytes(status, json.dumps(payload).encode(), headers=headers)

    def send_bytes(self, status: int, data: bytes, content_type: str = "application/json",
                   headers: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


class LocalServer:
    """Start with ``with Server() as srv:`` (or start()/stop()); `base_url` is where it listens.

    Subclasses set `handler` (a request handler, usually a `JSONHandler`, given `owner`) and
    may set `path_prefix`.
    """

    handler: type[BaseHTTPRequestHandler]
    path_prefix = ""

    def __init__(self) -> None:
        self.connections = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()  # cuts waits in handlers short at stop()
        self._httpd: _Server | None = None

    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}{self.path_prefix}"

    def connected(self) -> None:
        with self._lock:
            self.connections += 1

    def start(self) -> Any:
        owner = self
        handler = type("Handler", (self.handler,), {"owner": owner})
        self._stopping.clear()
        self._httpd = _Server(("127.0.0.1", 0), handler)
        threading.Thread(target=self._httpd.serve_forever, args=(0.05,),
                         name=type(self).__name__, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._stopping.set()
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
