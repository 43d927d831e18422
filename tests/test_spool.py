"""The durable spool (SPEC §7a): on disk before accepted, settled rows deleted, adopted by the
next process, never an older value over a newer one, and disk trouble never breaks delivery."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import API_KEY, Pipeline, send, wait_for
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from otel_metadata import drain, spool
from otel_metadata.cli import main as cli_main
from otel_metadata.queue import Entry
from otel_metadata.spool import SpoolQueue
from otel_metadata.stats import Stats
from otel_metadata.testing.track_metadata import Faults, TrackMetadataServer


class Clock:
    """A clock the test moves by hand: entries are due only when flushed."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _nothing() -> None:
    """The accounting of a sender that counts nothing."""


def make(path: Path | str, clock: Clock | None = None, max_size: int = 100,
         **kwargs: Any) -> SpoolQueue:
    return SpoolQueue(str(path), max_size, max_size, 60.0, stats=kwargs.pop("stats", Stats()),
                      clock=clock or Clock(), **kwargs)


def rows(q_or_path: SpoolQueue | str) -> dict[Any, tuple[dict[str, str], int]]:
    """What a file holds, read by a connection of its own: request ID -> (metadata, state)."""
    path = q_or_path.path if isinstance(q_or_path, SpoolQueue) else q_or_path
    with sqlite3.connect(path) as db:
        return {json.loads(k): (json.loads(md), state)
                for k, md, state in db.execute("SELECT rid, md, state FROM records")}


def take_all(q: SpoolQueue) -> list[Entry]:
    """Make everything due and take every entry that can go out now."""
    q.flush(deadline=q._clock())
    out = []
    while any(rid not in q._inflight for rid in q._pending):
        entry = q.take()
        assert entry is not None
        out.append(entry)
    return out


def die(q: SpoolQueue) -> None:
    """What kill -9 leaves: the file as committed, its lock free (no close, no cleanup)."""
    if q._db is not None:
        q._db.close()  # rolls back what was not committed, as a crash does
    if q._lock_fd >= 0:  # not after an orderly close
        os.close(q._lock_fd)


def deliver_all(q: SpoolQueue, server: dict[Any, dict[str, str]]) -> None:
    """Adopt and deliver until nothing is left, applying each POST as the API does."""
    while True:
        q._clock.now += 3600  # type: ignore[attr-defined]  # parked rows are due again
        adopted = q.adopt()
        entries = take_all(q)
        for entry in entries:
            server.setdefault(entry.request_id, {}).update(entry.metadata)
            q.ack(entry, True, _nothing)
        if not adopted and not entries and not len(q):
            return


def test_a_record_is_on_disk_before_put_returns_and_coalesces_in_place(tmp_path: Path) -> None:
    q = make(tmp_path)
    assert q.put(1, {"a": "1", "b": "1"})
    assert rows(q) == {1: ({"a": "1", "b": "1"}, spool.QUEUED)}
    assert q.put(1, {"a": "2"}) and q.put("1", {"c": "x"})
    assert rows(q) == {1: ({"a": "2", "b": "1"}, 0), "1": ({"c": "x"}, 0)}  # an int stays one
    assert len(q) == 2


def test_ack_deletes_unless_a_newer_update_came_in_while_in_flight(tmp_path: Path) -> None:
    q = make(tmp_path)
    q.put(1, {"a": "1"})
    (first,) = take_all(q)
    q.put(1, {"a": "2", "b": "2"})  # while the first POST is in flight
    q.ack(first, True, _nothing)
    assert rows(q) == {1: ({"a": "2", "b": "2"}, 0)}  # the newer values stay
    (second,) = take_all(q)
    assert second.metadata == {"a": "2", "b": "2"}
    q.ack(second, True, _nothing)
    assert rows(q) == {}


def test_a_permanent_refusal_deletes_and_a_kept_failure_parks_until_due(tmp_path: Path) -> None:
    clock = Clock()
    q = make(tmp_path, clock, park_s=10.0)
    q.put(1, {"a": "1"})
    q.put(2, {"a": "1"})
    one, two = take_all(q)
    q.ack(one, False, _nothing)  # 400/422: the record itself is at fault
    q.ack(two, False, _nothing, keep=True)  # retries ran out: not for good
    assert rows(q) == {2: ({"a": "1"}, spool.PARKED)}
    assert q.adopt() == 0 and len(q) == 0  # not due yet
    clock.now += 10
    assert q.adopt() == 1
    (again,) = take_all(q)
    assert (again.request_id, again.metadata) == (2, {"a": "1"})


def test_a_put_into_a_parked_row_sends_the_parked_keys_too(tmp_path: Path) -> None:
    q = make(tmp_path)
    q.put(1, {"a": "1", "b": "1"})
    (first,) = take_all(q)
    q.ack(first, False, _nothing, keep=True)
    q.put(1, {"b": "2"})
    (entry,) = take_all(q)
    assert entry.metadata == {"a": "1", "b": "2"}


def test_a_kept_failure_with_a_newer_update_waiting_goes_out_with_it(tmp_path: Path) -> None:
    """The failed POST's keys are not lost when the newer update's POST deletes the row."""
    q = make(tmp_path)
    q.put(1, {"a": "1", "b": "1"})
    (first,) = take_all(q)
    q.put(1, {"b": "2"})  # while the first POST is in flight
    q.ack(first, False, _nothing, keep=True)  # retries ran out
    (second,) = take_all(q)
    assert second.metadata == {"a": "1", "b": "2"}
    q.ack(second, True, _nothing)
    assert rows(q) == {}


def test_close_keep_leaves_records_for_the_next_process(tmp_path: Path) -> None:
    q = make(tmp_path)
    q.put(1, {"a": "1"})
    q.put(2, {"a": "1"})
    take_all(q)  # both in flight at close: their POSTs may land or not
    assert q.close(keep=True) == []
    assert q.put(3, {"a": "1"}) is False
    nxt = make(tmp_path)
    assert nxt.adopt() == 2
    assert sorted(e.request_id for e in take_all(nxt)) == [1, 2]
    assert not os.path.exists(q.path)  # the dead file, emptied, is gone


def test_close_without_keep_gives_up_returns_and_removes(tmp_path: Path) -> None:
    q = make(tmp_path)
    q.put(1, {"a": "1"})
    assert [e.request_id for e in q.close()] == [1]
    assert os.listdir(tmp_path) == []
    assert make(tmp_path).adopt() == 0


def test_a_live_processs_file_is_never_adopted(tmp_path: Path) -> None:
    live = make(tmp_path)
    live.put(1, {"a": "1"})
    other = make(tmp_path)
    assert other.adopt() == 0
    assert rows(live) == {1: ({"a": "1"}, 0)}
    die(live)
    assert other.adopt() == 1


def test_adoption_leaves_half_the_queue_free_and_finishes_over_several_calls(
    tmp_path: Path,
) -> None:
    dead = make(tmp_path)
    for rid in range(5):
        dead.put(rid, {"a": str(rid)})
    die(dead)
    q = make(tmp_path, max_size=4)
    server: dict[Any, dict[str, str]] = {}
    assert q.adopt() == 2  # the other half is for the process's own records
    assert os.path.exists(dead.path)  # three rows still wait there
    deliver_all(q, server)
    assert server == {rid: {"a": str(rid)} for rid in range(5)}
    assert not os.path.exists(dead.path)


def test_adopted_values_never_override_our_own(tmp_path: Path) -> None:
    dead = make(tmp_path)
    dead.put(1, {"a": "old", "b": "old"})
    die(dead)
    q = make(tmp_path)
    q.put(1, {"a": "new"})
    assert q.adopt() == 1
    assert rows(q) == {1: ({"a": "new", "b": "old"}, 0)}
    (entry,) = take_all(q)
    assert entry.metadata == {"a": "new", "b": "old"}


def test_a_held_request_is_not_sent_completed_by_its_put_and_survives_a_crash(
    tmp_path: Path,
) -> None:
    q = make(tmp_path)
    q.hold(1, {"user_id": "u", "own": "1"})
    q.hold(2, {"user_id": "v"})
    assert len(q) == 0 and take_all(q) == []  # provisional: not queued
    q.put(1, {"user_id": "u", "own": "1", "parent": "p"})  # its trace was released
    assert rows(q) == {1: ({"user_id": "u", "own": "1", "parent": "p"}, 0),
                       2: ({"user_id": "v"}, spool.HELD)}
    die(q)  # request 2's trace never released: what was known at hold() survives
    server: dict[Any, dict[str, str]] = {}
    deliver_all(make(tmp_path), server)
    assert server == {1: {"user_id": "u", "own": "1", "parent": "p"}, 2: {"user_id": "v"}}


def test_past_max_spool_bytes_the_newest_is_dropped_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    stats = Stats()
    q = make(tmp_path, max_spool_bytes=400, stats=stats)
    accepted = [rid for rid in range(20) if q.put(rid, {"k": "x" * 50})]
    assert 2 <= len(accepted) < 20 and accepted == list(range(len(accepted)))
    assert stats.snapshot()["spool_full"] == 20 - len(accepted)
    assert q.put(0, {"big": "y" * 500}) is False  # a coalesced update past it too
    assert sum("max_spool_bytes" in r.getMessage() for r in caplog.records) == 1
    for entry in take_all(q):
        q.ack(entry, True, _nothing)
    assert q.put(100, {"k": "x" * 50})  # room again once delivered


def test_a_corrupt_dead_file_is_set_aside_with_one_warning_and_the_rest_adopted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    good = make(tmp_path)
    good.put(1, {"a": "1"})
    die(good)
    bad = tmp_path / "spool-1-00.spool"
    bad.write_bytes(b"this is not a database" * 100)
    q = make(tmp_path)
    assert q.adopt() == 1
    assert q.adopt() == 0
    assert (tmp_path / ("spool-1-00.spool" + spool.ASIDE)).exists() and not bad.exists()
    assert sum("could not read the spool file" in r.getMessage()
               for r in caplog.records) == 1


def test_an_unwritable_directory_warns_once_and_delivery_goes_on_in_memory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    (tmp_path / "file").write_text("")
    q = make(tmp_path / "file" / "spool")  # a directory that cannot exist (we may be root)
    assert not q.durable
    assert q.put(1, {"a": "1"}) and q.adopt() == 0
    q.hold(2, {"a": "1"})
    (entry,) = take_all(q)
    q.ack(entry, True, _nothing)
    assert q.close(keep=True) == []
    assert sum("kept in memory only" in r.getMessage() for r in caplog.records) == 1


_FULL_DISK = """
import json, logging, resource, sys
from otel_metadata.spool import SpoolQueue
from otel_metadata.stats import Stats
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))
q = SpoolQueue(sys.argv[1], 10_000, 10_000, 60.0, stats=Stats())
accepted = sum(q.put(rid, {"k": "x" * 1000}) for rid in range(1000))
durable = q.durable
q.flush(0.0)
taken = []
while len(taken) < accepted:
    taken.append(q.take())
for entry in taken:
    q.ack(entry, True, lambda: None)
print(json.dumps({"accepted": accepted, "durable": durable, "left": len(q)}))
"""


def test_a_full_disk_warns_once_and_delivery_goes_on_in_memory(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", _FULL_DISK, str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"accepted": 1000, "durable": False, "left": 0}
    assert done.stderr.count("kept in memory only") == 1
    assert any(name.endswith(spool.ASIDE) for name in os.listdir(tmp_path))


def test_a_forked_child_opens_its_own_file_and_leaves_the_parents_alone(
    tmp_path: Path,
) -> None:
    """The child disowns the inherited spool (no use of the parent's connection, no copy of
    its lock): while the child lives, the parent's file is adoptable once the parent dies."""
    parent = make(tmp_path)
    parent.put(1, {"from": "parent"})
    child_reads, parent_writes = os.pipe()
    parent_reads, child_writes = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        try:
            own = make(tmp_path)
            own.put(2, {"from": "child"})
            report = {"disowned": not parent.durable and parent.put(3, {"x": "y"}) is False,
                      "path": own.path, "rows": list(rows(own)), "adopted": own.adopt()}
            os.write(child_writes, json.dumps(report).encode() + b"\n")
            os.read(child_reads, 1)  # until the parent has looked
        finally:
            os._exit(0)
    try:
        os.close(child_writes)
        with os.fdopen(parent_reads) as pipe:
            child = json.loads(pipe.readline() or "null")
        assert child is not None and child["path"] != parent.path
        assert (child["disowned"], child["rows"], child["adopted"]) == (True, [2], 0)
        assert rows(parent) == {1: ({"from": "parent"}, 0)}
        die(parent)  # the parent dies while the child lives: its file is free
        third = make(tmp_path)
        assert third.adopt() == 1 and [e.request_id for e in take_all(third)] == [1]
    finally:
        os.write(parent_writes, b"x")
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert make(tmp_path).adopt() == 1  # the child is gone: its file is adopted too


def test_a_child_forked_while_a_thread_writes_the_spool_opens_its_own(tmp_path: Path) -> None:
    """A gunicorn `--preload` master forks workers while its sender and adoption write the
    spool: a child forked while a thread was inside SQLite inherited SQLite's own mutexes
    locked, and hung for ever opening its file (about 1 fork in 70 before the fix)."""
    parent = make(tmp_path, max_size=10_000)
    stop = threading.Event()

    def churn() -> None:  # a sender's and an adopter's statements, back to back
        n = 0
        while not stop.is_set():
            n += 1
            parent.put(n % 500, {"k": "v" * 50})

    writer = threading.Thread(target=churn, daemon=True)
    writer.start()
    hung = []
    try:
        for _ in range(200):
            pid = os.fork()
            if pid == 0:  # the child: never return into pytest
                signal.alarm(10)  # a hang ends here, killed by SIGALRM
                try:
                    own = make(tmp_path)
                    own.put(1, {"from": "child"})
                    own.close()
                finally:
                    os._exit(0)
            status = os.waitpid(pid, 0)[1]
            if os.waitstatus_to_exitcode(status) != 0:
                hung.append(status)
    finally:
        stop.set()
        writer.join(10)
    assert hung == []


def test_put_never_waits_for_the_lock_a_sender_holds(tmp_path: Path) -> None:
    """The lineage worker's `put` is on disk and accepted while a sender sits inside the
    queue's lock (it only waits for the spool's own connection, held one statement at a
    time)."""
    q = make(tmp_path)
    with q._lock:  # a sender inside the queue's lock (taking an entry, settling one)
        done = threading.Event()
        worker = threading.Thread(target=lambda: (q.put(1, {"a": "1"}), done.set()),
                                  daemon=True)
        worker.start()
        assert done.wait(10), "put waited for the queue's lock"
        assert rows(q) == {1: ({"a": "1"}, spool.QUEUED)}
    (entry,) = take_all(q)
    assert entry.metadata == {"a": "1"}


# -- in a pipeline --

def spool_of(p: Pipeline) -> SpoolQueue:
    store = p.processor._pipeline._spool  # type: ignore[union-attr]
    assert store is not None
    return store


def test_the_spool_dir_setting_spools_and_delivers(
    tmp_path: Path, server: TrackMetadataServer, make_pipeline: Callable[..., Pipeline],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PROMPTLAYER_METADATA_SPOOL_DIR", str(tmp_path))
    p = make_pipeline(schedule_delay_millis=60_000)
    send(p, 1, {"user_id": "u"})
    assert wait_for(lambda: rows(spool_of(p)) == {1: ({"user_id": "u"}, spool.QUEUED)})
    assert p.flush()
    assert server.metadata == {1: {"user_id": "u"}}
    assert rows(spool_of(p)) == {}


def test_force_flush_covers_what_dead_processes_left(
    tmp_path: Path, server: TrackMetadataServer, make_pipeline: Callable[..., Pipeline],
) -> None:
    p = make_pipeline(spool_dir=str(tmp_path), schedule_delay_millis=60_000)
    assert wait_for(lambda: spool_of(p).durable)
    dead = make(tmp_path)  # a process that died after this one's first adoption
    dead.put(7, {"from": "dead"})
    die(dead)
    assert p.flush()
    assert server.metadata == {7: {"from": "dead"}}


def test_shutdown_keeps_what_is_left_in_the_spool_and_the_next_start_delivers_it(
    tmp_path: Path, server: TrackMetadataServer, make_pipeline: Callable[..., Pipeline],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Not counted as lost (dropped.shutdown), but as spooled, and said at shutdown."""
    server.faults = Faults(status={503: 1.0})
    p = make_pipeline(spool_dir=str(tmp_path), shutdown_timeout_millis=300)
    for rid in range(5):
        send(p, rid, {"n": str(rid)})
    p.provider.shutdown()
    counts = p.processor.stats()
    assert (counts["dropped.shutdown"], counts["spooled"]) == (0, 5), counts
    assert any("spooled=5" in r.getMessage() for r in caplog.records)
    server.faults = None
    nxt = make_pipeline(spool_dir=str(tmp_path))
    assert wait_for(lambda: len(server.metadata) == 5, timeout=10)
    assert server.metadata == {rid: {"n": str(rid)} for rid in range(5)}
    assert nxt.processor.stats()["adopted"] == 5


def test_a_rejected_key_keeps_the_records_for_a_process_with_a_good_one(
    tmp_path: Path, server: TrackMetadataServer, make_pipeline: Callable[..., Pipeline],
) -> None:
    bad = make_pipeline(spool_dir=str(tmp_path), api_key="pl-wrong-key-0000000000")
    send(bad, 1, {"a": "1"})
    assert bad.flush() is False
    assert rows(spool_of(bad)) == {1: ({"a": "1"}, spool.PARKED)}
    bad.provider.shutdown()
    make_pipeline(spool_dir=str(tmp_path))
    assert wait_for(lambda: server.metadata == {1: {"a": "1"}}, timeout=10)


def test_a_request_joined_while_its_root_is_open_is_on_disk_with_what_is_known(
    tmp_path: Path, server: TrackMetadataServer, make_pipeline: Callable[..., Pipeline],
) -> None:
    p = make_pipeline(spool_dir=str(tmp_path), max_trace_wait_millis=60_000,
                      metadata={"app": "a"})
    with p.tracer.start_as_current_span("root") as root:
        root.set_attribute("user.id", "u")
        send(p, 1, {"step": "1"})
        assert wait_for(lambda: rows(spool_of(p)) == {1: ({"app": "a", "step": "1"},
                                                          spool.HELD)})
        assert server.posts == []
    assert p.flush()  # the root ended: the request completes its row, and is delivered
    assert server.metadata == {1: {"app": "a", "step": "1", "user_id": "u"}}
    assert rows(spool_of(p)) == {}


# -- the drain command --

def _drain(tmp_path: Path, server: TrackMetadataServer, monkeypatch: pytest.MonkeyPatch,
           timeout: float = 20.0) -> tuple[int, str]:
    monkeypatch.setenv("PROMPTLAYER_API_KEY", API_KEY)
    monkeypatch.setenv("PROMPTLAYER_BASE_URL", server.base_url)
    monkeypatch.setenv("OTEL_BSP_EXPORT_TIMEOUT", "1000")
    out = io.StringIO()
    return drain.run(out, str(tmp_path), timeout), out.getvalue()


def test_the_drain_command(tmp_path: Path, server: TrackMetadataServer,
                           monkeypatch: pytest.MonkeyPatch,
                           capsys: pytest.CaptureFixture[str]) -> None:
    dead = make(tmp_path)
    dead.put(1, {"a": "1"})
    die(dead)
    monkeypatch.setenv("PROMPTLAYER_API_KEY", API_KEY)
    monkeypatch.setenv("PROMPTLAYER_BASE_URL", server.base_url)
    assert cli_main(["drain", "--spool-dir", str(tmp_path), "--timeout", "10"]) == 0
    assert "adopted 1, delivered 1, left 0" in capsys.readouterr().out
    assert server.metadata == {1: {"a": "1"}}
    assert cli_main(["drain", "--spool-dir", str(tmp_path / "none")]) == 2


def test_drain_delivers_what_dead_processes_left_and_exits_0(
    tmp_path: Path, server: TrackMetadataServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    for n in range(3):
        dead = make(tmp_path)
        for rid in range(n * 10, n * 10 + 5):
            dead.put(rid, {"n": str(rid)})
        die(dead)
    live = make(tmp_path)
    live.put(99, {"n": "live"})
    code, out = _drain(tmp_path, server, monkeypatch)
    assert code == 0, out
    assert server.metadata == {rid: {"n": str(rid)} for n in range(3)
                               for rid in range(n * 10, n * 10 + 5)}
    assert "1 file(s) of live processes" in out
    assert rows(live) == {99: ({"n": "live"}, 0)}  # untouched


def test_drain_exits_non_zero_and_keeps_records_when_the_api_is_down(
    tmp_path: Path, server: TrackMetadataServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    dead = make(tmp_path)
    dead.put(1, {"a": "1"})
    die(dead)
    server.faults = Faults(status={503: 1.0})
    code, out = _drain(tmp_path, server, monkeypatch)
    assert code == 1 and "left 1" in out, out
    server.faults = None
    assert _drain(tmp_path, server, monkeypatch)[0] == 0
    assert server.metadata == {1: {"a": "1"}}


# -- model test: random operations and crashes never lose a record nor let an older value win --

class _Killed(BaseException):
    """The process dies here (not an error our code could catch)."""


class Fault:
    """A budget of statements shared by every connection the spool opens; at its end the
    process dies (`_Killed`). `crash` closes them all: what was not committed is lost."""

    def __init__(self) -> None:
        self.countdown = -1  # -1: never
        self.connections: list[sqlite3.Connection] = []

    def tick(self) -> None:
        self.countdown -= 1
        if self.countdown == 0:
            raise _Killed

    def crash(self) -> None:
        for db in self.connections:
            with contextlib.suppress(sqlite3.Error):
                db.close()
        self.connections.clear()
        self.countdown = -1


class _Dying:
    """A connection that dies at the fault's last statement: a crash between statements."""

    def __init__(self, db: sqlite3.Connection, fault: Fault) -> None:
        self._db, self._fault = db, fault
        fault.connections.append(db)

    def _tick(self) -> None:
        self._fault.tick()

    def execute(self, *args: Any) -> Any:
        self._tick()
        return self._db.execute(*args)

    def executemany(self, *args: Any) -> Any:
        self._tick()
        return self._db.executemany(*args)

    def close(self) -> None:
        self._db.close()


@pytest.fixture
def fault(monkeypatch: pytest.MonkeyPatch) -> Iterator[Fault]:
    """Every connection the spool opens counts down one shared budget of statements."""
    fault = Fault()
    real = spool._connect
    monkeypatch.setattr(spool, "_connect", lambda *a, **k: _Dying(real(*a, **k), fault))
    yield fault
    fault.crash()


RIDS = st.integers(0, 2)
KEYS = st.sampled_from("ab")


class SpoolModel(RuleBasedStateMachine):
    """Puts, takes, acks, orderly restarts and kills at any statement, against a model.

    `latest` is the newest value accepted per (request ID, key); `server` applies every POST
    as the API does (replacing keys). Each process uses request IDs of its own, as real ones
    do. At the end, after adopting and delivering everything, the server holds `latest`; and
    no POST ever replaced a value with an older one (values are increasing numbers).
    """

    fault: Fault

    def __init__(self) -> None:
        super().__init__()
        # In memory where there is a tmpfs: the model makes thousands of files.
        self.dir = tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        self.clock = Clock()
        self.generation = 0
        self.q = self._start()
        self.counter = 0
        self.latest: dict[tuple[int, str], int] = {}
        self.server: dict[Any, dict[str, str]] = {}
        self.taken: list[Entry] = []

    def _start(self) -> SpoolQueue:
        q = SpoolQueue(self.dir, 3, 3, 60.0, stats=Stats(), clock=self.clock, park_s=5.0)
        self.generation += 1
        return q

    def _post(self, metadata: dict[str, str], rid: Any) -> None:
        have = self.server.setdefault(rid, {})
        for key, value in metadata.items():
            assert int(value) >= int(have.get(key, "0")), "an older value replaced a newer one"
        have.update(metadata)

    def _crashed(self, landed: list[bool]) -> None:
        """Our process died: POSTs in flight may have landed; the next one starts and adopts."""
        for entry, lands in zip(self.taken, landed, strict=False):  # the rest: not landed
            if lands:
                self._post(entry.metadata, entry.request_id)
        die(self.q)
        self.fault.crash()
        self.q = self._start()
        self.taken = []
        self.q.adopt()

    @rule(rid=RIDS, key=KEYS)
    def put(self, rid: int, key: str) -> None:
        self.counter += 1
        rid += 10 * self.generation
        if self.q.put(rid, {key: str(self.counter)}):
            self.latest[(rid, key)] = self.counter

    @rule()
    def take(self) -> None:
        self.taken.extend(take_all(self.q))

    @precondition(lambda self: self.taken)
    @rule(data=st.data(), outcome=st.sampled_from(["delivered", "kept"]))
    def ack(self, data: st.DataObject, outcome: str) -> None:
        entry = self.taken.pop(data.draw(st.integers(0, len(self.taken) - 1)))
        if outcome == "delivered":
            self._post(entry.metadata, entry.request_id)
        self.q.ack(entry, outcome == "delivered", _nothing, keep=outcome == "kept")

    @rule()
    def time_passes(self) -> None:
        self.clock.now += 6  # parked rows are due again
        self.q.adopt()

    @rule(landed=st.lists(st.booleans(), min_size=8, max_size=8))
    def kill(self, landed: list[bool]) -> None:
        self._crashed(landed)

    @rule(landed=st.lists(st.booleans(), min_size=8, max_size=8))
    def restart(self, landed: list[bool]) -> None:
        self.q.close(keep=True)
        self._crashed(landed)

    @rule(at=st.integers(1, 4), op=st.sampled_from(["put", "ack", "adopt"]), rid=RIDS,
          landed=st.lists(st.booleans(), min_size=8, max_size=8))
    def kill_inside(self, at: int, op: str, rid: int, landed: list[bool]) -> None:
        """Die at the `at`-th statement of one operation: a put that dies never returned, so
        its value is not expected (nor forbidden: it may have been committed)."""
        self.fault.countdown = at
        try:
            if op == "put":
                self.counter += 1
                if self.q.put(rid + 10 * self.generation, {"a": str(self.counter)}):
                    self.latest[(rid + 10 * self.generation, "a")] = self.counter
            elif op == "ack" and self.taken:
                entry = self.taken.pop()
                self._post(entry.metadata, entry.request_id)  # it landed; the delete may not
                self.q.ack(entry, True, _nothing)
            else:
                self.q.adopt()
        except _Killed:
            self._crashed(landed)
        self.fault.countdown = -1

    @invariant()
    def every_value_not_delivered_is_on_disk(self) -> None:
        on_disk: dict[tuple[Any, str], int] = {}
        for name in os.listdir(self.dir):
            if name.endswith(spool.SUFFIX):
                for rid, (md, _) in rows(os.path.join(self.dir, name)).items():
                    for key, value in md.items():
                        on_disk[(rid, key)] = max(int(value), on_disk.get((rid, key), 0))
        for (rid, key), value in self.latest.items():
            delivered = int(self.server.get(rid, {}).get(key, "0"))
            assert max(delivered, on_disk.get((rid, key), 0)) >= value, (rid, key)

    def teardown(self) -> None:
        try:
            for entry in self.taken:  # the POSTs in flight land
                self._post(entry.metadata, entry.request_id)
                self.q.ack(entry, True, _nothing)
            deliver_all(self.q, self.server)
            self.q.close(keep=True)
            got = {(rid, k): int(v) for rid, md in self.server.items() for k, v in md.items()}
            for pair, value in self.latest.items():
                assert got.get(pair, 0) >= value, f"{pair}: put {value}, got {got.get(pair)}"
            assert spool.records_left(self.dir) == (0, 0)
        finally:
            self.fault.crash()
            shutil.rmtree(self.dir, ignore_errors=True)


def test_random_operations_and_crashes_never_lose_a_record_nor_let_an_older_value_win(
    fault: Fault, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR)
    SpoolModel.fault = fault
    run = SpoolModel.TestCase
    run.settings = settings(max_examples=300, stateful_step_count=20, deadline=None)
    run().runTest()
