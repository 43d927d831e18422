"""kill -9 of a real app at many points, then a restart (or `drain`): every record the spool
accepted before the kill arrives, with the newest value per key (SPEC §7a).

The app (tests/crash_app.py) sends two rounds of updates for the same request IDs through a
real MetadataSpanProcessor with a spool and says when each round is queued; the test kills it
with SIGKILL while the server is in a given state, then starts a new process on the same
directory against a server that still injects some faults.
"""

from __future__ import annotations

import io
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import API_KEY, wait_until

from otel_metadata import drain
from otel_metadata.testing.track_metadata import Faults, TrackMetadataServer

APP = str(Path(__file__).with_name("crash_app.py"))
COUNT = 40
EXPECTED = {rid: {"round": "2", "r1": "x", "r2": "x"} for rid in range(COUNT)}
DEADLINE_S = 30.0


class App:
    """A crash_app subprocess whose output lines can be waited for."""

    def __init__(self, spool_dir: Path, server: TrackMetadataServer, mode: str,
                 delay_ms: int = 10, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, APP, str(spool_dir), server.base_url,
             str(0 if mode == "restart" else COUNT), str(delay_ms), mode],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **(env or {})})
        self.lines: queue.Queue[str] = queue.Queue()
        assert self.proc.stdout is not None
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            self.lines.put(line.strip())

    def wait_for(self, line: str) -> None:
        deadline = time.monotonic() + DEADLINE_S
        while True:
            try:
                if self.lines.get(timeout=max(0.01, deadline - time.monotonic())) == line:
                    return
            except queue.Empty:
                pass
            assert self.proc.poll() is None, self.proc.stderr.read() if self.proc.stderr else ""
            assert time.monotonic() < deadline, f"no {line!r} from the app"

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(DEADLINE_S)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()

    def wait_killed(self) -> int:
        """For an app that kills itself."""
        return self.proc.wait(DEADLINE_S)


@pytest.fixture
def apps() -> Iterator[list[App]]:
    started: list[App] = []
    yield started
    for app in started:
        if app.proc.poll() is None:
            app.kill()


def assert_newest_arrived(server: TrackMetadataServer) -> None:
    """Every request's newest values arrived, and round 2 was never followed by round 1."""
    wait_until(lambda: server.metadata == EXPECTED,
               f"not all arrived: {sum(server.metadata.get(r) == v for r, v in EXPECTED.items())}",
               timeout=DEADLINE_S)
    last: dict[Any, str] = {}
    for post in server.accepted():
        rnd = post.metadata.get("round")
        if rnd is not None:
            assert rnd >= last.get(post.request_id, "0"), "an older value replaced a newer one"
            last[post.request_id] = rnd


def restart_faults() -> Faults:
    return Faults(status={503: 0.1}, reset=0.05, seed=7)


# (server faults while the app runs, schedule delay, what shows the state was reached)
POINTS: dict[str, tuple[Faults | None, int, Callable[[TrackMetadataServer], bool]]] = {
    "records queued": (None, 60_000, lambda s: True),
    "POSTs in flight (server slow)": (
        Faults(slow=1.0, slow_s=60), 10, lambda s: len(s.posts) >= 4),
    "API down (503)": (Faults(status={503: 1.0}), 10, lambda s: s.statuses().get(503, 0) >= 8),
    "API refusing connections": (
        Faults(refuse_for_s=3600), 10, lambda s: s.statuses().get(0, 0) >= 8),
}


@pytest.mark.parametrize("point", list(POINTS))
def test_kill_9_then_restart_delivers_every_accepted_record_newest_value(
    tmp_path: Path, server: TrackMetadataServer, apps: list[App], point: str,
) -> None:
    faults, delay_ms, reached = POINTS[point]
    server.faults = faults
    app = App(tmp_path, server, "send", delay_ms)
    apps.append(app)
    app.wait_for("round 2")  # every record was accepted, so on disk
    wait_until(lambda: reached(server), f"the server never got to {point!r}",
               timeout=DEADLINE_S)
    app.kill()
    server.faults = restart_faults()
    apps.append(App(tmp_path, server, "restart"))
    assert_newest_arrived(server)


@pytest.mark.parametrize("after", [1, COUNT // 2, COUNT])
def test_kill_9_during_an_adoption_then_drain_delivers_everything(
    tmp_path: Path, server: TrackMetadataServer, apps: list[App],
    monkeypatch: pytest.MonkeyPatch, after: int,
) -> None:
    """The adopter dies after `after` adopted records were committed to its own file (with
    COUNT: all of them, before the dead file's copies were deleted): `drain` finds the records
    in both files, delivers them all, and exits 0."""
    first = App(tmp_path, server, "send", 60_000)
    apps.append(first)
    first.wait_for("round 2")
    first.kill()
    server.faults = Faults(status={503: 1.0})  # the adopter delivers nothing before it dies
    adopter = App(tmp_path, server, "restart", env={"CRASH_AFTER_ADOPTED": str(after)})
    apps.append(adopter)
    assert adopter.wait_killed() == -signal.SIGKILL
    server.faults = restart_faults()
    monkeypatch.setenv("PROMPTLAYER_API_KEY", API_KEY)
    monkeypatch.setenv("PROMPTLAYER_BASE_URL", server.base_url)
    out = io.StringIO()
    assert drain.run(out, str(tmp_path), DEADLINE_S) == 0, out.getvalue()
    assert_newest_arrived(server)
    assert [n for n in os.listdir(tmp_path) if not n.startswith(".")] == []


def test_kill_9_while_traces_are_held_then_restart_delivers_what_was_known(
    tmp_path: Path, server: TrackMetadataServer, apps: list[App],
) -> None:
    """Requests joined while their root is still open (so not posted yet) are on disk: after a
    kill -9 the next process delivers each with what was known (the root's `user.id` was not:
    it never ended)."""
    app = App(tmp_path, server, "hold")
    apps.append(app)
    app.wait_for("held")
    assert server.posts == []
    app.kill()
    server.faults = restart_faults()
    apps.append(App(tmp_path, server, "restart"))
    assert_newest_arrived(server)
