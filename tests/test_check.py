"""`otel-metadata check` against the strict local server: one verdict line, the exit code, and
never a recorded metadata nor the key in the output."""

from __future__ import annotations

import socket

import pytest

from otel_metadata import check as check_module
from otel_metadata import cli
from otel_metadata.check import interpret
from otel_metadata.config import resolve
from otel_metadata.testing.track_metadata import Faults, TrackMetadataServer
from otel_metadata.transport import Outcome


@pytest.fixture(autouse=True)
def _no_zero_code_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)


def check(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = cli.main(["check", "--timeout", "5", *args])
    return code, capsys.readouterr().out


def verdict(output: str) -> str:
    return output.rstrip("\n").splitlines()[-1]


def setting(output: str, name: str) -> str:
    """The value shown for one setting of the configuration table."""
    rows = [line.split(None, 1) for line in output.splitlines() if line.startswith("  ")]
    return next(value for key, value in rows if key == name)


def point_at(monkeypatch: pytest.MonkeyPatch, base_url: str, key: str | None) -> None:
    monkeypatch.setenv("PROMPTLAYER_BASE_URL", base_url)
    if key is not None:
        monkeypatch.setenv("PROMPTLAYER_API_KEY", key)


def test_accepted_key_exits_0_and_records_nothing(
    server: TrackMetadataServer, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    point_at(monkeypatch, server.base_url, server.api_key)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "250")
    code, out = check(capsys)

    assert code == 0
    assert verdict(out).startswith("OK: key accepted")
    assert server.metadata == {}
    # The probe was refused for its empty body, and a control with an invalid key for the key:
    # so the API authenticates first, and the first answer proves the key.
    assert server.statuses() == {422: 1, 401: 1}
    # The effective configuration, the key only as its last 4 characters.
    assert server.api_key not in out
    assert (f"****{server.api_key[-4:]} ({len(server.api_key)} characters, from "
            "PROMPTLAYER_API_KEY)") in out
    assert f"{server.base_url} (from PROMPTLAYER_BASE_URL)" in out
    assert "250 ms (from OTEL_BSP_SCHEDULE_DELAY)" in out
    assert setting(out, "max_queue_size") == "2048 (default)"


def test_rejected_key(
    server: TrackMetadataServer, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    point_at(monkeypatch, server.base_url, "pl-not-the-right-key-4321")
    code, out = check(capsys)

    assert code == 1
    assert verdict(out) == "PROBLEM: key rejected (HTTP 401): check PROMPTLAYER_API_KEY"
    assert "pl-not-the-right-key" not in out
    assert server.statuses() == {401: 1}


def test_no_key_sends_nothing(
    server: TrackMetadataServer, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    point_at(monkeypatch, server.base_url, None)
    code, out = check(capsys)

    assert (code, verdict(out)) == (1, "PROBLEM: no API key: set PROMPTLAYER_API_KEY")
    assert setting(out, "api_key") == "not set"
    assert server.posts == []


def test_unreachable_host(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nobody listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    point_at(monkeypatch, f"http://127.0.0.1:{port}", "pl-some-key-0123456789")
    code, out = check(capsys)

    assert code == 1
    assert verdict(out) == f"PROBLEM: host unreachable: 127.0.0.1:{port} (Connection refused)"


def test_tls_error(
    server: TrackMetadataServer, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # https:// to a server that speaks plain HTTP: the TLS handshake fails.
    https = server.base_url.replace("http://", "https://")
    point_at(monkeypatch, https, server.api_key)
    code, out = check(capsys)

    assert code == 1
    assert verdict(out).startswith(f"PROBLEM: TLS error with {https[len('https://'):]}: ")
    assert server.metadata == {}


def test_wrong_base_url_path(
    server: TrackMetadataServer, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    point_at(monkeypatch, server.base_url + "/v2", server.api_key)
    code, out = check(capsys)

    assert code == 1
    assert verdict(out) == (f"PROBLEM: no track-metadata endpoint at {server.base_url}/v2/rest/"
                            "track-metadata (HTTP 404): check PROMPTLAYER_BASE_URL")


def test_api_unavailable_is_not_ok(
    server: TrackMetadataServer, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server.faults = Faults(status={503: 1.0})
    point_at(monkeypatch, server.base_url, server.api_key)
    code, out = check(capsys)

    assert code == 1
    assert verdict(out).endswith("answered HTTP 503: metadata would not be accepted now "
                                 "(it would be retried)")


def test_no_answer_in_time(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    with TrackMetadataServer(api_key="pl-slow-key-0123456789", latency_s=2.0) as slow:
        point_at(monkeypatch, slow.base_url, slow.api_key)
        code = cli.main(["check", "--timeout", "0.2"])
    out = capsys.readouterr().out

    assert code == 1
    assert "PROBLEM: no answer from 127.0.0.1:" in verdict(out)
    assert "(ReadTimeout)" in verdict(out)


def test_sdk_disabled_is_reported_without_a_request(
    server: TrackMetadataServer, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    point_at(monkeypatch, server.base_url, server.api_key)
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    code, out = check(capsys)

    assert (code, verdict(out)) == (
        1, "PROBLEM: OTEL_SDK_DISABLED=true: the processor is inert and sends nothing")
    assert server.posts == []


def test_bad_values_are_shown_as_ignored(
    server: TrackMetadataServer, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    point_at(monkeypatch, server.base_url, server.api_key)
    monkeypatch.setenv("OTEL_BSP_EXPORT_TIMEOUT", "soon")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp, promptlayer_metadata")
    # As where no OTLP exporter is installed (the test extra installs them for `serve`).
    found = check_module.entry_points
    monkeypatch.setattr(check_module, "entry_points", lambda **kw: (
        [] if kw.get("name") == "otlp_proto_grpc" else found(**kw)))
    code, out = check(capsys)

    assert code == 0
    assert "warning: otel-metadata: ignoring OTEL_BSP_EXPORT_TIMEOUT='soon'" in out
    assert "30000 ms (default: OTEL_BSP_EXPORT_TIMEOUT ignored, see the warning)" in out
    assert "promptlayer_metadata listed; entry point registered" in out
    # No OTLP exporter is installed here: opentelemetry-distro's otlp default would break setup.
    assert ("warning: OTEL_METRICS_EXPORTER is unset: under opentelemetry-instrument it defaults "
            "to otlp, which is not installed") in out
    assert "set OTEL_LOGS_EXPORTER=none" in out


def test_a_body_refused_even_with_an_invalid_key_leaves_the_key_unverified(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An API that validates the body before the key: 422 to both probes proves nothing.
    monkeypatch.setenv("PROMPTLAYER_API_KEY", "pl-some-key-0123456789")
    settings = resolve()
    unverified = interpret(settings, Outcome(422), Outcome(422))
    proven = interpret(settings, Outcome(422), Outcome(401))

    assert not unverified.ok and unverified.message.startswith("could not verify the key")
    assert proven.ok
