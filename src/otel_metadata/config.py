"""Configuration: constructor argument, then environment variable, then default (SPEC §8).

Each setting is declared once, as a field of `Settings` made by `setting(...)`: its argument
name, environment variable, default, bounds and unit. Resolution (`resolve`), the display of
``otel-metadata check`` and the zero-code exporter's keyword arguments all derive from those
declarations. A bad value never crashes the app: it logs one warning that names the variable
(or argument) and falls back to the default.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

from .conventions import TOOL_NAMES

_logger = logging.getLogger("otel_metadata")

DEFAULT_BASE_URL = "https://api.promptlayer.com"
MAX_CONCURRENCY = 256  # one sender thread each, started only as the load needs them

_LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})

# How a raw value (argument or environment text) becomes a setting: a parser raises ValueError
# with the reason when the value is bad.
Parser = Callable[[object, "Option"], Any]


@dataclass(frozen=True)
class Option:
    """One setting's declaration: where it comes from and what values it takes."""

    arg: str | None       # the constructor's keyword (None: environment only)
    env: str | None       # the environment variable (None: argument only)
    default: Any
    parse: Parser
    minimum: float = -math.inf
    maximum: float = math.inf
    unit: str = ""        # as the argument and the variable give it ("ms": stored in seconds)
    help: str = ""

    @property
    def scale(self) -> float:
        return 1000.0 if self.unit == "ms" else 1.0


def setting(arg: str | None, env: str | None, default: Any, parse: Parser, **kw: Any) -> Any:
    """A `Settings` field declared by its `Option` (kept in the field's metadata)."""
    option = Option(arg, env, default, parse, **kw)
    return dataclasses.field(metadata={"option": option})


# -- parsers: each returns the value or raises ValueError(reason) --

def _integer(raw: object, o: Option) -> int:
    return int(_in_range(raw, o, integer=True))


def _real(raw: object, o: Option) -> float:
    return _in_range(raw, o, integer=False) / o.scale


def _in_range(raw: object, o: Option, *, integer: bool) -> float:
    why = "not an integer" if integer else "not a finite number"
    if isinstance(raw, bool):
        raise ValueError(why)
    try:
        value = int(raw) if integer and isinstance(raw, str) else float(cast(Any, raw))
    except (TypeError, ValueError, OverflowError):
        raise ValueError(why) from None
    if not math.isfinite(value) or (integer and value != int(value)):
        raise ValueError(why)
    if value < o.minimum:
        raise ValueError(f"must be >= {o.minimum:g}")
    if value > o.maximum:
        raise ValueError(f"must be <= {o.maximum:g}")
    return value


def _flag(raw: object, o: Option) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("true", "false"):
        return text == "true"
    raise ValueError("expected 'true' or 'false'")


def _url(raw: object, o: Option) -> str:
    text = raw if isinstance(raw, str) else ""
    try:
        parts = urlsplit(text)
        # `.port` raises ValueError for a port that is not a number within 0-65535.
        valid = (parts.scheme in ("http", "https") and bool(parts.hostname)
                 and (parts.port or 0) >= 0)
    except (TypeError, ValueError, AttributeError):
        valid = False
    if not valid or any(ch.isspace() or not ch.isprintable() for ch in text):
        raise ValueError("expected an http(s) URL")
    return text.rstrip("/")


def _names(raw: object, o: Option) -> tuple[str, ...]:
    items = [raw] if isinstance(raw, str) else raw if isinstance(raw, (list, tuple)) else []
    good = tuple(k for k in items if isinstance(k, str) and k)
    if not good:
        raise ValueError("expected a non-empty list of attribute names")
    return good


def _comma_list(raw: object, what: str) -> tuple[str, ...]:
    """A comma list (a variable) or a list of strings (an argument), each stripped, once."""
    items = raw.split(",") if isinstance(raw, str) else raw if isinstance(raw, (list, tuple)) \
        else None
    if items is None or not all(isinstance(i, str) for i in items):
        raise ValueError(f"expected a comma list of {what}")
    return tuple(dict.fromkeys(i.strip() for i in items if i.strip()))


def _keys(raw: object, o: Option) -> tuple[str, ...]:
    """Metadata keys; empty for none."""
    return _comma_list(raw, "metadata keys")


def _str_map(raw: object, o: Option) -> dict[str, str]:
    if not isinstance(raw, Mapping):
        raise ValueError("expected a mapping of attribute name to metadata key")
    good = {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, str) and k and v}
    if len(good) != len(raw):
        _logger.warning("otel-metadata: %s: ignoring entries that are not str -> str", o.arg)
    return good


def _conventions(raw: object, o: Option) -> tuple[str, ...]:
    """Some of `TOOL_NAMES`, or ``none`` (an empty list as an argument)."""
    if isinstance(raw, (list, tuple)) and not raw:
        return ()
    names = [n.lower() for n in _comma_list(raw, "conventions")]
    if names == ["none"]:
        return ()
    unknown = [n for n in names if n not in TOOL_NAMES]
    if unknown or not names:
        raise ValueError(f"unknown convention(s) {', '.join(unknown) or '(empty)'}; expected "
                         f"a comma list of {','.join(TOOL_NAMES)}, or none")
    return tuple(n for n in TOOL_NAMES if n in names)


def _path(raw: object, o: Option) -> str:
    text = raw.strip() if isinstance(raw, str) else ""
    if not text:
        raise ValueError("expected a directory path")
    return text


def _sync(raw: object, o: Option) -> str:
    """How the spool commits: ``normal`` (survives the process dying) or ``full`` (survives
    power loss too, an fsync per commit); SQLite's own names."""
    text = str(raw).strip().upper()
    if text not in ("NORMAL", "FULL"):
        raise ValueError("expected 'normal' or 'full'")
    return text


def _mapping(raw: object, o: Option) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise ValueError("expected a mapping")
    return dict(raw)


def _api_key(raw: object, o: Option) -> str:
    key = raw.strip() if isinstance(raw, str) else ""
    if not key:
        raise ValueError("empty or not a string")
    if not all("!" <= ch <= "~" for ch in key):
        # Not the value, not even a part: a header could not carry it, and a log must not.
        raise ValueError("holds spaces, control or non-ASCII characters, which an HTTP header "
                         "cannot carry")
    return key


@dataclass(frozen=True)
class Settings:
    """The resolved configuration of one pipeline. `repr` never shows the API key."""

    api_key: str | None = dataclasses.field(repr=False, metadata={"option": Option(
        "api_key", "PROMPTLAYER_API_KEY", None, _api_key,
        help="none: the processor logs one warning and stays inert")})
    base_url: str = setting("base_url", "PROMPTLAYER_BASE_URL", DEFAULT_BASE_URL, _url)
    schedule_delay_s: float = setting(
        "schedule_delay_millis", "OTEL_BSP_SCHEDULE_DELAY", 5.0, _real, minimum=0, unit="ms",
        help="how long a record may wait for others before it is posted")
    max_queue_size: int = setting("max_queue_size", "OTEL_BSP_MAX_QUEUE_SIZE", 2048, _integer,
                                  minimum=1, help="request IDs waiting to be posted")
    max_export_batch_size: int = setting(
        "max_export_batch_size", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512, _integer, minimum=1,
        help="this many waiting records are posted at once, without waiting the delay")
    export_timeout_s: float = setting(
        "export_timeout_millis", "OTEL_BSP_EXPORT_TIMEOUT", 30.0, _real, minimum=1, unit="ms",
        help="how long one record is retried")
    max_concurrency: int = setting(
        "max_concurrency", "PROMPTLAYER_METADATA_MAX_CONCURRENCY", 64, _integer, minimum=1,
        maximum=MAX_CONCURRENCY, help="most POSTs in flight (adapts below it to the API)")
    max_trace_wait_s: float = setting(
        "max_trace_wait_millis", "PROMPTLAYER_METADATA_MAX_TRACE_WAIT", 5.0, _real, minimum=0,
        unit="ms", help="how long a request waits for its local root to end")
    max_traces: int = setting("max_traces", "PROMPTLAYER_METADATA_MAX_TRACES", 10_000, _integer,
                              minimum=1, help="traces held in memory at once")
    max_value_length: int = setting(
        "max_value_length", "PROMPTLAYER_METADATA_MAX_VALUE_LENGTH", 1024, _integer, minimum=1,
        help="longer values are truncated")
    request_timeout_s: float = setting("request_timeout_s", None, 10.0, _real, minimum=0.001,
                                       unit="s", help="one POST's timeout")
    shutdown_timeout_s: float = setting(
        "shutdown_timeout_millis", "PROMPTLAYER_METADATA_SHUTDOWN_TIMEOUT", 5.0, _real,
        minimum=0, unit="ms", help="shutdown (and the SIGTERM flush) never takes longer")
    handle_sigterm: bool = setting(
        "handle_sigterm", "PROMPTLAYER_METADATA_HANDLE_SIGTERM", True, _flag,
        help="flush on SIGTERM, then hand the signal on")
    spool_dir: str | None = setting(
        "spool_dir", "PROMPTLAYER_METADATA_SPOOL_DIR", None, _path,
        help="records wait in a SQLite file there, surviving a crash (none: in memory)")
    max_spool_bytes: int = setting(
        "max_spool_bytes", "PROMPTLAYER_METADATA_MAX_SPOOL_BYTES", 256 * 2**20, _integer,
        minimum=4096, help="the spool's bound; past it the newest record is dropped")
    spool_sync: str = setting(
        "spool_sync", "PROMPTLAYER_METADATA_SPOOL_SYNC", "NORMAL", _sync,
        help="normal: survives the process dying; full: power loss too (an fsync per commit)")
    disabled: bool = setting(None, "OTEL_SDK_DISABLED", False, _flag)
    request_id_attributes: tuple[str, ...] = setting(
        "request_id_attributes", None, ("promptlayer.request_id",), _names)
    conventions: tuple[str, ...] = setting(
        "conventions", "PROMPTLAYER_METADATA_CONVENTIONS", TOOL_NAMES, _conventions,
        help="other tools' metadata conventions read, below the PromptLayer and standard names")
    required_keys: tuple[str, ...] = setting(
        "required_keys", "PROMPTLAYER_METADATA_REQUIRED_KEYS", (), _keys,
        help="a request posted without one is counted (missing.<key>) and warned about once")
    extra_attributes: Mapping[str, str] = setting("extra_attributes", None, {}, _str_map)
    metadata: Mapping[str, Any] = setting("metadata", None, {}, _mapping)
    # Where the key came from, for messages (never the key itself); derived, not an option.
    api_key_source: str | None = None

    @property
    def endpoint(self) -> str:
        return self.base_url.rstrip("/") + "/rest/track-metadata"


def options() -> dict[str, Option]:
    """Every setting's declaration, by its `Settings` field name, in declaration order."""
    return {f.name: f.metadata["option"] for f in dataclasses.fields(Settings)
            if "option" in f.metadata}


OPTIONS = options()
ARGUMENTS = frozenset(o.arg for o in OPTIONS.values() if o.arg is not None)
ENV_API_KEY = OPTIONS["api_key"].env
ENV_BASE_URL = OPTIONS["base_url"].env
ENV_DISABLED = OPTIONS["disabled"].env


def shown_default(o: Option) -> Any:
    """The default as the argument and the variable give it (milliseconds for "ms")."""
    if o.scale != 1.0:
        value = o.default * o.scale
        return int(value) if value == int(value) else value
    return o.default


def _warn(name: str, raw: object, default: object, why: str) -> None:
    _logger.warning("otel-metadata: ignoring %s=%r (%s); using %r", name, raw, why, default)


def _resolve_one(o: Option, arg: object) -> tuple[Any, str | None]:
    """The value of one setting and where it came from (None: the default)."""
    sources: list[tuple[object, str]] = []
    if arg is not None:
        sources.append((arg, f"the {o.arg} argument"))
    env = os.environ.get(o.env, "").strip() if o.env else ""
    if env:  # an unset and an empty variable mean the same
        sources.append((env, cast(str, o.env)))
    for raw, source in sources:
        try:
            return o.parse(raw, o), source
        except ValueError as exc:
            if o.parse is _api_key:  # never the value, not even a part
                _logger.warning("otel-metadata: %s is %s; ignoring it", source, exc)
                continue
            _warn(str(o.arg) if source.endswith("argument") else source, raw,
                  shown_default(o), str(exc))
            break  # a bad argument or variable falls back to the default, not further
    return o.default, None


def resolve(**args: Any) -> Settings:
    """Resolve every setting once, warning about (and replacing) each bad value.

    `args` are the constructor's keyword arguments (None: not given); unknown names raise
    TypeError, as a misspelt keyword would.
    """
    unknown = set(args) - ARGUMENTS
    if unknown:
        raise TypeError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    values: dict[str, Any] = {}
    for name, o in OPTIONS.items():
        values[name], source = _resolve_one(o, args.get(o.arg) if o.arg else None)
        if name == "api_key":
            values["api_key_source"] = source
    if values["max_export_batch_size"] > values["max_queue_size"]:
        fallback = min(OPTIONS["max_export_batch_size"].default, values["max_queue_size"])
        _warn(cast(str, OPTIONS["max_export_batch_size"].env), values["max_export_batch_size"],
              fallback, f"must not exceed the max queue size {values['max_queue_size']}")
        values["max_export_batch_size"] = fallback
    return Settings(**values)


def source_of(name: str, value: object) -> str:
    """Where setting `name`'s resolved `value` came from, for display: its variable or default."""
    o = OPTIONS[name]
    raw = os.environ.get(o.env, "").strip() if o.env else ""
    if not raw:
        return "default"
    try:
        used = o.parse(raw, o) == value
    except ValueError:
        used = False
    return f"from {o.env}" if used else f"default: {o.env} ignored, see the warning"


def is_plain_http_to_remote(base_url: str) -> bool:
    """True when the key would cross a network in clear text (http:// to a non-loopback host)."""
    parts = urlsplit(base_url)
    host = (parts.hostname or "").lower()
    return parts.scheme == "http" and host not in _LOOPBACK_HOSTS and not host.startswith("127.")
