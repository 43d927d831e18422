"""The transport keeps what users relied on when it stood on `requests`: HTTPS verified against
the CA bundle the environment names (refused with one clear line without it), proxies from the
environment (read once, NO_PROXY honoured), keep-alive, and a key that is never shown.

Everything runs on 127.0.0.1: the strict local server (over TLS with a CA made by `trustme` for
the test), and a small HTTP proxy that tunnels CONNECT and forwards plain-http requests.
"""

from __future__ import annotations

import base64
import http.client
import logging
import selectors
import socket
import socketserver
import ssl
import sys
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import trustme
from conftest import API_KEY

from otel_metadata.stats import Stats
from otel_metadata.testing._http import LocalServer
from otel_metadata.testing.track_metadata import PATH, TrackMetadataServer
from otel_metadata.transport import CA_BUNDLE_VARS, Transport

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


Proxy.handler = _ProxyHandler
