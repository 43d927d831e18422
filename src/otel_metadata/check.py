"""`otel-metadata check`: the effective configuration, and whether PromptLayer would take a POST.

The probe must prove the key without creating metadata on a real request. It sends what the
processor sends (same `Transport`, same headers) with a body the API cannot record anything
from: ``{"request_id": 0, "metadata": {}}``, request 0 being no PromptLayer request and the
metadata empty. A 2xx, 400 or 422 then means the key passed authentication and only the body
was refused; a 401 means the key was rejected.

That reading holds only if the API checks the key before the body. So when the answer is
400/422, a second probe sends the same body with a key that cannot be valid: a 401 to that one
proves the order, and so the first answer's verdict. If it gets 400/422 too, the API judged the
body first and the key remains unverified: the check says so and fails.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TextIO
from urllib.parse import urlsplit

from . import config
from .autoconfig import EXPORTER_NAME
from .transport import Outcome, Transport

PROBE_REQUEST_ID = 0
# Printable ASCII like every key, and plainly not one.
INVALID_KEY = "otel-metadata-check-invalid-key"
_REFUSED_BODY = (400, 422)


@dataclass(frozen=True)
class Verdict:
    """The check's conclusion: `ok` only when a metadata POST would be accepted now."""

    ok: bool
    message: str


Address = tuple[str, int]


def run(out: TextIO, timeout_s: float | None = None,
        serve: tuple[Address | None, Address | None] | None = None) -> int:
    """Print the configuration and one verdict line to `out` (and one per `serve` port, when
    given as (http, grpc)); 0 when a POST would be accepted and the ports are usable."""
    with _warnings_to(out):
        settings = config.resolve()
    out.write(describe(settings))
    timeout = timeout_s or settings.request_timeout_s
    verdicts = [diagnose(settings, timeout)]
    if serve is not None:
        verdicts += serve_ports(*serve, timeout_s=min(timeout, 5.0))
    for verdict in verdicts:
        out.write(f"{'OK' if verdict.ok else 'PROBLEM'}: {verdict.message}\n")
    return 0 if all(v.ok for v in verdicts) else 1


def serve_ports(http: Address | None, grpc: Address | None,
                timeout_s: float = 5.0) -> list[Verdict]:
    """For an `otel-metadata serve` set-up: is each port either a running serve (its health
    answers, on the HTTP port) or free for one to listen on?"""
    verdicts = []
    for name, address in (("OTLP/HTTP", http), ("OTLP/gRPC", grpc)):
        if address is None:
            verdicts.append(Verdict(True, f"serve {name}: off ('none')"))
            continue
        where = f"{address[0]}:{address[1]}"
        try:
            with socket.create_connection(address, timeout=timeout_s):
                pass
        except OSError:
            verdicts.append(_bindable(name, address, where))
            continue
        verdicts.append(_health(where, address, timeout_s) if name == "OTLP/HTTP" else Verdict(
            True, f"serve {name}: something listens on {where} (a running serve, if the "
                  "HTTP port's health says so)"))
    return verdicts


def _bindable(name: str, address: Address, where: str) -> Verdict:
    try:
        with socket.create_server(address):
            return Verdict(True, f"serve {name}: {where} is free; serve can listen there")
    except OSError as exc:
        return Verdict(False, f"serve {name}: cannot listen on {where}: {exc.strerror or exc}")


def _health(where: str, address: Address, timeout_s: float) -> Verdict:
    connection = http.client.HTTPConnection(*address, timeout=timeout_s)
    try:
        connection.request("GET", "/health")
        answer = connection.getresponse()
        body = json.loads(answer.read() or b"{}")
    except (OSError, http.client.HTTPException, ValueError):
        body, answer = None, None
    finally:
        connection.close()
    status = body.get("status") if isinstance(body, dict) else None
    if answer is not None and status in ("ok", "stopping"):
        return Verdict(status == "ok", f"serve OTLP/HTTP: otel-metadata serve answers on "
                                       f"{where} (health: {status})")
    return Verdict(False, f"serve OTLP/HTTP: {where} is taken by something that is not "
                          "otel-metadata serve (no health answer): choose another --http")


def redact(api_key: str) -> str:
    """The key as it may be shown: its last 4 characters only (none of a short one)."""
    return "****" + (api_key[-4:] if len(api_key) >= 12 else "")


def describe(settings: config.Settings) -> str:
    """The effective configuration, one setting a line, each with where it came from."""
    s = settings
    key = (f"{redact(s.api_key)} ({len(s.api_key)} characters, from {s.api_key_source})"
           if s.api_key else "not set")
    traces_exporter = os.environ.get("OTEL_TRACES_EXPORTER", "")
    listed = EXPORTER_NAME in [name.strip() for name in traces_exporter.split(",")]
    registered = bool(entry_points(group="opentelemetry_traces_exporter", name=EXPORTER_NAME))
    rows = [("api_key", key)]
    for name, o in config.OPTIONS.items():
        value = source = getattr(s, name)
        if name in ("conventions", "required_keys"):  # the lists a variable sets
            value = ",".join(value) or "none"
        if name == "api_key" or not isinstance(value, (bool, int, float, str)):
            continue
        shown = value * o.scale if isinstance(value, float) else value
        text = str(shown).lower() if isinstance(shown, bool) else (
            f"{shown:g}" if isinstance(shown, float) else str(shown))
        unit = f" {o.unit}" if o.unit else ""
        label = name.removesuffix("_s")
        rows.append((label, f"{text}{unit} ({config.source_of(name, source)})"))
        if name == "base_url":
            rows.append(("endpoint", s.endpoint))
    entry = "registered" if registered else "MISSING (reinstall otel-metadata)"
    rows.append(("zero-code", f"OTEL_TRACES_EXPORTER={traces_exporter or '(unset)'}: "
                              f"{EXPORTER_NAME} {'listed' if listed else 'not listed'}; entry "
                              f"point {entry}"))
    if os.environ.get("OTEL_CONFIG_FILE"):
        rows.append(("config file", f"{os.environ['OTEL_CONFIG_FILE']} (OTEL_CONFIG_FILE): "
                                    "its exporter keys override the values above; not read here"))
    width = max(len(name) for name, _ in rows)
    lines = [f"  {name.ljust(width)}  {value}" for name, value in rows]
    if config.is_plain_http_to_remote(settings.base_url):
        lines.append("  warning: plain http to a remote host: the key would travel unencrypted")
    if listed:
        lines += [f"  warning: {w}" for w in _zero_code_pitfalls()]
    return "otel-metadata configuration:\n" + "\n".join(lines) + "\n"


def _zero_code_pitfalls() -> list[str]:
    """What would stop opentelemetry-instrument from configuring anything at all.

    opentelemetry-distro sets OTEL_METRICS_EXPORTER and OTEL_LOGS_EXPORTER to ``otlp`` when they
    are unset; without an OTLP exporter installed, the SDK's setup then fails as a whole (one
    logged traceback), and no span reaches any exporter, ours included.
    """
    return [
        f"{env} is unset: under opentelemetry-instrument it defaults to otlp, which is not "
        f"installed, and then OpenTelemetry configures nothing; set {env}=none"
        for env, group in (("OTEL_METRICS_EXPORTER", "opentelemetry_metrics_exporter"),
                           ("OTEL_LOGS_EXPORTER", "opentelemetry_logs_exporter"))
        if not os.environ.get(env, "").strip()
        and not entry_points(group=group, name="otlp_proto_grpc")
    ]


def diagnose(settings: config.Settings, timeout_s: float) -> Verdict:
    """Probe the endpoint (see the module's docstring) unless the configuration rules it out."""
    if settings.disabled:
        return Verdict(False, f"{config.ENV_DISABLED}=true: the processor is inert and sends "
                              "nothing")
    if settings.api_key is None:
        return Verdict(False, f"no API key: set {config.ENV_API_KEY}")
    probe = _post(settings.endpoint, settings.api_key, timeout_s)
    control = (_post(settings.endpoint, INVALID_KEY, timeout_s)
               if probe.status in _REFUSED_BODY else None)
    return interpret(settings, probe, control)


def interpret(settings: config.Settings, probe: Outcome, control: Outcome | None) -> Verdict:
    """The verdict for the probe's outcome, and the invalid-key control's where one was sent."""
    where = _host(settings.base_url)
    status = probe.status
    if status is None:
        return _network_verdict(probe, where, settings)
    if 200 <= status < 300:
        return Verdict(True, f"key accepted by {settings.endpoint} (HTTP {status} to a probe "
                             "with no metadata)")
    if status in _REFUSED_BODY:
        if control is not None and control.status == 401:
            return Verdict(True, f"key accepted by {settings.endpoint} (HTTP {status} to a probe "
                                 "with no metadata, 401 to an invalid key; nothing was recorded)")
        answer = f"HTTP {control.status}" if control and control.status else "no answer"
        return Verdict(False, f"could not verify the key: the API answered HTTP {status} to the "
                              f"probe and {answer} to an invalid key, so it does not check the "
                              "key first for this request")
    if status == 401:
        return Verdict(False, f"key rejected (HTTP 401): check {settings.api_key_source}")
    if status == 403:
        return Verdict(False, "key not allowed to track metadata (HTTP 403)")
    if status in (404, 405):
        return Verdict(False, f"no track-metadata endpoint at {settings.endpoint} "
                              f"(HTTP {status}): check {config.ENV_BASE_URL}")
    return Verdict(False, f"{where} answered HTTP {status}: metadata would not be accepted now"
                          + (" (it would be retried)" if status == 429 or status >= 500 else ""))


def _network_verdict(probe: Outcome, where: str, settings: config.Settings) -> Verdict:
    reason = _reason(probe.detail) or probe.error or "unknown error"
    if probe.error == "SSLError":
        return Verdict(False, f"TLS error with {where}: {reason}")
    if probe.error in ("ConnectTimeout", "ReadTimeout", "Timeout"):
        return Verdict(False, f"no answer from {where} in time ({probe.error}); "
                              f"is {config.ENV_BASE_URL} right?")
    if probe.error in ("ConnectionError", "ProxyError"):
        return Verdict(False, f"host unreachable: {where} ({reason})")
    return Verdict(False, f"request to {settings.endpoint} failed: {probe.error}: {reason}")


def _post(endpoint: str, api_key: str, timeout_s: float) -> Outcome:
    transport = Transport(endpoint, api_key, pool_size=1)
    try:
        return transport.post(PROBE_REQUEST_ID, {}, timeout_s)
    finally:
        transport.close()


def _host(base_url: str) -> str:
    parts = urlsplit(base_url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.hostname}:{port}"


# The informative part of a requests/urllib3/ssl error message, most specific first.
_REASONS = (
    re.compile(r"\[SSL: [A-Z_]+\] [^(')\"]+"),
    re.compile(r"certificate verify failed[^(')\"]*"),
    re.compile(r"\[Errno -?\d+\] ([^(')\"]+)"),  # group 1: the reason without its number
    re.compile(r"(?:Failed to resolve|timed out)[^()\"]*"),
)


def _reason(detail: str) -> str:
    for pattern in _REASONS:
        found = pattern.search(detail)
        if found:
            return found.group(found.lastindex or 0).strip().rstrip(".,:;")
    return ""


@contextmanager
def _warnings_to(out: TextIO) -> Iterator[None]:
    """Show configuration warnings (bad values, ignored variables) in the check's output."""
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("  warning: %(message)s"))
    handler.setLevel(logging.WARNING)
    logger = logging.getLogger("otel_metadata")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
