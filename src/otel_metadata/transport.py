"""HTTP: one POST /rest/track-metadata per record, over a keep-alive session (SPEC §2).

Our own calls are never traced: OpenTelemetry's suppression flags are set around each call, in
the calling thread's context (a context variable does not follow into threads by itself).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import requests
from opentelemetry import context as otel_context
from requests.adapters import HTTPAdapter

from .mapping import RequestId
from .retry import parse_retry_after

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


class Transport:
    """Posts metadata to one endpoint with one key. Its `repr` never shows the key."""

    def __init__(self, endpoint: str, api_key: str, pool_size: int) -> None:
        self.endpoint = endpoint
        # The key as text, as Python quotes it (error messages use repr) and as JSON quotes it.
        self._secrets = sorted({api_key, repr(api_key)[1:-1], json.dumps(api_key)[1:-1]},
                               key=len, reverse=True)
        self._session = requests.Session()
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=max(1, pool_size))
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._session.headers.update(
            {"X-API-KEY": api_key, "Content-Type": "application/json",
             "User-Agent": "otel-metadata"}
        )

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
        """One POST; network errors come back as an `Outcome` (status None), never raised."""
        body = json.dumps({"request_id": request_id, "metadata": dict(metadata)})
        try:
            with suppressed_instrumentation():
                response = self._session.post(self.endpoint, data=body.encode(), timeout=timeout)
        except requests.RequestException as exc:
            # requests' messages hold the URL, not headers; redacted all the same, as is the
            # answer's body below (a server may echo what it was sent).
            return Outcome(None, error=type(exc).__name__, detail=self.redact(str(exc), 300))
        try:
            status = response.status_code
            return Outcome(
                status,
                retry_after=parse_retry_after(response.headers.get("Retry-After")),
                detail="" if 200 <= status < 300 else self.redact(response.text, 300),
            )
        finally:
            response.close()

    def close(self) -> None:
        self._session.close()
