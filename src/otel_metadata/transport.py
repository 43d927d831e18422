"""HTTP: one POST /rest/track-metadata per record, over keep-alive connections (SPEC §2).

On the standard library alone (socket, ssl, selectors; the wire format in `http1`). Measured
client CPU per POST on keep-alive to a local server: urllib3's connection pool used directly
~236 µs, http.client ~150-170 µs (its header parsing goes through the `email` package), a
minimal HTTP/1.1 exchange on a raw socket ~50 µs, a `selectors` loop driving 64 non-blocking
sockets ~45-70 µs. So delivery runs one event loop over many keep-alive connections, and this
module gives it those connections (`Connection`, non-blocking, registering itself with the
loop's selector), besides the blocking `Transport.post` (check, drain, tests) built on them.

What `requests` gave users is kept, read once at construction: certificate verification against
the CA bundle `requests` would use (`REQUESTS_CA_BUNDLE`, `CURL_CA_BUNDLE`, else
`SSL_CERT_FILE`, else certifi's, else the system's), never unverified; the proxy from
`HTTPS_PROXY`/`HTTP_PROXY`/`ALL_PROXY` unless `NO_PROXY` names the host, its credentials sent as
Proxy-Authorization and never shown. Plain http through a proxy is forwarded (the request line
holds the whole URL); https goes in a CONNECT tunnel; an https:// proxy is reached over TLS,
verified like the endpoint. Each TLS hop is an `ssl.SSLObject` over memory buffers, so TLS to
the endpoint inside TLS to the proxy is no special case. Redirects are not followed: the key
goes nowhere but the endpoint. Errors are named as `requests` named them (`Outcome.error`).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import logging
import os
import selectors
import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, unquote, urlsplit

from opentelemetry import context as otel_context

from . import http1
from .mapping import RequestId
from .retry import parse_retry_after
from .stats import Stats

_logger = logging.getLogger("otel_metadata.transport")

# The API's keys, plus the plain string that instrumentations also check for compatibility.
_SUPPRESS_KEYS = tuple(
    key
    for key in (
        getattr(otel_context, "_SUPPRESS_INSTRUMENTATION_KEY", None),
        getattr(otel_context, "_SUPPRESS_HTTP_INSTRUMENTATION_KEY", None),
        "suppress_instrumentation",
    )
    if key is not None
)

# CA bundle variables, in the order `requests` reads its two; SSL_CERT_FILE is OpenSSL's own.
CA_BUNDLE_VARS = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE")

# For one socket at a time, poll needs no descriptor of its own (epoll does); select elsewhere.
_BlockingSelector: type[selectors.BaseSelector] = getattr(
    selectors, "PollSelector", selectors.SelectSelector)

_RECV_SIZE = 65_536
# How long the endpoint's (or proxy's) addresses are used before they are looked up again: a
# new connection then costs no lookup (which blocks the sender's loop), and a DNS change is
# followed within this.
RESOLVE_TTL_S = 30.0
# One of `getaddrinfo`'s answers: family, socket type, protocol, the address to connect to.
_Address = tuple[int, int, int, Any]

# Connection phases.
_CLOSED, _CONNECTING, _TLS, _TUNNEL, _EXCHANGE, _IDLE = range(6)


@contextlib.contextmanager
def suppressed_instrumentation() -> Iterator[None]:
    """Instrumentations (requests, urllib3, ...) create no spans inside this block: nothing the
    transport calls is instrumented, but a log handler it may reach could be."""
    ctx = otel_context.get_current()
    for key in _SUPPRESS_KEYS:
        ctx = otel_context.set_value(key, True, ctx)
    token = otel_context.attach(ctx)
    try:
        yield
    finally:
        otel_context.detach(token)


@dataclass(frozen=True)
class Outcome:
    """What one POST came to: an HTTP status, or None with the network error's name."""

    status: int | None
    retry_after: float | None = None
    error: str | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def ca_bundle() -> str | None:
    """The CA file or directory to trust: the first CA_BUNDLE_VARS set, else certifi's, else
    None (the system's default store)."""
    for name in CA_BUNDLE_VARS:
        if os.environ.get(name):
            return os.environ[name]
    try:
        import certifi
    except ImportError:
        return None
    return str(certifi.where())


def proxy_for(endpoint: str) -> str | None:
    """The proxy URL the environment names for `endpoint`, or None when there is none or
    NO_PROXY bypasses it. Read as `urllib.request` (and so `requests`) reads it."""
    parts = urlsplit(endpoint)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    # A bare host:port means http://host:port, as `requests` takes it.
    return proxy if "://" in proxy else f"http://{proxy}"


# Outcomes of 2xx answers without Retry-After, by status: immutable, so one of each is shared.
_SUCCESS: dict[int, Outcome] = {}


class _RemoteDisconnected(ConnectionResetError):
    """The connection ended before the answer did."""


class _TunnelRefused(OSError):
    """The proxy did not open the CONNECT tunnel."""


@dataclass(frozen=True)
class _Hop:
    """A step a new connection takes after its TCP connect: a TLS handshake verifying
    `tls_host`, or the CONNECT request `connect`."""

    tls_host: str | None = None
    connect: bytes = b""


class _TLSLayer:
    """One TLS hop: the SSL object and its two memory buffers (network side)."""

    __slots__ = ("obj", "incoming", "outgoing")

    def __init__(self, context: ssl.SSLContext, server_hostname: str) -> None:
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = context.wrap_bio(self.incoming, self.outgoing, server_hostname=server_hostname)


def _origin(parts: SplitResult) -> str:
    """scheme://host:port, without credentials."""
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def _basic_auth(parts: SplitResult) -> str:
    credentials = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
    try:
        raw = credentials.encode("latin-1")
    except UnicodeEncodeError:
        raw = credentials.encode()
    return "Basic " + base64.b64encode(raw).decode()


class Transport:
    """Posts metadata to one endpoint with one key. Its `repr` never shows the key.

    `post` keeps at most `pool_size` connections open for reuse (more may open at once, from
    several threads, and are closed after use). An event loop makes its own with `connection()`
    and the requests with `request()`. Warnings go through `stats.warn_once` (a Stats of its
    own if none given).
    """

    def __init__(self, endpoint: str, api_key: str, pool_size: int,
                 stats: Stats | None = None) -> None:
        self.endpoint = endpoint
        self._stats = stats or Stats()
        self.ca_bundle = ca_bundle()
        proxy = proxy_for(endpoint)
        # The key as text, as Python quotes it (error messages use repr) and as JSON quotes it.
        self._secrets = sorted({api_key, repr(api_key)[1:-1], json.dumps(api_key)[1:-1]},
                               key=len, reverse=True)
        self._pool_size = max(1, pool_size)
        self._idle: list[Connection] = []
        self._lock = threading.Lock()
        self._addresses: list[_Address] = []  # as `getaddrinfo` gave them, the failed last
        self._resolved_until = 0.0

        parts = urlsplit(endpoint)
        https = parts.scheme == "https"
        host = parts.hostname or ""
        port = parts.port or (443 if https else 80)
        authority = parts.netloc.rpartition("@")[2]
        if not authority.isascii():
            authority = authority.encode("idna").decode("ascii")
        self._origin = _origin(parts)
        self._proxy_origin = ""
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers = [("Host", authority), ("X-API-KEY", api_key),
                   ("Content-Type", "application/json"), ("User-Agent", "otel-metadata"),
                   ("Accept-Encoding", "identity")]
        hops: list[_Hop] = []
        # Steps of a new connection (0: the TCP connect, i: hops[i - 1]) that reach the proxy:
        # failing there is a ProxyError, as `requests` said.
        self._proxy_steps = 0
        if proxy is None:
            self._address = (host, port)
        else:
            via = urlsplit(proxy)
            self._address = (via.hostname or "", via.port or (443 if via.scheme == "https"
                                                              else 80))
            self._proxy_origin = _origin(via)
            auth = [("Proxy-Authorization", _basic_auth(via))] if via.username is not None else []
            if via.scheme == "https":
                hops.append(_Hop(tls_host=via.hostname))
            if https:
                tunnel = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
                hops.append(_Hop(connect=http1.head(
                    "CONNECT", tunnel, [("Host", tunnel), *auth, ("User-Agent", "otel-metadata")]
                ) + b"\r\n"))
            else:  # forwarded: the whole URL in the request line, the credentials in its head
                target = f"{parts.scheme}://{authority}{target}"
                headers += auth
            self._proxy_steps = 1 + len(hops)
        if https:
            hops.append(_Hop(tls_host=host))
        self._hops = tuple(hops)
        self._context = self._ssl_context() if any(h.tls_host for h in hops) else None
        # The head of every POST, encoded once: a request is this, its length and its body.
        self._unsendable: Outcome | None = None
        try:
            self._prefix = http1.head("POST", target, headers) + b"Content-Length: "
        except ValueError:  # only the key can hold what a header cannot carry
            # Configuration never lets such a key through; refused here before anything is sent.
            self._prefix = b""
            self._unsendable = Outcome(None, error="InvalidHeader", detail=self.redact(
                f"header X-API-KEY cannot carry {api_key!r}"))

    def _ssl_context(self) -> ssl.SSLContext:
        """One context for every connection, trusting `ca_bundle`: loaded once, not per connect.

        It verifies certificates and host names. A bundle that cannot be read leaves it trusting
        nothing (HTTPS then fails, and says why): never unverified.
        """
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["http/1.1"])
        try:
            if self.ca_bundle is None:
                context.load_default_certs()
            elif os.path.isdir(self.ca_bundle):
                context.load_verify_locations(capath=self.ca_bundle)
            else:
                context.load_verify_locations(cafile=self.ca_bundle)
        except (OSError, ValueError) as exc:  # missing, unreadable, or not PEM (ssl.SSLError)
            self._stats.warn_once("tls", f"ca:{self.ca_bundle}", "otel-metadata: cannot load the "
                                  "CA bundle %s (%s); HTTPS to %s will fail until it can",
                                  self.ca_bundle, exc, self.endpoint)
        return context

    def __repr__(self) -> str:
        return f"Transport(endpoint={self.endpoint!r})"

    def redact(self, text: str, limit: int | None = None) -> str:
        """`text` (cut to `limit`) with the API key blanked out, for anything that may be logged.

        Cut after redacting, so a key straddling the limit cannot leave a prefix behind.
        """
        if limit is not None:
            text = text[: limit + len(self._secrets[0])]
        for secret in self._secrets:
            text = text.replace(secret, "<redacted>")
        return text[:limit]

    def request(self, request_id: RequestId, metadata: Mapping[str, str]) -> bytes | Outcome:
        """The whole HTTP request for one record, or the Outcome of a key no header can carry
        (InvalidHeader: nothing may be sent)."""
        if self._unsendable is not None:
            return self._unsendable
        body = json.dumps({"request_id": request_id, "metadata": dict(metadata)}).encode()
        return b"%b%d\r\n\r\n%b" % (self._prefix, len(body), body)

    def connection(self) -> Connection:
        """A new connection to the endpoint, not connected yet (`Connection.begin` connects)."""
        return Connection(self)

    def addresses(self) -> list[_Address]:
        """Where a new socket connects, in order: `getaddrinfo`'s answer (blocking; raises
        `socket.gaierror`), kept for `RESOLVE_TTL_S`, with addresses a connect failed on moved
        last (an IPv6 address without a route, a host down: the next connection starts with
        one that worked)."""
        with self._lock:
            if time.monotonic() < self._resolved_until:
                return list(self._addresses)
        host, port = self._address
        found: list[_Address] = [(family, kind, proto, address) for family, kind, proto, _, address
                 in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]
        with self._lock:
            self._addresses, self._resolved_until = found, time.monotonic() + RESOLVE_TTL_S
        return list(found)

    def failed_at(self, address: _Address) -> None:
        """A connect to `address` failed: new connections try it last."""
        with self._lock:
            if address in self._addresses:
                self._addresses.remove(address)
                self._addresses.append(address)

    def post(self, request_id: RequestId, metadata: Mapping[str, str], timeout: float) -> Outcome:
        """One POST, blocking; network errors come back as an `Outcome` (status None), never
        raised. Thread-safe: each call has a connection to itself, a kept-alive one if any.

        `timeout` bounds the connect and each read, as `requests` took it.
        """
        request = self.request(request_id, metadata)
        if isinstance(request, Outcome):
            return request
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = Connection(self)
        with suppressed_instrumentation():
            outcome = conn._exchange(request, timeout)
        if conn.reusable:
            with self._lock:
                if len(self._idle) < self._pool_size:
                    self._idle.append(conn)
                    return outcome
        conn.close()
        return outcome

    def _warn_tls(self, detail: str, origin: str) -> None:
        """One line per origin: TLS failures rarely mend by themselves; a CA bundle does."""
        what = ("certificate verify failed" if "certificate verify failed" in detail
                else "TLS handshake failed")
        self._stats.warn_once(
            "tls", origin, "otel-metadata: %s for %s (trusting %s): set REQUESTS_CA_BUNDLE or "
            "SSL_CERT_FILE to a CA bundle that trusts the server? (%s)", what, origin,
            self.ca_bundle or "the system's CA store", detail[:200])

    def close(self) -> None:
        """Close the kept-alive connections (a later `post` opens new ones)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class Connection:
    """One keep-alive connection to the endpoint (through the proxy, if any), driven by a selector.

    An exchange is `begin`, then `advance` each time the selector reports the connection ready,
    until one of them returns the Outcome; or `timed_out` once `time.monotonic()` passes
    `deadline`. The connection registers itself with the selector given to `begin`, itself as
    the key's data, and keeps that registration to what it waits for (`wants`) and to its
    socket: the loop never registers, modifies or unregisters it, it selects, calls `advance`
    on `key.data`, and watches `deadline`; `data` is the loop's own tag for the exchange under
    way (given to `begin`; None while idle). A connection kept alive stays registered for
    reading while idle: no system call per exchange for the selector (each would also hand the
    GIL to a busy app thread), and readable while idle means the server closed it (`advance`
    then closes it too). The socket can change under an exchange: a kept-alive connection the
    server closed unheard (the request could not be sent, or the connection ended before any
    byte of the answer) is reconnected and the request sent again, once (the API replaces keys,
    so a repeat is harmless; counted as ``resent`` in the transport's stats). After the
    Outcome, `reusable` says whether it may carry the next request (`begin` again); if not, it
    is closed already, and a `begin` would connect anew. One exchange at a time, in one thread.

    A new socket connects to `Transport.addresses` in turn, on to the next when a connect
    fails at once; a timeout ends the exchange (the next connection starts elsewhere).
    """

    def __init__(self, transport: Transport) -> None:
        self._t = transport
        self._untried: list[_Address] = []  # this exchange's addresses not tried yet
        self._peer: _Address | None = None  # the address of the socket's connect
        self.wants = 0
        self.deadline = 0.0
        self.reusable = False
        self._phase = _CLOSED
        self._sock: socket.socket | None = None
        self._layers: list[_TLSLayer] = []
        self._handshaking = False  # the last layer's handshake is under way
        self._step = 0  # 0: the TCP connect; i: transport._hops[i - 1]; then the exchanges
        self._wbuf = b""  # bytes for the socket, encrypted already
        self._pending = b""  # plaintext received beyond what the last phase took
        self._eof = False
        # The socket has nothing more to read for now, as far as this pass knows: it just sent
        # (the answer cannot be there yet), or a read did not fill the buffer. Saves a recv
        # that would only say EAGAIN; the selector says when there is more.
        self._drained = False
        self._parser = http1.ResponseParser()
        self._request = b""
        self._timeout = 0.0
        self._answered = 0  # exchanges this socket has carried
        self._resent = False
        self._selector: selectors.BaseSelector | None = None
        self.data: object = None  # the loop's tag for the exchange under way; None: idle
        self._outcome: Outcome | None = None  # the last exchange's
        self._watched: socket.socket | None = None
        self._own_selector: selectors.BaseSelector | None = None

    def __repr__(self) -> str:
        return f"Connection({self._t.endpoint!r}, fileno={self.fileno()})"

    def fileno(self) -> int:
        """The socket's descriptor, -1 without one. A reconnect changes it (the connection
        follows that in its registration itself)."""
        return self._sock.fileno() if self._sock is not None else -1

    def begin(self, request: bytes, timeout: float, selector: selectors.BaseSelector,
              data: object = None) -> Outcome | None:
        """Start sending `request` (from `Transport.request`), connecting first if need be; does
        what it can without blocking. None while the exchange goes on, the connection then
        registered with `selector` and `data` its tag until it ends; the Outcome if
        it ended at once (the host not resolved, a connect refused at once, a kept connection
        that sent and got its whole answer already). `timeout` bounds the connect and each
        read, as `requests` took it."""
        if self._watched is not None and selector is not self._selector:
            self._unwatch()  # registered, idle, with another loop's selector
        self._request, self._timeout, self._selector = request, timeout, selector
        self.data = data
        self._resent = False
        self._outcome = None
        self._untried = []
        self.reusable = False
        self.deadline = time.monotonic() + timeout
        return self._start()

    def advance(self) -> Outcome | None:
        """The socket is ready: go as far as possible without blocking. The Outcome once the
        exchange ended (network errors included), else None. Harmless when the socket is not
        ready after all; after the exchange ended, its Outcome again. Idle (kept alive, nothing
        asked), it is readable only when the server closed it, or sent what nobody asked for:
        closed, and None."""
        if self._phase == _IDLE:
            self._close_socket()
            return None
        if self._phase == _CLOSED:
            return self._outcome
        self._drained = False
        try:
            return self._progress()
        except (OSError, ValueError) as exc:  # ssl and socket errors; a malformed answer
            return self._failed(exc)

    def timed_out(self) -> Outcome:
        """`deadline` passed: close, and say what timed out (ConnectTimeout, ReadTimeout; a
        ProxyError while the proxy is not reached yet, as `requests` said)."""
        t = self._t
        where = "{}:{}".format(*t._address)
        if self._step < t._proxy_steps:
            name, text = "ProxyError", f"Unable to connect to proxy {where}: connect timed out"
        elif self._phase == _EXCHANGE:
            name, text = "ReadTimeout", f"{where}: read timed out"
        else:
            name, text = "ConnectTimeout", f"connect to {where} timed out"
        if self._step == 0 and self._peer is not None:
            self._t.failed_at(self._peer)
        self._close_socket()
        self._outcome = Outcome(None, error=name,
                                detail=t.redact(f"{text} (timeout={self._timeout:g} s)"))
        return self._outcome

    def close(self) -> None:
        self._close_socket()
        if self._own_selector is not None:
            self._own_selector.close()
            self._own_selector = None

    def _exchange(self, request: bytes, timeout: float) -> Outcome:
        """One exchange, blocking, on a selector of the connection's own."""
        if self._own_selector is None:
            self._own_selector = _BlockingSelector()
        selector = self._own_selector
        outcome = self.begin(request, timeout, selector)
        while outcome is None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                outcome = self.timed_out()
            elif selector.select(left):
                outcome = self.advance()
        return outcome

    # -- the exchange --

    def _start(self) -> Outcome | None:
        try:
            if self._sock is None:
                self._open()
                if self._phase == _CONNECTING:
                    self._wait(selectors.EVENT_WRITE)
                    return None
            else:
                self._send_request()
            return self._progress()
        except (OSError, ValueError) as exc:
            return self._failed(exc)

    def _open(self) -> None:
        """A new socket, its non-blocking connect started, to the next address not tried yet
        (the first of `Transport.addresses` for a new exchange)."""
        if not self._untried:
            self._untried = self._t.addresses()
        self._step, self._answered = 0, 0
        self._peer = peer = self._untried.pop(0)
        family, kind, proto, address = peer
        _logger.debug("otel-metadata: connecting to %s", address)
        self._sock = sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        error = sock.connect_ex(address)
        if error in (errno.EINPROGRESS, errno.EWOULDBLOCK):
            self._phase = _CONNECTING
        elif error:
            raise OSError(error, os.strerror(error))
        else:
            self._next()

    def _next(self) -> None:
        """On to the next hop of a new connection, or to the exchange."""
        self._step += 1
        hops = self._t._hops
        if self._step > len(hops):
            self._send_request()
            return
        hop = hops[self._step - 1]
        if hop.tls_host is not None:
            assert self._t._context is not None
            self._layers.append(_TLSLayer(self._t._context, hop.tls_host))
            self._handshaking = True
            self._phase = _TLS
        else:
            self._phase = _TUNNEL
            self._parser = http1.ResponseParser(head_only=True)
            self._send(hop.connect)

    def _send_request(self) -> None:
        self._phase = _EXCHANGE
        self._parser = http1.ResponseParser()
        self._send(self._request)

    def _progress(self) -> Outcome | None:
        while True:
            if self._wbuf and not self._write():
                self._wait(selectors.EVENT_WRITE)
                return None
            phase = self._phase
            if phase == _CONNECTING:  # writable: connected, or failed
                assert self._sock is not None
                error = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if error:
                    raise OSError(error, os.strerror(error))
                try:
                    self._sock.getpeername()
                except OSError as exc:
                    if exc.errno != errno.ENOTCONN:
                        raise
                    self._wait(selectors.EVENT_WRITE)  # not connected yet after all
                    return None
                self._next()
                continue
            if phase == _TLS:
                layer = self._layers[-1]
                try:
                    layer.obj.do_handshake()
                except ssl.SSLWantReadError:
                    self._flush()
                    if self._wbuf:
                        continue
                else:
                    self._handshaking = False
                    self._flush()
                    # Application data that came with the handshake's last flight.
                    self._pending += self._decrypt(layer)
                    self._next()
                    continue
            data = self._receive()
            if data is None:
                self._wait(selectors.EVENT_READ)
                return None
            if phase == _TLS:
                self._layers[-1].incoming.write(data)
                if self._eof:  # the handshake then fails, saying so
                    self._layers[-1].incoming.write_eof()
            elif phase == _TUNNEL:
                self._tunnel(data)
            else:
                outcome = self._answer(data)
                if outcome is not None:
                    return outcome

    def _tunnel(self, data: bytes) -> None:
        parser = self._parser
        if parser.feed(data):
            if not 200 <= parser.status < 300:
                raise _TunnelRefused(f"Tunnel connection failed: {parser.status} "
                                     f"{parser.reason}".rstrip())
            self._pending = parser.rest
            self._next()
        elif self._eof:
            raise _TunnelRefused("Tunnel connection failed: the proxy closed the connection")

    def _answer(self, data: bytes) -> Outcome | None:
        parser = self._parser
        if not parser.feed(data):
            if not self._eof:
                return None
            if not parser.feed_eof():
                raise _RemoteDisconnected("Remote end closed connection without response"
                                          if not parser.received else
                                          f"the answer was cut short after {parser.received} "
                                          "bytes")
        self._answered += 1
        status = parser.status
        retry_after = parser.headers.get("retry-after")
        if retry_after is None and 200 <= status < 300:  # nearly every answer: one shared value
            outcome = _SUCCESS.get(status) or _SUCCESS.setdefault(status, Outcome(status))
        else:
            outcome = Outcome(status, retry_after=parse_retry_after(retry_after),
                              detail="" if 200 <= status < 300 else
                              self._t.redact(parser.body.decode("utf-8", "replace"), 300))
        if parser.keep_alive and not parser.rest and not self._eof:
            self._phase = _IDLE
            self.reusable = True
            self.data = None
            if self._watched is not None:  # stays registered, to hear of the server's close
                self._wait(selectors.EVENT_READ)
        else:
            self._close_socket()
        self._outcome = outcome
        return outcome

    def _failed(self, exc: Exception) -> Outcome | None:
        """An error: resend once on a new connection if a kept-alive one had been closed by the
        server while idle (no byte of an answer came), else the error's Outcome."""
        if self._step == 0 and self._peer is not None and not isinstance(exc, socket.gaierror):
            self._t.failed_at(self._peer)
            if self._untried:  # the connect failed (refused, no route): the next address
                _logger.debug("otel-metadata: connect to %s failed (%s); trying %s",
                              self._peer[3], exc, self._untried[0][3])
                self._close_socket()
                self.deadline = time.monotonic() + self._timeout
                return self._start()
        if (self._phase == _EXCHANGE and self._answered and not self._resent
                and isinstance(exc, ConnectionError) and not self._parser.received):
            _logger.debug("otel-metadata: the server closed an idle connection (%s); sending "
                          "again on a new one", exc)
            self._resent = True
            self._t._stats.add("resent")
            self._close_socket()
            self.deadline = time.monotonic() + self._timeout
            return self._start()
        t = self._t
        is_tls = isinstance(exc, ssl.SSLError)
        if isinstance(exc, socket.gaierror):
            text = f"Failed to resolve {t._address[0]!r} ({exc})"
        elif self._phase == _EXCHANGE and not is_tls:
            text = f"Connection aborted: {exc}"
        else:
            text = str(exc)
        if self._step < t._proxy_steps:
            name, text, origin = "ProxyError", f"Unable to connect to proxy: {text}", \
                t._proxy_origin
        else:
            name, origin = ("SSLError" if is_tls else "ConnectionError"), t._origin
        self._close_socket()
        detail = t.redact(text, 300)
        if is_tls:
            t._warn_tls(detail, origin)
        self._outcome = Outcome(None, error=name, detail=detail)
        return self._outcome

    # -- bytes in and out, through the TLS layers --

    def _send(self, plaintext: bytes) -> None:
        """Queue `plaintext` for the peer at the top of the stack (encrypted on the way)."""
        if self._layers:
            self._layers[-1].obj.write(plaintext)
            self._flush()
        else:
            self._wbuf += plaintext

    def _flush(self) -> None:
        """Move what each TLS layer has to send down the stack, into the socket's buffer."""
        data = b""
        for layer in reversed(self._layers):
            if data:
                layer.obj.write(data)
            data = layer.outgoing.read()
        self._wbuf += data

    def _write(self) -> bool:
        """Send what the socket can take now; True once everything queued is sent."""
        assert self._sock is not None
        try:
            sent = self._sock.send(self._wbuf)
        except (BlockingIOError, InterruptedError):
            return False
        self._wbuf = self._wbuf[sent:]
        self.deadline = time.monotonic() + self._timeout
        self._drained = not self._wbuf
        return self._drained

    def _receive(self) -> bytes | None:
        """Plaintext from the top of the stack as far as it is set up (b"" if a read brought
        none, or at the end: `_eof`), or None when the socket has nothing now."""
        if self._pending:
            data, self._pending = self._pending, b""
            return data
        if self._eof:
            return b""
        if self._drained:
            return None
        assert self._sock is not None
        try:
            data = self._sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return None
        self._drained = len(data) < _RECV_SIZE
        self.deadline = time.monotonic() + self._timeout
        if not data:
            self._eof = True
            return data
        if self._layers:
            for layer in self._layers[:-1] if self._handshaking else self._layers:
                if data:
                    layer.incoming.write(data)
                data = self._decrypt(layer)
            self._flush()  # a layer's own answer to what it read (a key update)
        return data

    def _decrypt(self, layer: _TLSLayer) -> bytes:
        """All the plaintext `layer` can give now: nothing may stay buffered inside it, out of
        the selector's sight."""
        pieces = []
        while True:
            try:
                piece = layer.obj.read(_RECV_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:  # close_notify: the end of this layer's stream
                self._eof = True
                break
            if not piece:
                self._eof = True
                break
            pieces.append(piece)
        return b"".join(pieces)

    # -- the selector, and the socket's end --

    def _wait(self, events: int) -> None:
        """Wait for `events`: the selector is told (registering the current socket)."""
        assert self._selector is not None and self._sock is not None
        if self._watched is None:
            self._selector.register(self._sock, events, self)
            self._watched = self._sock
        elif events != self.wants:
            self._selector.modify(self._sock, events, self)
        self.wants = events

    def _unwatch(self) -> None:
        if self._watched is not None:
            assert self._selector is not None
            # KeyError: the selector was closed first (the loop ended, this one kept idle).
            with contextlib.suppress(KeyError):
                self._selector.unregister(self._watched)
            self._watched = None

    def _close_socket(self) -> None:
        self._unwatch()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._phase = _CLOSED
        self._layers = []
        self._handshaking = False
        self._wbuf = self._pending = b""
        self._eof = self._drained = False
        self.reusable = False
        self.wants = 0
