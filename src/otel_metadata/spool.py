"""The durable spool: the record queue backed by one SQLite file per process (SPEC §7a).

`SpoolQueue` is a `RecordQueue` (same coalescing, due times and flush bookkeeping) that writes
every record to its own file in `spool_dir` before `put` accepts it, in WAL mode. Each file
holds one row per request ID: the newest value of every key not yet settled, and the version
of its newest update (`Entry.last_seq`). `ack` deletes the row only when no newer update came
in since the POST was taken (an older POST settling never removes newer values), in the
statement that records it; an ack with `keep` (retries ran out, the key was rejected) parks the
row instead, and `adopt` queues parked rows again after `park_s`. `hold` writes a provisional
row for a request whose trace the lineage join still holds; its `put` completes it.

Beware of locks: `put` runs on the lineage worker, which must never wait for the senders. The
in-memory queue's lock is still only tried, never waited for; what `put` does wait for is our
SQLite connection's lock, `_db_lock`, and everyone (`put`, `ack`, `hold`, adoption) holds it
for one short statement (autocommit: one small transaction) plus O(1) bookkeeping, never
across a POST, a listing of the directory or another file.

A process's file is locked (`flock`) for its whole life. `adopt` takes over files whose lock is
free (their owner died): it queues their rows (committed to our file first, then deleted from
theirs, so a crash in between duplicates and never loses), and removes a dead file once empty.
Adopted values never override what our own file already holds for a key (ours is the newer).
A pipeline adopts at start and then every `adopt_every_s` on a small thread of the spool's
own, and at every `flush` (so a flush covers what dead processes left).

A forked child must not use (nor close) the connection it inherited: every open spool is
disowned in the child right after the fork; the child's pipeline opens a file of its own. And
no thread of ours may be inside SQLite when the process forks: the child would inherit SQLite's
own mutexes locked by a thread it does not have, and its first SQLite call (opening its file)
would hang for ever (a gunicorn ``--preload`` master forking workers while it delivers or
adopts). So a fork waits until each spool's locks are free, and holds them across the fork.

Trouble with the disk (unwritable directory, full disk, corrupt file) never raises: one warning,
our file is set aside (renamed to ``*.aside``) and the queue goes on in memory.

Durability: ``synchronous=NORMAL`` (the default) survives the process dying at any moment
(kill -9, OOM); ``synchronous="FULL"`` also survives power loss, at an fsync per commit.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from urllib.parse import quote

from .config import OPTIONS
from .mapping import RequestId
from .queue import MAX_WAIT_S, Entry, RecordQueue
from .stats import Stats

_logger = logging.getLogger("otel_metadata")

DEFAULT_MAX_SPOOL_BYTES: int = OPTIONS["max_spool_bytes"].default
SUFFIX = ".spool"
ASIDE = ".aside"
# How long a parked row (retries ran out) waits before this process tries it again.
DEFAULT_PARK_S = 60.0
# How often a pipeline's spool adopts what dead processes left.
ADOPT_EVERY_S = 5.0
# A temporary file older than this was left by a process that died while creating it.
_STALE_NEW_S = 60.0
# What a row costs beyond its request ID and metadata text (SQLite's record and b-tree cells).
_ROW_OVERHEAD = 32
_FORMAT = 1  # PRAGMA user_version of the files we write

QUEUED, HELD, PARKED = 0, 1, 2
_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    rid TEXT PRIMARY KEY,     -- json.dumps(request ID): an int stays an int
    md TEXT NOT NULL,         -- JSON object: newest value of every key not yet settled
    seq INTEGER NOT NULL,     -- the owner's sequence number of the newest update (0: held)
    state INTEGER NOT NULL,   -- 0 queued, 1 held (provisional), 2 parked
    parked_at REAL
) WITHOUT ROWID;
"""
_UPSERT = ("INSERT INTO records (rid, md, seq, state) VALUES (?1, ?2, ?3, 0) "
           "ON CONFLICT (rid) DO UPDATE SET md = json_patch(md, excluded.md), "
           "seq = excluded.seq, state = 0 RETURNING length(md)")
# An adopted record: what our own row already holds wins (it is the newer).
_UPSERT_UNDER = _UPSERT.replace("json_patch(md, excluded.md)", "json_patch(excluded.md, md)")
_HOLD = ("INSERT INTO records (rid, md, seq, state) VALUES (?1, ?2, 0, 1) "
         "ON CONFLICT (rid) DO UPDATE SET md = json_patch(md, excluded.md) WHERE state = 1 "
         "RETURNING length(md)")

# Connections a forked child inherited: never closed there (closing could checkpoint and
# remove the parent's WAL), never collected.
_INHERITED: list[object] = []
# Every spool with a file open in this process, to disown in a forked child.
_OPEN: weakref.WeakSet[SpoolQueue] = weakref.WeakSet()
# Held while a spool opens its file, so a fork waits for that too.
_OPENING = threading.Lock()
# The locks a fork holds from just before it until just after, in both processes.
_HELD_ACROSS_FORK: list[threading.Lock] = []
# How long a fork waits for one of them (an adoption moving a large dead file holds one a while);
# past that, it forks anyway rather than never.
_FORK_WAIT_S = 10.0


class _Under(dict[str, str]):
    """Metadata that lies under what our file holds: taken over from a dead process's file,
    or the keys of a failed POST whose request ID got a newer update since."""


class SpoolQueue(RecordQueue):
    """A `RecordQueue` whose records are on disk before `put` accepts them (SPEC §7a).

    Bounded by `max_size` request IDs in the queue, as in memory, and by `max_spool_bytes`
    on disk; past either, the newest record is refused (counted ``spool_full`` when the bytes
    were the reason). `adopt_every_s`: adopt on a thread of its own that often (None: only when
    `adopt` or `flush` is called).
    """

    def __init__(
        self,
        spool_dir: str,
        max_size: int,
        max_batch: int,
        delay_s: float,
        *,
        stats: Stats,
        max_spool_bytes: int = DEFAULT_MAX_SPOOL_BYTES,
        synchronous: str = "NORMAL",
        park_s: float = DEFAULT_PARK_S,
        adopt_every_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(max_size, max_batch, delay_s, clock)
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError("synchronous must be 'NORMAL' or 'FULL'")
        self._dir = spool_dir
        self._stats = stats
        self._max_bytes = max_spool_bytes
        self._sync = synchronous
        self._park_s = park_s
        # Our connection and what our file holds (below). `put` waits for it: nobody holds it
        # for more than one short statement (one small transaction) and O(1) work.
        self._db_lock = threading.Lock()
        self._version = 0  # of the last update written: `Entry.last_seq`
        self._adopting = threading.Lock()  # one adoption at a time (the timer's, a flush's)
        self._stopped = threading.Event()
        self._open()
        _OPEN.add(self)
        if adopt_every_s is not None and self._db is not None:
            timer = threading.Thread(target=self._adopt_every, args=(adopt_every_s,),
                                     name="otel-metadata-spool", daemon=True)
            with contextlib.suppress(RuntimeError):  # no threads at exit: flushes still adopt
                timer.start()

    # -- our own file --

    def _open(self) -> None:
        """Create, lock and open a fresh file; on any trouble, warn once and stay in memory."""
        self._db: sqlite3.Connection | None = None
        self._lock_fd = -1
        self.path = ""
        self._sizes: dict[str, int] = {}  # row key -> bytes it takes (every row of our file)
        self._offline: set[str] = set()  # rows held or parked: on disk, not in the queue
        self._bytes = 0
        with _OPENING:
            self._open_file()

    def _open_file(self) -> None:
        name = f"spool-{os.getpid()}-{secrets.token_hex(6)}"
        # Locked under a name adopters skip, then renamed: nobody can take a new file for dead.
        tmp = os.path.join(self._dir, f".{name}.new")
        try:
            os.makedirs(self._dir, exist_ok=True)
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            self._lock_fd = fd
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.path = os.path.join(self._dir, name + SUFFIX)
            os.rename(tmp, self.path)
            self._db = _connect(self.path, self._sync, create=True)
        except (OSError, sqlite3.Error) as exc:
            self._give_up(f"could not create a spool file in {self._dir!r}", exc)

    @property
    def durable(self) -> bool:
        """Whether records still go to disk (False after trouble: memory only)."""
        return self._db is not None

    def _give_up(self, what: str, exc: BaseException) -> None:
        """Disk trouble: warn once, set our file aside, go on in memory (inside `_db_lock`)."""
        self._stats.add("spool_errors")
        self._stats.warn_once("spool", "memory", "otel-metadata: %s (%s: %s); the spool is set "
                              "aside and records are kept in memory only from now on", what,
                              type(exc).__name__, exc)
        db, self._db = self._db, None
        if db is not None:
            with contextlib.suppress(sqlite3.Error):
                db.close()
        if self.path:
            _set_aside(self.path)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
        self._sizes.clear()
        self._offline.clear()
        self._bytes = 0

    def _store(self, request_id: RequestId, metadata: dict[str, str]) -> bool:
        """Write the update to our row, then hand it over with its version (under `_db_lock`,
        so the queue folds updates in the order they were written)."""
        with self._db_lock:
            db = self._db
            if db is None:
                return super()._store(request_id, metadata)
            key = json.dumps(request_id)
            body = json.dumps(metadata, separators=(",", ":"))
            if self._bytes + len(key) + len(body) + _ROW_OVERHEAD > self._max_bytes:
                self._stats.add("spool_full")
                self._stats.warn_once("drop", "spool_full", "otel-metadata: the spool holds "
                                      "max_spool_bytes (%d); dropping new records",
                                      self._max_bytes)
                return False
            under = isinstance(metadata, _Under)
            offline = key in self._offline
            version = self._version = self._version + 1
            sql = _UPSERT_UNDER if under else _UPSERT
            try:
                if offline or under:  # the whole row goes to the queue (or what it holds of ours)
                    size, merged = db.execute(sql.replace("length(md)", "length(md), md"),
                                              (key, body, version)).fetchone()
                    row: dict[str, str] = json.loads(merged)
                    metadata = row if offline else {k: row[k] for k in metadata}
                else:
                    size = db.execute(sql, (key, body, version)).fetchone()[0]
            except (OSError, sqlite3.Error) as exc:
                self._give_up("could not write to the spool", exc)
                return super()._store(request_id, metadata)
            self._resize(key, len(key) + size + _ROW_OVERHEAD)
            self._offline.discard(key)
            self._hand((request_id, metadata, version))
            return True

    def _resize(self, key: str, size: int | None) -> None:
        self._bytes += (size or 0) - self._sizes.pop(key, 0)
        if size is not None:
            self._sizes[key] = size

    def ack(self, entry: Entry, delivered: bool, account: Callable[[], None],
            keep: bool = False) -> None:
        """Delete the row (or park it: `keep`) unless a newer update is in it, then settle."""
        again = False
        with self._db_lock:
            db = self._db
            key = json.dumps(entry.request_id)
            try:
                if db is None or entry.abandoned:
                    pass
                elif delivered or not keep:
                    if db.execute("DELETE FROM records WHERE rid = ? AND seq <= ?",
                                  (key, entry.last_seq)).rowcount:
                        self._resize(key, None)
                elif db.execute("UPDATE records SET state = 2, parked_at = ? WHERE rid = ? AND "
                                "seq <= ?", (self._clock(), key, entry.last_seq)).rowcount:
                    self._offline.add(key)
                    self._stats.add("parked")
                else:  # a newer update waits: it must carry the failed keys with it
                    again = key in self._sizes
            except (OSError, sqlite3.Error) as exc:
                self._give_up("could not update the spool", exc)
        if again:
            self._store(entry.request_id, _Under(entry.metadata))
        super().ack(entry, delivered, account, keep)

    def hold(self, request_id: RequestId, metadata: dict[str, str]) -> None:
        """Write a provisional row for a request span the lineage worker just joined.

        Not queued, not due: a later `put` of the same ID completes it (the row's values lie
        under the put's). If the process dies first, the next one to adopt the file delivers
        what was known here. Nothing happens when a row for the ID is queued already.
        """
        if not metadata:
            return
        key = json.dumps(request_id)
        body = json.dumps(metadata, separators=(",", ":"))
        with self._db_lock:
            db = self._db
            if (db is None or self._closed or (key in self._sizes and key not in self._offline)
                    or self._bytes + len(key) + len(body) + _ROW_OVERHEAD > self._max_bytes):
                return
            try:
                row = db.execute(_HOLD, (key, body)).fetchone()
            except (OSError, sqlite3.Error) as exc:
                self._give_up("could not write to the spool", exc)
                return
            if row is not None:
                self._resize(key, len(key) + row[0] + _ROW_OVERHEAD)
                self._offline.add(key)

    # -- adoption --

    def adopt(self) -> int:
        """Queue what dead processes left in the directory, and our parked rows that are due.

        Takes as many records as leave half the queue free for live ones (the rest waits for
        the next call); returns how many it queued. A dead file is deleted once empty; a
        corrupt one is set aside with one warning.
        """
        with self._adopting:
            return self._adopt()

    def _adopt(self) -> int:
        if self._db is None or self._closed:
            return 0
        queued = self._requeue_parked()
        for path in _dead_candidates(self._dir, self.path):
            room = self._room()
            if room <= 0 or self._db is None:
                break
            queued += self._adopt_file(path, room)
        return queued

    def _room(self) -> int:
        return self._max_size // 2 - len(self)

    def _adopt_every(self, every_s: float) -> None:
        """The timer thread: adopt now, then every `every_s` until closed."""
        while True:
            try:
                self.adopt()
            except Exception:  # a bug here must not end adoption for the process's life
                _logger.exception("otel-metadata: adopting spool files failed")
            if self._stopped.wait(every_s):
                return

    def _requeue_parked(self) -> int:
        with self._db_lock:
            if self._db is None or not self._offline:
                return 0
            rows = []
            try:
                rows = self._db.execute(
                    "SELECT rid, md FROM records WHERE state = 2 AND parked_at <= ? LIMIT ?",
                    (self._clock() - self._park_s, max(0, self._room()))).fetchall()
            except (OSError, sqlite3.Error) as exc:
                self._give_up("could not read the spool", exc)
        return sum(self.put(json.loads(key), json.loads(md)) for key, md in rows)

    def _adopt_file(self, path: str, room: int) -> int:
        """Move up to `room` rows of a dead process's file into ours (and into the queue)."""
        with _locked_if_dead(path) as free:
            if not free:
                return 0
            try:
                dead = _connect(path, "NORMAL", create=False)
            except sqlite3.Error as exc:
                self._set_aside_dead(path, exc)
                return 0
            try:
                moved: list[tuple[str, int]] = []
                if _is_ours(dead):
                    rows = dead.execute("SELECT rid, md, seq FROM records ORDER BY seq LIMIT ?",
                                        (room,)).fetchall()
                    for key, md, seq in rows:
                        # Committed to our file (or refused: the queue filled meanwhile).
                        if not self.put(json.loads(key), _Under(json.loads(md))):
                            break
                        if self._db is None:  # our disk failed: this one is in memory only
                            break
                        moved.append((key, seq))
                    dead.execute("BEGIN")
                    dead.executemany("DELETE FROM records WHERE rid = ? AND seq = ?", moved)
                    dead.execute("COMMIT")
                    empty = dead.execute("SELECT 1 FROM records LIMIT 1").fetchone() is None
                else:
                    empty = _is_blank(dead)
                    if not empty:
                        raise sqlite3.DatabaseError("not a spool file of a known format")
                dead.close()
                if empty:
                    _remove(path)
                self._stats.add("adopted", len(moved))
                return len(moved)
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    dead.close()
                self._set_aside_dead(path, exc)
                return 0

    def _set_aside_dead(self, path: str, exc: BaseException) -> None:
        self._stats.add("spool_errors")
        self._stats.warn_once("spool", path, "otel-metadata: could not read the spool file %r "
                              "left by a dead process (%s: %s); set aside as %r", path,
                              type(exc).__name__, exc, path + ASIDE)
        _set_aside(path)

    def flush(self, deadline: float) -> bool:
        """Adopt first (within `deadline`), so the flush covers what dead processes left."""
        if self._adopting.acquire(timeout=min(max(0.0, deadline - self._clock()), MAX_WAIT_S)):
            try:
                self._adopt()
            finally:
                self._adopting.release()
        return super().flush(deadline)

    # -- the end, and forks --

    def close(self, keep: bool = False) -> list[Entry]:
        """Stop. `keep`: what is not settled stays in our file for the next process (none is
        returned; how many rows stayed is counted as ``spooled``); else it is given up and
        returned, as in memory. An empty file is removed."""
        self._stopped.set()
        left = super().close(keep)
        with self._db_lock:
            db, self._db = self._db, None
            _OPEN.discard(self)
            if db is None:  # memory only (disk trouble): nothing could be kept
                return left
            try:
                if not keep:
                    db.execute("DELETE FROM records")
                kept = int(db.execute("SELECT count(*) FROM records").fetchone()[0])
                db.close()
                if not kept:
                    _remove(self.path)
            except (OSError, sqlite3.Error) as exc:
                self._db = db
                self._give_up("could not close the spool", exc)
                return left
            finally:
                if self._lock_fd >= 0:  # the file is anyone's to adopt from now on
                    os.close(self._lock_fd)
                    self._lock_fd = -1
        if not keep:
            return left
        if kept:
            self._stats.add("spooled", kept)
        return []

    def _disown(self) -> None:
        """In a forked child: leave the parent's file alone (never close its connection, which
        could checkpoint and remove the parent's WAL; never hold its lock)."""
        _INHERITED.append(self._db)
        self._db = None
        self._closed = True  # no timer runs here: threads do not survive a fork
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # the parent's descriptor still holds the lock
            self._lock_fd = -1


def _before_fork() -> None:
    """Wait until no thread of ours is inside SQLite, and keep it so until the fork is done
    (every statement we run holds its spool's `_db_lock`, or `_adopting` for dead files)."""
    locks = [_OPENING]
    for store in list(_OPEN):
        locks += (store._adopting, store._db_lock)  # adoption's order: no deadlock with it
    for lock in locks:
        if lock.acquire(timeout=_FORK_WAIT_S):
            _HELD_ACROSS_FORK.append(lock)


def _after_fork_in_parent() -> None:
    while _HELD_ACROSS_FORK:
        _HELD_ACROSS_FORK.pop().release()


def _after_fork_in_child() -> None:
    _after_fork_in_parent()
    for store in list(_OPEN):
        store._disown()
    _OPEN.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                        after_in_child=_after_fork_in_child)


def _connect(path: str, synchronous: str, *, create: bool) -> sqlite3.Connection:
    """Open a spool file (never creating one: `mode=rw`) in WAL mode."""
    db = sqlite3.connect(f"file:{quote(path)}?mode=rw", uri=True, isolation_level=None,
                         check_same_thread=False)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute(f"PRAGMA synchronous = {synchronous}")
        if create:
            db.execute(_SCHEMA)
            db.execute(f"PRAGMA user_version = {_FORMAT}")
    except sqlite3.Error:
        db.close()
        raise
    return db


def _is_ours(db: sqlite3.Connection) -> bool:
    return bool(db.execute("PRAGMA user_version").fetchone()[0] == _FORMAT)


def _is_blank(db: sqlite3.Connection) -> bool:
    """A file its owner died in before it wrote the schema."""
    return bool(db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0)


def _dead_candidates(spool_dir: str, own: str) -> list[str]:
    """Spool files in the directory other than ours, oldest first; stale temporaries removed."""
    try:
        names = os.listdir(spool_dir)
    except OSError:
        return []
    found = []
    for name in names:
        path = os.path.join(spool_dir, name)
        if name.endswith(SUFFIX) and path != own:
            with contextlib.suppress(OSError):
                found.append((os.stat(path).st_mtime, path))
        elif name.startswith(".spool-") and name.endswith(".new"):
            with _locked_if_dead(path) as free:  # a process died while creating it: empty
                with contextlib.suppress(OSError):
                    if free and os.stat(path).st_mtime < time.time() - _STALE_NEW_S:
                        os.unlink(path)
    return [path for _, path in sorted(found)]


@contextlib.contextmanager
def _locked_if_dead(path: str) -> Iterator[bool]:
    """Lock `path` if its owner is gone: yields True while we hold the lock, else False."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False  # its owner lives (or another process is adopting it now)
            return
        # Another adopter may have emptied and removed it while we waited for the name.
        yield os.fstat(fd).st_nlink > 0
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    for suffix in ("-wal", "-shm", ""):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path + suffix)


def _set_aside(path: str) -> None:
    """Rename a file (and its WAL) out of every adopter's way, for a human to look at."""
    for suffix in ("-wal", "-shm", ""):
        with contextlib.suppress(OSError):
            os.rename(path + suffix, path + ASIDE + suffix)


def records_left(spool_dir: str) -> tuple[int, int]:
    """(records in files no live process owns, files a live process owns) in `spool_dir`."""
    left = live = 0
    for path in _dead_candidates(spool_dir, ""):
        with _locked_if_dead(path) as free:
            if not free:
                live += 1
                continue
            try:
                db = _connect(path, "NORMAL", create=False)
                try:
                    if _is_ours(db) or not _is_blank(db):
                        left += db.execute("SELECT count(*) FROM records").fetchone()[0]
                finally:
                    db.close()
            except sqlite3.Error:
                left += 1  # unreadable: something is there that nobody can deliver
    return left, live
