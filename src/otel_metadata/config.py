"""Configuration: constructor argument, then environment variable, then default (SPEC §8).

Every setting is resolved here and nowhere else. A bad value never crashes the app: it logs one
warning that names the variable (or argument) and falls back to the default.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urlsplit

_logger = logging.getLogger("otel_metadata")

DEFAULT_BASE_URL = "https://api.promptlayer.com"
DEFAULT_REQUEST_ID_ATTRIBUTES: tuple[str, ...] = ("promptlayer.request_id",)

ENV_API_KEY = "PROMPTLAYER_API_KEY"
ENV_BASE_URL = "PROMPTLAYER_BASE_URL"
ENV_SCHEDULE_DELAY = "OTEL_BSP_SCHEDULE_DELAY"
ENV_MAX_QUEUE_SIZE = "OTEL_BSP_MAX_QUEUE_SIZE"
ENV_MAX_BATCH = "OTEL_BSP_MAX_EXPORT_BATCH_SIZE"
ENV_EXPORT_TIMEOUT = "OTEL_BSP_EXPORT_TIMEOUT"
ENV_DISABLED = "OTEL_SDK_DISABLED"
ENV_MAX_CONCURRENCY = "PROMPTLAYER_METADATA_MAX_CONCURRENCY"
ENV_MAX_TRACE_WAIT = "PROMPTLAYER_METADATA_MAX_TRACE_WAIT"
ENV_MAX_TRACES = "PROMPTLAYER_METADATA_MAX_TRACES"
ENV_MAX_VALUE_LENGTH = "PROMPTLAYER_METADATA_MAX_VALUE_LENGTH"

# The SDK's defaults for the batch span processor (OTEL_BSP_*), in milliseconds where timed.
DEFAULT_SCHEDULE_DELAY_MS = 5000
DEFAULT_MAX_QUEUE_SIZE = 2048
DEFAULT_MAX_BATCH = 512
DEFAULT_EXPORT_TIMEOUT_MS = 30000
DEFAULT_MAX_CONCURRENCY = 8
MAX_CONCURRENCY = 64  # one sender thread each
DEFAULT_MAX_TRACE_WAIT_MS = 5000
DEFAULT_MAX_TRACES = 10_000
DEFAULT_MAX_VALUE_LENGTH = 1024
DEFAULT_REQUEST_TIMEOUT_S = 10.0

_LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


@dataclass(frozen=True)
class Settings:
    """The resolved configuration of one processor. `repr` never shows the API key."""

    api_key: str | None = field(repr=False)
    api_key_source: str | None
    base_url: str
    schedule_delay_s: float
    max_queue_size: int
    max_export_batch_size: int
    export_timeout_s: float
    max_concurrency: int
    max_trace_wait_s: float
    max_traces: int
    max_value_length: int
    request_timeout_s: float
    disabled: bool
    request_id_attributes: tuple[str, ...]
    extra_attributes: Mapping[str, str]
    metadata: Mapping[str, Any]

    @property
    def endpoint(self) -> str:
        return self.base_url.rstrip("/") + "/rest/track-metadata"


def _warn(name: str, raw: object, default: object, why: str) -> None:
    _logger.warning("otel-metadata: ignoring %s=%r (%s); using %r", name, raw, why, default)


def _number(
    arg: object, arg_name: str, env: str | None, default: float, *, integer: bool,
    minimum: float, maximum: float = math.inf,
) -> float:
    """Argument, then env var, then default; anything but a finite number in range warns."""
    raw: object
    if arg is not None:
        name, raw = arg_name, arg
    else:
        raw = os.environ.get(env, "").strip() if env else ""
        if not raw:
            return default
        name = cast(str, env)
    try:
        if isinstance(raw, bool):
            raise ValueError
        value = int(raw) if integer and isinstance(raw, str) else float(cast(Any, raw))
        if not math.isfinite(value) or (integer and value != int(value)):
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        _warn(name, raw, default, "not an integer" if integer else "not a finite number")
        return default
    if not minimum <= value <= maximum:
        _warn(name, raw, default, f"must be >= {minimum:g}" if value < minimum
              else f"must be <= {maximum:g}")
        return default
    return int(value) if integer else float(value)


def _api_key(arg: object) -> tuple[str | None, str | None]:
    """The key and where it came from (for messages: never the key itself)."""
    # An unset and an empty environment variable mean the same: no key from there.
    candidates = ((arg, "the api_key argument"),
                  (os.environ.get(ENV_API_KEY, "").strip() or None, ENV_API_KEY))
    for raw, source in candidates:
        if raw is None:
            continue
        key = raw.strip() if isinstance(raw, str) else ""
        if not key:
            _logger.warning("otel-metadata: %s is empty or not a string; ignoring it", source)
        elif not all("!" <= ch <= "~" for ch in key):
            # Not the value, not even a part: a header could not carry it, and a log must not.
            _logger.warning("otel-metadata: %s holds spaces, control or non-ASCII characters, "
                            "which an HTTP header cannot carry; ignoring it", source)
        else:
            return key, source
    return None, None


def _flag(env: str) -> bool:
    raw = os.environ.get(env, "").strip().lower()
    if raw in ("", "false"):
        return False
    if raw == "true":
        return True
    _warn(env, raw, False, "expected 'true' or 'false'")
    return False


def _base_url(arg: str | None) -> str:
    name = "base_url" if arg is not None else ENV_BASE_URL
    raw = arg if arg is not None else os.environ.get(ENV_BASE_URL, "").strip()
    if not raw:
        return DEFAULT_BASE_URL
    try:
        parts = urlsplit(raw)
        # `.port` raises ValueError for a port that is not a number within 0-65535.
        valid = (parts.scheme in ("http", "https") and bool(parts.hostname)
                 and (parts.port or 0) >= 0)
    except (TypeError, ValueError, AttributeError):
        valid = False
    if not valid or any(ch.isspace() or not ch.isprintable() for ch in raw):
        _warn(name, raw, DEFAULT_BASE_URL, "expected an http(s) URL")
        return DEFAULT_BASE_URL
    return raw.rstrip("/")


def is_plain_http_to_remote(base_url: str) -> bool:
    """True when the key would cross a network in clear text (http:// to a non-loopback host)."""
    parts = urlsplit(base_url)
    host = (parts.hostname or "").lower()
    return parts.scheme == "http" and host not in _LOOPBACK_HOSTS and not host.startswith("127.")


def _str_tuple(arg: object, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    if arg is None:
        return default
    items = [arg] if isinstance(arg, str) else arg if isinstance(arg, (list, tuple)) else []
    good = tuple(k for k in items if isinstance(k, str) and k)
    if not good:
        _warn(name, arg, default, "expected a non-empty list of attribute names")
        return default
    return good


def _str_map(arg: Mapping[str, str] | None, name: str) -> dict[str, str]:
    if arg is None:
        return {}
    if not isinstance(arg, Mapping):
        _warn(name, arg, {}, "expected a mapping of attribute name to metadata key")
        return {}
    good = {k: v for k, v in arg.items() if isinstance(k, str) and isinstance(v, str) and k and v}
    if len(good) != len(arg):
        _logger.warning("otel-metadata: %s: ignoring entries that are not str -> str", name)
    return good


def resolve(
    *,
    api_key: str | None = None,
    base_url: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    extra_attributes: Mapping[str, str] | None = None,
    request_id_attributes: Sequence[str] | None = None,
    max_value_length: int | None = None,
    max_concurrency: int | None = None,
    schedule_delay_millis: float | None = None,
    max_queue_size: int | None = None,
    max_export_batch_size: int | None = None,
    export_timeout_millis: float | None = None,
    max_trace_wait_millis: float | None = None,
    max_traces: int | None = None,
    request_timeout_s: float | None = None,
) -> Settings:
    """Resolve every setting once, warning about (and replacing) each bad value."""
    key, source = _api_key(api_key)

    queue = int(_number(max_queue_size, "max_queue_size", ENV_MAX_QUEUE_SIZE,
                        DEFAULT_MAX_QUEUE_SIZE, integer=True, minimum=1))
    batch = int(_number(max_export_batch_size, "max_export_batch_size", ENV_MAX_BATCH,
                        DEFAULT_MAX_BATCH, integer=True, minimum=1))
    if batch > queue:
        _warn(ENV_MAX_BATCH, batch, min(DEFAULT_MAX_BATCH, queue),
              f"must not exceed the max queue size {queue}")
        batch = min(DEFAULT_MAX_BATCH, queue)

    if metadata is not None and not isinstance(metadata, Mapping):
        _warn("metadata", metadata, {}, "expected a mapping")
        metadata = None

    return Settings(
        api_key=key,
        api_key_source=source,
        base_url=_base_url(base_url),
        schedule_delay_s=_number(schedule_delay_millis, "schedule_delay_millis",
                                 ENV_SCHEDULE_DELAY, DEFAULT_SCHEDULE_DELAY_MS, integer=False,
                                 minimum=0) / 1000,
        max_queue_size=queue,
        max_export_batch_size=batch,
        export_timeout_s=_number(export_timeout_millis, "export_timeout_millis",
                                 ENV_EXPORT_TIMEOUT, DEFAULT_EXPORT_TIMEOUT_MS, integer=False,
                                 minimum=1) / 1000,
        max_concurrency=int(_number(max_concurrency, "max_concurrency", ENV_MAX_CONCURRENCY,
                                    DEFAULT_MAX_CONCURRENCY, integer=True, minimum=1,
                                    maximum=MAX_CONCURRENCY)),
        max_trace_wait_s=_number(max_trace_wait_millis, "max_trace_wait_millis",
                                 ENV_MAX_TRACE_WAIT, DEFAULT_MAX_TRACE_WAIT_MS, integer=False,
                                 minimum=0) / 1000,
        max_traces=int(_number(max_traces, "max_traces", ENV_MAX_TRACES, DEFAULT_MAX_TRACES,
                               integer=True, minimum=1)),
        max_value_length=int(_number(max_value_length, "max_value_length", ENV_MAX_VALUE_LENGTH,
                                     DEFAULT_MAX_VALUE_LENGTH, integer=True, minimum=1)),
        request_timeout_s=_number(request_timeout_s, "request_timeout_s", None,
                                  DEFAULT_REQUEST_TIMEOUT_S, integer=False, minimum=0.001),
        disabled=_flag(ENV_DISABLED),
        request_id_attributes=_str_tuple(request_id_attributes, "request_id_attributes",
                                         DEFAULT_REQUEST_ID_ATTRIBUTES),
        extra_attributes=_str_map(extra_attributes, "extra_attributes"),
        metadata=dict(metadata or {}),
    )
