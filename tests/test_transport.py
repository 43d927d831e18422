"""The transport keeps what users relied on when it stood on `requests`: HTTPS verified against
the CA bundle the environment names (refused with one clear line without it), proxies from the
environment (read once, NO_PROXY honoured), keep-alive, and a key that is never shown.

Everything runs on 127.0.0.1: the strict local server (over TLS with a CA made by `trustme` for
the test), and a small HTTP proxy that tunnels CONNECT and forwards plain-http requests.
"""

from __future__ import annotations

import base64
import collections
import http.client
import json
import logging
import selectors
import socket
import socketserver
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import trustme
from conftest import API_KEY, tcp_sockets, wait_until
from hypothesis import given, settings
from hypothesis import strategies as st

from otel_metadata import http1
from otel_metadata import transport as transport_module
from otel_metadata.config import resolve
from otel_metadata.delivery import Delivery
from otel_metadata.queue import RecordQueue
from otel_metadata.stats import Stats
from otel_metadata.testing._http import JSONHandler, LocalServer
from otel_metadata.testing.track_metadata import PATH, TrackMetadataServer
from otel_metadata.transport import CA_BUNDLE_VARS, Connection, Outcome, Transport

PROXY_VARS = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "NO_PROXY")
PROXY_PASSWORD = "proxy-secret-9c1e"


@pytest.fixture(autouse=True)
def _no_tls_or_proxy_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the developer's shell exports, tests start with no proxy and no CA bundle."""
    for name in PROXY_VARS + CA_BUNDLE_VARS:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


@pytest.fixture(scope="module")
def ca_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[trustme.CA, Path]]:
    ca = trustme.CA()
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    yield ca, path


def serve_tls(httpd: socketserver.TCPServer, context: ssl.SSLContext) -> None:
    """Make `httpd` speak TLS: done before any client connects; each handshake happens in its
    connection's thread. A client refusing the certificate is what some tests make happen, so
    that failure prints no traceback."""
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True,
                                       do_handshake_on_connect=False)
    loud = httpd.handle_error

    def handle_error(request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ssl.SSLError):
            loud(request, client_address)

    httpd.handle_error = handle_error  # type: ignore[method-assign]


def server_context(ca_file: tuple[trustme.CA, Path]) -> ssl.SSLContext:
    """A server's TLS context, with a certificate for 127.0.0.1 signed by the test's CA."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca_file[0].issue_cert("127.0.0.1").configure_cert(context)
    return context


@pytest.fixture
def tls_server(ca_file: tuple[trustme.CA, Path]) -> Iterator[TrackMetadataServer]:
    """The strict server over TLS."""
    with TrackMetadataServer(api_key=API_KEY) as srv:
        assert srv._httpd is not None
        serve_tls(srv._httpd, server_context(ca_file))
        yield srv


def https_endpoint(server: TrackMetadataServer) -> str:
    return server.base_url.replace("http://", "https://") + PATH


class Proxy(LocalServer):
    """An HTTP proxy on 127.0.0.1: tunnels CONNECT (https), forwards absolute-form requests
    (plain http). `seen` holds each request line and its headers (names lower-cased)."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        super().__init__()
        self.seen: list[tuple[str, dict[str, str]]] = []
        self.start()
        assert self._httpd is not None
        if tls is not None:
            serve_tls(self._httpd, tls)
        self.url = self.base_url.replace("http://", "https://") if tls else self.base_url

    def lines(self) -> list[str]:
        """Method and target of each request (http.client sends CONNECT as HTTP/1.0)."""
        return [line.rsplit(" ", 1)[0] for line, _ in self.seen]

    def close(self) -> None:
        self.stop()


class _ProxyHandler(BaseHTTPRequestHandler):
    owner: Proxy
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass

    def _note(self) -> None:
        self.owner.seen.append((self.requestline, {k.lower(): v for k, v in self.headers.items()}))

    def do_CONNECT(self) -> None:  # noqa: N802 - http.server's naming
        self._note()
        host, port = self.path.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as upstream:
            self.send_response(200, "Connection established")
            self.end_headers()
            self.close_connection = True
            self._pipe(upstream)

    def _pipe(self, upstream: socket.socket) -> None:
        """Copy bytes both ways until either side closes (or the proxy stops)."""
        for sock in (self.connection, upstream):  # no Nagle delay on each relayed write
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with selectors.DefaultSelector() as selector:
            selector.register(self.connection, selectors.EVENT_READ, upstream)
            selector.register(upstream, selectors.EVENT_READ, self.connection)
            while not self.owner._stopping.is_set():
                for key, _ in selector.select(0.05):
                    source: socket.socket = key.fileobj  # type: ignore[assignment]
                    while True:
                        data = source.recv(65536)
                        if not data:
                            return
                        key.data.sendall(data)
                        # TLS from the client: decrypted bytes may wait that select cannot see.
                        if not isinstance(source, ssl.SSLSocket) or not source.pending():
                            break

    def do_POST(self) -> None:  # noqa: N802
        self._note()
        target = urlsplit(self.path)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in ("proxy-authorization", "connection")}
        upstream = http.client.HTTPConnection(target.hostname or "", target.port, timeout=5)
        try:
            upstream.request("POST", target.path, body, headers)
            answer = upstream.getresponse()
            data = answer.read()
        finally:
            upstream.close()
        self.send_response(answer.status)
        for name, value in answer.getheaders():
            if name.lower() not in ("connection", "content-length"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def proxy() -> Iterator[Proxy]:
    p = Proxy()
    yield p
    p.close()


def post_one(transport: Transport, request_id: int = 1) -> Any:
    try:
        return transport.post(request_id, {"user_id": "u-1"}, timeout=5)
    finally:
        transport.close()


# -- TLS --

@pytest.mark.parametrize("variable", CA_BUNDLE_VARS)
def test_https_is_verified_against_the_ca_bundle_the_environment_names(
    tls_server: TrackMetadataServer, ca_file: tuple[trustme.CA, Path], variable: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(variable, str(ca_file[1]))
    outcome = post_one(Transport(https_endpoint(tls_server), API_KEY, 1))
    assert outcome.status == 200
    assert tls_server.metadata == {1: {"user_id": "u-1"}}


def test_a_certificate_no_trusted_ca_signed_is_refused_with_one_clear_line(
    tls_server: TrackMetadataServer, caplog: pytest.LogCaptureFixture,
) -> None:
    endpoint = https_endpoint(tls_server)
    transport = Transport(endpoint, API_KEY, 1)
    outcomes = [transport.post(rid, {"user_id": "u-1"}, timeout=5) for rid in (1, 2)]
    transport.close()

    assert all(o.status is None and o.error == "SSLError" for o in outcomes)
    assert "certificate verify failed" in outcomes[0].detail
    lines = [r.getMessage() for r in caplog.records if r.name == "otel_metadata"]
    origin = endpoint[: -len(PATH)]
    assert len(lines) == 1 and f"certificate verify failed for {origin}" in lines[0]
    assert "REQUESTS_CA_BUNDLE" in lines[0] and "SSL_CERT_FILE" in lines[0]
    assert tls_server.posts == []  # nothing was sent: no request reached the handler


def test_the_tls_warning_goes_through_the_callers_stats(
    tls_server: TrackMetadataServer, caplog: pytest.LogCaptureFixture,
) -> None:
    # Two transports (a forked child builds a new one) share one once-only warning.
    stats = Stats()
    for _ in range(2):
        assert post_one(Transport(https_endpoint(tls_server), API_KEY, 1, stats)).status is None
    assert len([r for r in caplog.records if "certificate verify failed" in r.getMessage()]) == 1


def test_a_ca_bundle_that_cannot_be_read_is_said_and_trusts_nothing(
    tls_server: TrackMetadataServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    missing = tmp_path / "no-such-ca.pem"
    monkeypatch.setenv("SSL_CERT_FILE", str(missing))
    outcome = post_one(Transport(https_endpoint(tls_server), API_KEY, 1))
    assert outcome.status is None and outcome.error == "SSLError"
    assert f"cannot load the CA bundle {missing}" in caplog.text


def test_the_ca_bundle_is_read_once_at_construction(
    tls_server: TrackMetadataServer, ca_file: tuple[trustme.CA, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca_file[1]))
    transport = Transport(https_endpoint(tls_server), API_KEY, 1)
    monkeypatch.delenv("REQUESTS_CA_BUNDLE")
    assert post_one(transport).status == 200


# -- proxies --

@pytest.mark.parametrize("variable", ["HTTPS_PROXY", "https_proxy", "ALL_PROXY"])
def test_https_goes_through_the_proxy_the_environment_names_in_a_tunnel(
    tls_server: TrackMetadataServer, ca_file: tuple[trustme.CA, Path], proxy: Proxy,
    variable: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file[1]))
    monkeypatch.setenv(variable, proxy.url)
    outcome = post_one(Transport(https_endpoint(tls_server), API_KEY, 1))

    assert outcome.status == 200 and tls_server.metadata == {1: {"user_id": "u-1"}}
    host, port = tls_server.base_url[len("http://"):].split(":")
    assert proxy.lines() == [f"CONNECT {host}:{port}"]
    # The key went inside the tunnel, encrypted; the proxy never saw it.
    assert all(API_KEY not in repr(headers) for _, headers in proxy.seen)


@pytest.mark.parametrize("endpoint_scheme", ["https", "http"])
def test_a_proxy_reached_over_https_is_verified_with_the_same_ca_bundle(
    server: TrackMetadataServer, tls_server: TrackMetadataServer,
    ca_file: tuple[trustme.CA, Path], endpoint_scheme: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    tls_proxy = Proxy(tls=server_context(ca_file))
    try:
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca_file[1]))
        monkeypatch.setenv("ALL_PROXY", tls_proxy.url)
        target = tls_server if endpoint_scheme == "https" else server
        endpoint = https_endpoint(tls_server) if target is tls_server else server.base_url + PATH
        outcome = post_one(Transport(endpoint, API_KEY, 1))
        assert outcome.status == 200 and target.metadata == {1: {"user_id": "u-1"}}
        assert [line.split()[0] for line in tls_proxy.lines()] == [
            "CONNECT" if target is tls_server else "POST"]
    finally:
        tls_proxy.close()


@pytest.mark.parametrize("variable", ["HTTP_PROXY", "http_proxy"])
def test_plain_http_is_forwarded_by_the_proxy_the_environment_names(
    server: TrackMetadataServer, proxy: Proxy, variable: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(variable, proxy.url)
    outcome = post_one(Transport(server.base_url + PATH, API_KEY, 1))

    assert outcome.status == 200 and server.metadata == {1: {"user_id": "u-1"}}
    assert proxy.lines() == [f"POST {server.base_url}{PATH}"]


def test_proxy_credentials_in_its_url_are_sent_to_it_and_never_shown(
    server: TrackMetadataServer, proxy: Proxy, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("HTTP_PROXY", proxy.url.replace("://", f"://me:{PROXY_PASSWORD}@"))
    transport = Transport(server.base_url + PATH, API_KEY, 1)
    assert PROXY_PASSWORD not in repr(transport)
    assert post_one(transport).status == 200

    sent = proxy.seen[0][1]["proxy-authorization"]
    assert sent == "Basic " + base64.b64encode(f"me:{PROXY_PASSWORD}".encode()).decode()
    assert PROXY_PASSWORD not in caplog.text


@pytest.mark.parametrize("no_proxy", ["127.0.0.1", "localhost,127.0.0.1", "*"])
def test_no_proxy_names_hosts_that_are_reached_directly(
    tls_server: TrackMetadataServer, ca_file: tuple[trustme.CA, Path], proxy: Proxy,
    no_proxy: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file[1]))
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    monkeypatch.setenv("no_proxy", no_proxy)
    assert post_one(Transport(https_endpoint(tls_server), API_KEY, 1)).status == 200
    assert proxy.seen == [] and tls_server.metadata == {1: {"user_id": "u-1"}}


def test_proxy_settings_are_read_once_at_construction(
    server: TrackMetadataServer, proxy: Proxy, monkeypatch: pytest.MonkeyPatch,
) -> None:
    endpoint = server.base_url + PATH
    direct = Transport(endpoint, API_KEY, 1)
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    proxied = Transport(endpoint, API_KEY, 1)
    monkeypatch.delenv("HTTP_PROXY")

    assert post_one(direct, 1).status == 200 and proxy.seen == []
    assert post_one(proxied, 2).status == 200
    assert proxy.lines() == [f"POST {endpoint}"]


# -- keep-alive, and the key --

@pytest.mark.parametrize("route", ["http", "https", "https via proxy"])
def test_posts_reuse_one_kept_alive_connection(
    route: str, server: TrackMetadataServer, tls_server: TrackMetadataServer,
    ca_file: tuple[trustme.CA, Path], proxy: Proxy, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca_file[1]))
    if route.endswith("proxy"):
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    target = server if route == "http" else tls_server
    endpoint = server.base_url + PATH if route == "http" else https_endpoint(tls_server)
    transport = Transport(endpoint, API_KEY, 4)
    outcomes = [transport.post(rid, {"n": str(rid)}, timeout=5) for rid in range(20)]
    transport.close()

    assert [o.status for o in outcomes] == [200] * 20 and len(target.metadata) == 20
    assert target.connections == 1
    assert len(proxy.seen) == (1 if route.endswith("proxy") else 0)


def test_the_key_is_in_no_log_line_repr_or_outcome(
    server: TrackMetadataServer, tls_server: TrackMetadataServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)  # the transport's connection logs included
    wrong = Transport(server.base_url + PATH, "pl-wrong-but-secret-4f9a2c", 1)
    untrusted = Transport(https_endpoint(tls_server), API_KEY, 1)
    ok = Transport(server.base_url + PATH, API_KEY, 1)
    outcomes = [post_one(t) for t in (wrong, untrusted, ok)]

    assert [o.status for o in outcomes] == [401, None, 200]
    assert any(r.name == "otel_metadata.transport" for r in caplog.records)  # the test saw them
    shown = caplog.text + "".join(repr(t) + str(t) for t in (wrong, untrusted, ok))
    shown += "".join(repr(o) for o in outcomes)
    assert API_KEY not in shown and "pl-wrong-but-secret-4f9a2c" not in shown



# -- the wire: framing, keep-alive, a server that hangs up or never answers --

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Scripted(LocalServer):
    """A server on 127.0.0.1 that answers each POST with the raw bytes `answer`, then does what
    the next word of `script` says (`default` once it is used up): "keep" the connection,
    "close" it (without saying so in the answer), "hang up" (close without answering), or stay
    "silent" (never answer). `ids` are the request IDs it read; `closed` counts the connections
    it has closed."""

    def __init__(self, answer: bytes = OK, *script: str, default: str = "keep") -> None:
        super().__init__()
        self.answer = answer
        self.script = collections.deque(script)
        self.default = default
        self.ids: list[Any] = []
        self.closed = 0
        self.start()

    def next_move(self) -> str:
        with self._lock:
            return self.script.popleft() if self.script else self.default


class _ScriptedHandler(JSONHandler):
    owner: Scripted

    def finish(self) -> None:
        super().finish()
        self.connection.close()  # counted once closed: the client may already see it
        with self.owner._lock:
            self.owner.closed += 1

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        owner = self.owner
        body = self.rfile.read(int(self.headers["Content-Length"]))
        move = owner.next_move()
        with owner._lock:
            owner.ids.append(json.loads(body)["request_id"])
        if move == "silent":
            owner._stopping.wait(30)
        elif move != "hang up":
            self.wfile.write(owner.answer)
            self.wfile.flush()
        self.close_connection = move != "keep"


Scripted.handler = _ScriptedHandler


@pytest.fixture
def scripted() -> Iterator[Any]:
    """Make `Scripted` servers; each is stopped after the test."""
    made: list[Scripted] = []

    def make(*args: Any, **kwargs: Any) -> Scripted:
        made.append(Scripted(*args, **kwargs))
        return made[-1]

    yield make
    for srv in made:
        srv.stop()


def test_a_chunked_answer_is_read_to_its_end_and_its_connection_kept(scripted: Any) -> None:
    srv = scripted(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"4;ext=1\r\nokok\r\n1\r\n!\r\n0\r\nX-Trailer: t\r\n\r\n")
    transport = Transport(srv.base_url + PATH, API_KEY, 1)
    outcomes = [transport.post(rid, {"a": "b"}, timeout=5) for rid in (1, 2)]
    transport.close()
    assert [o.status for o in outcomes] == [200, 200]
    assert srv.ids == [1, 2] and srv.connections == 1


def test_a_chunked_error_body_is_the_detail(scripted: Any) -> None:
    srv = scripted(b"HTTP/1.1 503 Busy\r\nTransfer-Encoding: chunked\r\nRetry-After: 7\r\n\r\n"
                   b"5\r\ntoo b\r\n4\r\nusy!\r\n0\r\n\r\n")
    outcome = post_one(Transport(srv.base_url + PATH, API_KEY, 1))
    assert outcome == Outcome(503, retry_after=7.0, detail="too busy!")


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.0 200 OK\r\n\r\nthe body ends with the connection",
], ids=["connection-close", "http1.0-until-close"])
def test_an_answer_that_ends_its_connection_makes_the_next_post_open_a_new_one(
    scripted: Any, answer: bytes,
) -> None:
    srv = scripted(answer, default="close")
    stats = Stats()
    transport = Transport(srv.base_url + PATH, API_KEY, 4, stats)
    outcomes = [transport.post(rid, {"a": "b"}, timeout=5) for rid in (1, 2)]
    transport.close()
    assert [o.status for o in outcomes] == [200, 200]
    assert srv.ids == [1, 2] and srv.connections == 2
    # A new connection because the answer said so, not a resend on a connection kept in vain.
    assert stats.snapshot().get("resent", 0) == 0


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_kept_connection_the_server_closed_while_idle_is_reconnected_and_sent_again_once(
    scripted: Any, ca_file: tuple[trustme.CA, Path], scheme: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    srv = scripted(OK, "close")  # closes after the first answer, which did not say it would
    if scheme == "https":
        assert srv._httpd is not None
        serve_tls(srv._httpd, server_context(ca_file))
        monkeypatch.setenv("SSL_CERT_FILE", str(ca_file[1]))
    stats = Stats()
    transport = Transport(f"{scheme}://{srv.base_url[len('http://'):]}{PATH}", API_KEY, 1, stats)
    assert transport.post(1, {"a": "b"}, timeout=5).status == 200
    wait_until(lambda: srv.closed == 1, "the server to close the idle connection")

    assert transport.post(2, {"a": "b"}, timeout=5) == Outcome(200)
    transport.close()
    assert srv.ids == [1, 2]  # the second request reached the server once: on the new connection
    assert srv.connections == 2 and stats.snapshot()["resent"] == 1


def test_on_a_loop_a_kept_connection_hears_the_servers_close_while_idle(scripted: Any) -> None:
    """Kept alive, it stays registered for reading: the server's close is seen while idle, so
    the next request opens a new connection at once, with no resend."""
    srv = scripted(OK, "close")  # closes after the first answer, which did not say it would
    stats = Stats()
    transport = Transport(srv.base_url + PATH, API_KEY, 1, stats)
    conn = transport.connection()
    with selectors.DefaultSelector() as selector:
        assert drive([(conn, transport.request(1, {"a": "b"}))], selector)[0].status == 200
        assert conn.reusable
        wait_until(lambda: srv.closed == 1, "the server to close the idle connection")
        ready = selector.select(5)
        assert [key.data for key, _ in ready] == [conn]
        assert conn.advance() is None and not conn.reusable and conn.fileno() == -1
        assert not selector.get_map()
        assert drive([(conn, transport.request(2, {"a": "b"}))], selector)[0] == Outcome(200)
    conn.close()
    assert srv.ids == [1, 2] and srv.connections == 2
    assert stats.snapshot().get("resent", 0) == 0


def _half_closed_to(port: int | None) -> list[str]:
    """Our TCP connections to 127.0.0.1:`port` that the server closed and we have not
    (CLOSE_WAIT): what the loop closes on hearing the server's close."""
    return [row[2] for row in tcp_sockets() if row[2] == f"0100007F:{port:04X}" and row[3] == "08"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_delivery_goes_on_after_the_server_closes_its_kept_connections_while_idle(
    scripted: Any,
) -> None:
    """Each close is heard on the loop while the connection is idle (no resend), and the loop
    goes on delivering on new connections."""
    srv = scripted(OK, default="close")
    settings = resolve(api_key=API_KEY, base_url=srv.base_url, schedule_delay_millis=0)
    stats = Stats()
    delivery = Delivery(RecordQueue(16, 16, 0), Transport(settings.endpoint, API_KEY, 1, stats),
                        settings, stats)
    port = urlsplit(srv.base_url).port
    try:
        for rid in (1, 2, 3):
            assert delivery.submit(rid, {"a": "b"}) and delivery.force_flush(10)
            wait_until(lambda n=rid: srv.closed == n, "the server to close the idle connection")
            wait_until(lambda: not _half_closed_to(port), "the loop to close its end too")
    finally:
        delivery.shutdown(1)
    assert srv.ids == [1, 2, 3] and srv.connections == 3
    assert stats.snapshot().get("resent", 0) == 0 and stats.snapshot()["delivered"] == 3


def test_a_resend_happens_once_and_a_new_connection_that_fails_is_an_error(
    scripted: Any,
) -> None:
    srv = scripted(OK, "keep", default="hang up")
    transport = Transport(srv.base_url + PATH, API_KEY, 1)
    assert transport.post(1, {"a": "b"}, timeout=5).status == 200
    # Hung up on, on the kept connection: sent again on a new one, hung up on there too.
    second = transport.post(2, {"a": "b"}, timeout=5)
    # A new connection hung up on: no resend.
    third = transport.post(3, {"a": "b"}, timeout=5)
    transport.close()
    for outcome in (second, third):
        assert outcome.status is None and outcome.error == "ConnectionError"
        assert "Remote end closed connection without response" in outcome.detail
    assert srv.ids == [1, 2, 2, 3]


def test_a_malformed_answer_is_a_connection_error_and_ends_the_connection(
    scripted: Any,
) -> None:
    srv = scripted(b"HELLO THERE\r\n\r\n")
    transport = Transport(srv.base_url + PATH, API_KEY, 1)
    outcomes = [transport.post(rid, {"a": "b"}, timeout=5) for rid in (1, 2)]
    transport.close()
    assert all(o.error == "ConnectionError" and "bad status line" in o.detail for o in outcomes)
    assert srv.connections == 2


def test_a_server_that_never_answers_is_a_read_timeout(scripted: Any) -> None:
    srv = scripted(default="silent")
    transport = Transport(srv.base_url + PATH, API_KEY, 1)
    started = time.monotonic()
    outcome = transport.post(1, {"a": "b"}, timeout=0.3)
    took = time.monotonic() - started
    transport.close()
    assert outcome.status is None and outcome.error == "ReadTimeout"
    assert "timed out" in outcome.detail and 0.3 <= took < 3
    assert srv.ids == [1]


@pytest.mark.parametrize("ttl", [30.0, 0.0])
def test_a_host_is_looked_up_once_per_resolve_ttl_not_per_connection(
    server: TrackMetadataServer, lookups: dict[str, Any], ttl: float,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(transport_module, "RESOLVE_TTL_S", ttl)
    transport = Transport(server.base_url.replace("127.0.0.1", "api.example.test") + PATH,
                          API_KEY, 1)
    for rid in (1, 2, 3):
        assert transport.post(rid, {"a": "b"}, timeout=5).status == 200
        transport.close()  # the next POST opens a new connection
    assert lookups["calls"]["api.example.test"] == (1 if ttl else 3)
    assert sorted(server.metadata) == [1, 2, 3]


def test_a_new_connection_tries_the_next_address_when_one_refuses_and_starts_with_it_after(
    server: TrackMetadataServer, lookups: dict[str, Any],
) -> None:
    # An IPv6 address without a route, a host down: the first answer refuses, the second works.
    lookups["answers"] = ["127.0.0.2", "127.0.0.1"]
    transport = Transport(server.base_url.replace("127.0.0.1", "api.example.test") + PATH,
                          API_KEY, 1)
    assert transport.post(1, {"a": "b"}, timeout=5).status == 200
    assert [a[3][0] for a in transport.addresses()] == ["127.0.0.1", "127.0.0.2"]
    transport.close()
    lookups["answers"] = ["127.0.0.2", "127.0.0.3"]  # none answers: the last error is told
    refused = Transport(server.base_url.replace("127.0.0.1", "down.example.test") + PATH,
                        API_KEY, 1)
    outcome = post_one(refused)
    assert outcome.error == "ConnectionError" and "Connection refused" in outcome.detail
    assert server.metadata == {1: {"a": "b"}}


def unreachable(port: int, via_proxy: bool, monkeypatch: pytest.MonkeyPatch) -> str:
    """An endpoint on 127.0.0.1:`port`, or one whose proxy (from the environment) is there:
    then the proxy is what cannot be reached."""
    if not via_proxy:
        return f"http://127.0.0.1:{port}{PATH}"
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")
    return f"http://192.0.2.1{PATH}"


@pytest.mark.parametrize("via_proxy", [False, True])
def test_a_connect_that_never_completes_is_a_connect_timeout(
    unaccepting_port: int, via_proxy: bool, monkeypatch: pytest.MonkeyPatch,
) -> None:
    transport = Transport(unreachable(unaccepting_port, via_proxy, monkeypatch), API_KEY, 1)
    started = time.monotonic()
    outcome = transport.post(1, {"a": "b"}, timeout=0.3)
    took = time.monotonic() - started
    transport.close()
    assert outcome.status is None and 0.3 <= took < 3
    if via_proxy:
        assert outcome.error == "ProxyError" and "connect timed out" in outcome.detail
    else:
        assert outcome.error == "ConnectTimeout"
        assert f"connect to 127.0.0.1:{unaccepting_port} timed out" in outcome.detail


@pytest.mark.parametrize("via_proxy", [False, True])
def test_a_connect_to_a_closed_port_is_refused(
    closed_port: int, via_proxy: bool, monkeypatch: pytest.MonkeyPatch,
) -> None:
    outcome = post_one(Transport(unreachable(closed_port, via_proxy, monkeypatch), API_KEY, 1))
    assert outcome.status is None and outcome.error == ("ProxyError" if via_proxy
                                                         else "ConnectionError")
    assert "[Errno 111] Connection refused" in outcome.detail


# -- many connections on one selectors loop --

def drive(exchanges: list[tuple[Connection, bytes]], selector: selectors.BaseSelector,
          on_turn: Any = None) -> list[Outcome]:
    """Run every exchange at once on `selector`, as the delivery loop does; their Outcomes."""
    outcomes: dict[int, Outcome] = {}
    index = {id(conn): i for i, (conn, _) in enumerate(exchanges)}
    for i, (conn, request) in enumerate(exchanges):
        outcome = conn.begin(request, 5, selector)
        if outcome is not None:
            outcomes[i] = outcome
    give_up = time.monotonic() + 30
    while len(outcomes) < len(exchanges):
        assert time.monotonic() < give_up, f"{len(outcomes)} of {len(exchanges)} ended"
        for key, _ in selector.select(0.05):
            outcome = key.data.advance()
            if outcome is not None:
                outcomes[index[id(key.data)]] = outcome
        now = time.monotonic()
        for i, (conn, _) in enumerate(exchanges):
            if i not in outcomes and now >= conn.deadline:
                outcomes[i] = conn.timed_out()
        if on_turn is not None:
            on_turn()
    # What stays registered is a kept connection, idle, listening for the server's close.
    assert all(key.data.reusable and key.events == selectors.EVENT_READ
               for key in selector.get_map().values())
    return [outcomes[i] for i in range(len(exchanges))]


@pytest.mark.parametrize("route", ["http", "https", "https via proxy", "https via https proxy"])
def test_many_connections_are_driven_at_once_by_one_selectors_loop(
    route: str, server: TrackMetadataServer, tls_server: TrackMetadataServer,
    ca_file: tuple[trustme.CA, Path], proxy: Proxy, monkeypatch: pytest.MonkeyPatch,
) -> None:
    n = 32
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca_file[1]))
    tls_proxy = Proxy(tls=server_context(ca_file)) if route.endswith("https proxy") else None
    if route.endswith("proxy"):
        monkeypatch.setenv("HTTPS_PROXY", (tls_proxy or proxy).url)
    target = server if route == "http" else tls_server
    endpoint = server.base_url + PATH if route == "http" else https_endpoint(tls_server)
    transport = Transport(endpoint, API_KEY, n)
    conns = [transport.connection() for _ in range(n)]
    # The server holds every request until all of them are in, so all were in flight at once.
    gate = target.gate = threading.Event()
    arrived = [0]

    def count_arrivals() -> None:
        while target.waiting.acquire(blocking=False):
            arrived[0] += 1
        if arrived[0] == n:
            gate.set()

    try:
        with selectors.DefaultSelector() as selector:
            first = drive([(c, transport.request(rid, {"n": str(rid)})) for rid, c in
                           enumerate(conns)], selector, count_arrivals)
            assert arrived[0] == n and [o.status for o in first] == [200] * n
            # And again on the same connections, kept alive.
            again = drive([(c, transport.request(n + rid, {"n": "again"})) for rid, c in
                           enumerate(conns)], selector)
        assert [o.status for o in again] == [200] * n
        assert sorted(p.request_id for p in target.posts) == list(range(2 * n))
        assert target.connections == n
    finally:
        for conn in conns:
            conn.close()
        if tls_proxy is not None:
            tls_proxy.close()


# -- the response parser, bytes arriving in pieces --

_TOKEN = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-"
_header_values = st.from_regex(r"([!-~]([ -~]*[!-~])?)?", fullmatch=True)


@st.composite
def answers(draw: Any) -> tuple[bytes, dict[str, Any]]:
    """A valid answer's bytes, and what parsing it must give."""
    eol = draw(st.sampled_from(["\r\n", "\n"]))
    status = draw(st.integers(200, 599).filter(lambda s: s not in (204, 304)))
    reason = draw(st.sampled_from(["", "OK", "Some Reason"]))
    headers = draw(st.lists(st.tuples(st.text(_TOKEN, min_size=1, max_size=8).map(
        lambda name: "X-" + name), _header_values), max_size=6))
    framing = draw(st.sampled_from(["length", "chunked", "close"]))
    body = draw(st.binary(max_size=300))
    interim = draw(st.lists(st.sampled_from([100, 102, 103]), max_size=2))
    head = "".join(f"HTTP/1.1 {code} Interim{eol}X-Interim: 1{eol}{eol}" for code in interim)
    head += f"HTTP/1.{0 if framing == 'close' else 1} {status} {reason}".rstrip() + eol
    head += "".join(f"{name}: {value}{eol}" for name, value in headers)
    if framing == "length":
        head += f"Content-Length: {len(body)}{eol}"
        payload = body
    elif framing == "chunked":
        head += f"Transfer-Encoding: chunked{eol}"
        cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=4)))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)
                  if b > a]
        payload = b"".join(b"%x%s\r\n%s\r\n" % (len(p), b";x=y" * (len(p) % 2), p)
                           for p in pieces)
        payload += b"0\r\n" + (b"T: 1\r\n" if draw(st.booleans()) else b"") + b"\r\n"
    else:
        payload = body
    expected_headers: dict[str, str] = {}
    for name, value in headers:
        name = name.lower()
        expected_headers[name] = (f"{expected_headers[name]}, {value}" if name in
                                  expected_headers else value)
    expected = {"status": status, "headers": expected_headers, "keep_alive": framing != "close",
                "body": b"" if status < 300 else body, "close": framing == "close"}
    return (head + eol).encode("latin-1") + payload, expected


def parse(pieces: list[bytes], until_close: bool) -> http1.ResponseParser:
    parser = http1.ResponseParser()
    done = False
    for piece in pieces:  # empty ones included
        assert not (done and piece), "complete before its last byte"
        done = parser.feed(piece) or done
    if until_close:
        assert not done
        done = parser.feed_eof()
    assert done
    return parser


@settings(deadline=None)
@given(answers(), st.data())
def test_the_parser_gives_the_same_answer_whatever_pieces_its_bytes_arrive_in(
    answer: tuple[bytes, dict[str, Any]], data: st.DataObject,
) -> None:
    raw, expected = answer
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=12)))
    pieces = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    whole, split = parse([raw], expected["close"]), parse(pieces, expected["close"])
    for parser in (whole, split):
        got = {"status": parser.status, "headers": {k: v for k, v in parser.headers.items()
                                                    if k.startswith("x-")},
               "keep_alive": parser.keep_alive, "body": parser.body,
               "close": expected["close"]}
        assert got == expected
        assert parser.rest == b"" and parser.received == len(raw)


def test_the_parser_refuses_what_is_not_http() -> None:
    for raw in (b"HELLO\r\n\r\n", b"HTTP/2 200 OK\r\n\r\n", b"HTTP/1.1 2000 OK\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nNo colon\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"):
        with pytest.raises(http1.MalformedAnswer):
            http1.ResponseParser().feed(raw)


Proxy.handler = _ProxyHandler
