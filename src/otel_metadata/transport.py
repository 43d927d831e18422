"""HTTP: one POST /rest/track-metadata per record, over keep-alive connections (SPEC §2).

Built on urllib3's connection pool, used directly: the layer `requests` stands on, at a third of
its CPU per POST (`benchmarks/bench_http.py`), most of the difference being what `requests` does
again on every call (merging settings, scanning the environment for proxies and CA bundles,
preparing the request, hooks). What `requests` gave users is kept, read once at construction:
certificate verification against the CA bundle `requests` would use (`REQUESTS_CA_BUNDLE`,
`CURL_CA_BUNDLE`, else `SSL_CERT_FILE`, else certifi's, else the system's), and the proxy from
`HTTPS_PROXY`/`HTTP_PROXY`/`ALL_PROXY` unless `NO_PROXY` names the host.

Our own calls are never traced: OpenTelemetry's suppression flags are set around each call, in
the calling thread's context (a context variable does not follow into threads by itself).
"""

from __future__ import annotations

import json
import os
import ssl
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import urllib3
from opentelemetry import context as otel_context
from urllib3.connection import HTTPConnection
from urllib3.exceptions import (
    ConnectTimeoutError,
    NewConnectionError,
    ProxyError,
    ReadTimeoutError,
    SSLError,
)
from urllib3.util.ssl_ import create_urllib3_context

from .mapping import RequestId
from .retry import parse_retry_after
from .stats import Stats

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

# No retries and no redirects inside urllib3 (delivery retries); one object, not one per POST.
_NO_RETRIES = urllib3.Retry(total=False, redirect=False)

# Network errors by the names `requests` gave them, which logs and `otel-metadata check` use;
# most specific first (a NewConnectionError is also a ConnectTimeoutError).
_ERROR_NAMES: tuple[tuple[type[Exception], str], ...] = (
    (SSLError, "SSLError"),
    (ProxyError, "ProxyError"),
    (NewConnectionError, "ConnectionError"),
    (ConnectTimeoutError, "ConnectTimeout"),
    (ReadTimeoutError, "ReadTimeout"),
)


@contextmanager
def suppressed_instrumentation() -> Iterator[None]:
    """Instrumentations (requests, urllib3, ...) create no spans inside this block."""
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


def _name(exc: Exception) -> str:
    for kind, name in _ERROR_NAMES:
        if isinstance(exc, kind):
            return name
    return "ConnectionError"


class Transport:
    """Posts metadata to one endpoint with one key. Its `repr` never shows the key.

    At most `pool_size` connections are kept open for reuse (more may open at once and are
    closed after use). Warnings go through `stats.warn_once` (a Stats of its own if none given).
    """

    def __init__(self, endpoint: str, api_key: str, pool_size: int,
                 stats: Stats | None = None) -> None:
        self.endpoint = endpoint
        self._stats = stats or Stats()
        self.ca_bundle = ca_bundle()
        self._proxy = proxy_for(endpoint)
        # The key as text, as Python quotes it (error messages use repr) and as JSON quotes it.
        self._secrets = sorted({api_key, repr(api_key)[1:-1], json.dumps(api_key)[1:-1]},
                               key=len, reverse=True)
        # A line break would let the key end the header; http.client would refuse it on every
        # POST, quoting it. Refused here instead (configuration never lets such a key through).
        self._unsendable = any(ch in api_key for ch in "\r\n")
        self._headers = {"X-API-KEY": api_key, "Content-Type": "application/json",
                         "User-Agent": "otel-metadata"}
        self._manager = self._pool_manager(max(1, pool_size))
        self._pool = self._manager.connection_from_url(endpoint)
        # Through a proxy that forwards (plain http), the request line holds the whole URL.
        parts = urlsplit(endpoint)
        plain_proxied = self._proxy is not None and parts.scheme == "http"
        self._target = endpoint if plain_proxied else (parts.path or "/") + (
            f"?{parts.query}" if parts.query else "")

    def _pool_manager(self, pool_size: int) -> urllib3.PoolManager:
        options: dict[str, object] = {"num_pools": 1, "maxsize": pool_size, "block": False}
        if self.endpoint.startswith("https:") or (self._proxy or "").startswith("https:"):
            options["ssl_context"] = self._ssl_context()
        if self._proxy is None:
            return urllib3.PoolManager(**options)  # type: ignore[arg-type]
        proxy = urlsplit(self._proxy)
        if proxy.username is not None:
            auth = f"{unquote(proxy.username)}:{unquote(proxy.password or '')}"
            options["proxy_headers"] = urllib3.make_headers(proxy_basic_auth=auth)
        if proxy.scheme == "https":
            options["proxy_ssl_context"] = options["ssl_context"]
        # urllib3 leaves Nagle's algorithm on behind a proxy, and writes a POST's headers and
        # body apart: each POST would then wait for a delayed ACK (40 ms on Linux). Off, as direct.
        options["socket_options"] = HTTPConnection.default_socket_options
        return urllib3.ProxyManager(self._proxy, **options)  # type: ignore[arg-type]

    def _ssl_context(self) -> ssl.SSLContext:
        """One context for every connection, trusting `ca_bundle`: loaded once, not per connect.

        A bundle that cannot be read leaves it trusting nothing (HTTPS then fails, and says why):
        never unverified.
        """
        context = create_urllib3_context()
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

    def post(self, request_id: RequestId, metadata: Mapping[str, str], timeout: float) -> Outcome:
        """One POST; network errors come back as an `Outcome` (status None), never raised.

        `timeout` bounds the connect and each read, as `requests` took it. Redirects are not
        followed: the key is never sent anywhere but the endpoint.
        """
        if self._unsendable:
            return Outcome(None, error="InvalidHeader", detail=self.redact(
                f"header X-API-KEY cannot carry {self._headers['X-API-KEY']!r}"))
        body = json.dumps({"request_id": request_id, "metadata": dict(metadata)}).encode()
        try:
            with suppressed_instrumentation():
                response = self._pool.urlopen(
                    "POST", self._target, body=body, headers=self._headers, timeout=timeout,
                    retries=_NO_RETRIES, redirect=False, assert_same_host=False)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            # urllib3's messages hold the URL, not headers; redacted all the same, as is the
            # answer's body below (a server may echo what it was sent).
            detail = self.redact(str(exc), 300)
            if isinstance(exc, SSLError):
                self._warn_tls(detail)
            return Outcome(None, error=_name(exc), detail=detail)
        status = response.status
        return Outcome(
            status,
            retry_after=parse_retry_after(response.headers.get("Retry-After")),
            detail="" if 200 <= status < 300 else
            self.redact(response.data.decode("utf-8", "replace"), 300),
        )

    def _warn_tls(self, detail: str) -> None:
        """One line per endpoint: TLS failures rarely mend by themselves; a CA bundle does."""
        what = ("certificate verify failed" if "certificate verify failed" in detail
                else "TLS handshake failed")
        origin = "{0.scheme}://{0.netloc}".format(urlsplit(self.endpoint))
        self._stats.warn_once(
            "tls", origin, "otel-metadata: %s for %s (trusting %s): set REQUESTS_CA_BUNDLE or "
            "SSL_CERT_FILE to a CA bundle that trusts the server? (%s)", what, origin,
            self.ca_bundle or "the system's CA store", detail[:200])

    def close(self) -> None:
        self._manager.clear()
