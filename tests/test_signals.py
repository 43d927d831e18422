"""SIGTERM and bounded shutdown under real servers (SPEC §7): uvicorn re-raises SIGTERM after its
graceful shutdown, so interpreter exit hooks never run there; gunicorn's workers exit through
them, and must not be held past `shutdown_timeout` by an unreachable API."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import API_KEY, wait_for

from otel_metadata.testing.track_metadata import TrackMetadataServer

APPS = Path(__file__).parent / "apps"
BIN = Path(sys.executable).parent
REQUESTS = 50
WORKERS = 2  # gunicorn's


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _command(kind: str, port: int) -> list[str]:
    if kind == "uvicorn":
        return [str(BIN / "uvicorn"), "web_servers:app", "--host", "127.0.0.1",
                "--port", str(port), "--log-level", "warning"]
    return [str(BIN / "gunicorn"), "--preload", "-w", str(WORKERS), "-b", f"127.0.0.1:{port}",
            "--graceful-timeout", "30", "-c", str(APPS / "gunicorn_ready.py"), "web_servers:wsgi"]


@pytest.fixture
def start_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    started: list[subprocess.Popen[str]] = []

    def start(kind: str, base_url: str, **env: str) -> tuple[subprocess.Popen[str], int]:
        port = _free_port()
        ready = tmp_path_factory.mktemp("workers-ready")
        child_env = {k: v for k, v in os.environ.items()
                     if not k.startswith(("OTEL_", "PROMPTLAYER_"))}
        child_env.update(PROMPTLAYER_API_KEY=API_KEY, PROMPTLAYER_BASE_URL=base_url,
                         PYTHONPATH=str(APPS), PYTHONFAULTHANDLER="1",
                         WORKERS_READY_DIR=str(ready), **env)
        proc = subprocess.Popen(_command(kind, port), cwd=APPS, env=child_env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        started.append(proc)
        up = wait_for(lambda: _answers(port) or proc.poll() is not None, timeout=30)
        if up and kind == "gunicorn":  # a SIGTERM before a worker set its handlers is lost
            up = wait_for(lambda: len(os.listdir(ready)) == WORKERS or proc.poll() is not None,
                          timeout=30)
        if not up:
            pytest.fail(f"{kind} not up after 30 s; stderr:\n{_abort(proc)}")
        assert proc.poll() is None, proc.communicate()
        return proc, port

    yield start
    for proc in started:  # the workers first: an orphan would hold the pipes open
        for pid in (*_children(proc.pid), proc.pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        proc.communicate(timeout=30)


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _requests(port: int) -> None:
    for rid in range(1, REQUESTS + 1):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/chat?id={rid}", timeout=10) as r:
            assert r.status == 200


def _terminate(proc: subprocess.Popen[str], timeout: float = 30) -> tuple[float, str, str]:
    """SIGTERM right away; how long the process took to exit, and what it printed and logged.

    A process still there after `timeout` fails the test with every thread's stack, its own
    and its children's (PYTHONFAULTHANDLER dumps them on SIGABRT), to show where it hung."""
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {timeout:g} s after SIGTERM; stderr:\n{_abort(proc)}")
    return time.monotonic() - started, stdout, stderr


def _abort(proc: subprocess.Popen[str]) -> str:
    """SIGABRT to a stuck server and its workers: the end of what they logged, with every
    thread's stack (PYTHONFAULTHANDLER)."""
    for pid in (*_children(proc.pid), proc.pid):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGABRT)
    return proc.communicate(timeout=30)[1][-20000:]


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (gunicorn's workers), from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
    return found


ALL = {rid: {"user_id": f"user-{rid}"} for rid in range(1, REQUESTS + 1)}


def _ready(script: str, server: TrackMetadataServer) -> subprocess.Popen[str]:
    """A Python process running `script`, once it printed "ready" (its processor is built)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PROMPTLAYER_"))}
    env.update(PROMPTLAYER_API_KEY=API_KEY, PROMPTLAYER_BASE_URL=server.base_url)
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    return proc


@pytest.mark.parametrize("kind", ["uvicorn", "gunicorn"])
def test_sigterm_right_after_the_last_request_delivers_every_request(
    kind: str, server: TrackMetadataServer, start_app: object,
) -> None:
    proc, port = start_app(kind, server.base_url)  # type: ignore[operator]
    _requests(port)
    _, _, stderr = _terminate(proc)
    assert server.metadata == ALL, stderr
    assert proc.returncode in (0, -signal.SIGTERM), stderr  # uvicorn ends by the signal


def test_without_the_handler_uvicorn_loses_what_was_queued(
    server: TrackMetadataServer, start_app: object,
) -> None:
    """PROMPTLAYER_METADATA_HANDLE_SIGTERM=false: what the handler saves is lost (the reason
    for the handler: uvicorn's re-raised SIGTERM skips every exit hook)."""
    proc, port = start_app(  # type: ignore[operator]
        "uvicorn", server.base_url, PROMPTLAYER_METADATA_HANDLE_SIGTERM="false")
    _requests(port)
    _terminate(proc)
    assert server.metadata == {}
    assert proc.returncode == -signal.SIGTERM


@pytest.mark.parametrize("kind", ["uvicorn", "gunicorn"])
def test_an_unreachable_api_does_not_hold_the_exit_and_the_loss_is_logged(
    kind: str, start_app: object,
) -> None:
    """The export timeout (30 s here) would equal gunicorn's graceful timeout: shutdown is held
    to shutdown_timeout instead (1 s here), and what could not be sent is said."""
    closed = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    proc, port = start_app(kind, closed, OTEL_BSP_EXPORT_TIMEOUT="30000",  # type: ignore[operator]
                           PROMPTLAYER_METADATA_SHUTDOWN_TIMEOUT="1000")
    _requests(port)
    took, _, stderr = _terminate(proc)
    # Far below the 30 s the export timeout would have taken: start-up of nothing, one flush
    # bounded at 1 s per process, and the servers' own stopping.
    assert took < 15, stderr
    assert "otel-metadata:" in stderr and ("not yet delivered" in stderr
                                           or "dropped." in stderr), stderr


@pytest.mark.parametrize("kind", ["uvicorn", "gunicorn"])
def test_with_a_spool_an_unreachable_api_keeps_the_records_for_the_next_start(
    kind: str, server: TrackMetadataServer, start_app: object, tmp_path: Path,
) -> None:
    """SIGTERM while PromptLayer cannot be reached: the exit is still bounded, nothing is
    counted lost, the records stay in the spool (gunicorn: one file per forked worker), and
    the next start on the same directory delivers every one."""
    closed = f"http://127.0.0.1:{_free_port()}"
    spool = {"PROMPTLAYER_METADATA_SPOOL_DIR": str(tmp_path),
             "PROMPTLAYER_METADATA_SHUTDOWN_TIMEOUT": "1000"}
    proc, port = start_app(kind, closed, **spool)  # type: ignore[operator]
    _requests(port)
    took, _, stderr = _terminate(proc)
    assert took < 15, stderr
    assert "dropped." not in stderr, stderr
    assert "kept in the spool" in stderr or "spooled=" in stderr, stderr
    assert any(name.endswith(".spool") for name in os.listdir(tmp_path)), stderr
    again, _ = start_app(kind, server.base_url, **spool)  # type: ignore[operator]
    delivered = wait_for(lambda: server.metadata == ALL, timeout=30)
    _, _, stderr = _terminate(again)
    assert delivered, (len(server.metadata), stderr)


def test_a_bare_process_flushes_then_dies_by_the_signal_as_before(
    server: TrackMetadataServer,
) -> None:
    script = """
import os, signal, sys, time
from opentelemetry.sdk.trace import TracerProvider
from otel_metadata import MetadataSpanProcessor, set_request_id
provider = TracerProvider()
provider.add_span_processor(MetadataSpanProcessor())
with provider.get_tracer("t").start_as_current_span("llm") as span:
    span.set_attribute("user.id", "u")
    set_request_id(1)
print("ready", flush=True)
time.sleep(60)
"""
    proc = _ready(script, server)
    _, _, stderr = _terminate(proc)
    assert proc.returncode == -signal.SIGTERM, stderr  # the default action still happens
    assert server.metadata == {1: {"user_id": "u"}}


def test_a_handler_the_app_had_still_runs(server: TrackMetadataServer) -> None:
    script = """
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *a: (print("app handler", flush=True), sys.exit(3)))
from opentelemetry.sdk.trace import TracerProvider
from otel_metadata import MetadataSpanProcessor
TracerProvider().add_span_processor(MetadataSpanProcessor())
print("ready", flush=True)
time.sleep(60)
"""
    proc = _ready(script, server)
    _, stdout, _ = _terminate(proc)
    assert proc.returncode == 3
    assert stdout == "app handler\n"


def test_shutdown_puts_the_previous_handler_back(make_pipeline: object) -> None:
    """Processors come and go (tests, reloads): each one's handler goes with it."""
    before = signal.getsignal(signal.SIGTERM)
    p = make_pipeline()  # type: ignore[operator]
    assert signal.getsignal(signal.SIGTERM) is not before
    p.processor.shutdown()
    assert signal.getsignal(signal.SIGTERM) is before
