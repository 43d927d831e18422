"""After os.fork() (gunicorn, multiprocessing): the child delivers its own records with a fresh
worker, session and lock; the parent still delivers what it had queued before the fork."""

from __future__ import annotations

import json
import multiprocessing
import os
from typing import Any

import pytest
from conftest import Pipeline, send

from otel_metadata.testing.track_metadata import TrackMetadataServer

# Long enough that records queued before a fork are still queued when it happens.
HOLD = {"schedule_delay_millis": 60_000}


def _child_run(p: Pipeline, request_ids: range) -> dict[str, Any]:
    """What a child does: record its own requests, flush, report."""
    for rid in request_ids:
        send(p, rid, {"from": "child"})
    return {"flushed": p.flush(10_000), "stats": p.processor.stats()}


@pytest.mark.parametrize("hook", ["register_at_fork", "pid check"])
def test_os_fork_child_delivers_its_own_and_parent_keeps_its_queue(
    server: TrackMetadataServer, make_pipeline: Any, hook: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    if hook == "pid check":  # as on a platform without os.register_at_fork
        monkeypatch.delattr(os, "register_at_fork")
    p = make_pipeline(**HOLD)
    for rid in range(5):
        send(p, rid, {"from": "parent"})
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        try:
            os.close(read_end)
            os.write(write_end, json.dumps(_child_run(p, range(100, 105))).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        child = json.loads(pipe.read() or "null")
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert child is not None, "the child failed before reporting"
    assert child["flushed"] is True
    # The child's counts are its own: the parent's five records are not in them.
    assert (child["stats"]["queued"], child["stats"]["delivered"]) == (5, 5)

    assert p.flush() is True
    assert server.metadata == {**{rid: {"from": "parent"} for rid in range(5)},
                               **{rid: {"from": "child"} for rid in range(100, 105)}}
    # Each record was posted once: the child did not deliver the queue it inherited.
    assert sorted(post.request_id for post in server.accepted()) == [*range(5), *range(100, 105)]
    assert (p.processor.stats()["queued"], p.processor.stats()["delivered"]) == (5, 5)


# multiprocessing pickles the target by name: the pipeline is found through this module.
_inherited: dict[str, Pipeline] = {}


def _worker(request_id: int) -> tuple[bool, int]:
    result = _child_run(_inherited["pipeline"], range(request_id, request_id + 1))
    return result["flushed"], os.getpid()


def test_multiprocessing_fork_workers_deliver_and_parent_keeps_its_queue(
    server: TrackMetadataServer, make_pipeline: Any,
) -> None:
    p = make_pipeline(**HOLD)
    for rid in range(3):
        send(p, rid, {"from": "parent"})
    _inherited["pipeline"] = p
    try:
        with multiprocessing.get_context("fork").Pool(2) as pool:
            results = pool.map(_worker, range(200, 210), chunksize=1)
    finally:
        _inherited.clear()
    assert all(flushed for flushed, _ in results)
    assert os.getpid() not in {pid for _, pid in results}

    assert p.flush() is True
    assert server.metadata == {**{rid: {"from": "parent"} for rid in range(3)},
                               **{rid: {"from": "child"} for rid in range(200, 210)}}
    assert sorted(post.request_id for post in server.accepted()) == [*range(3), *range(200, 210)]
