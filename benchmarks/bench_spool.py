"""The durable spool: worker CPU per record with it vs in memory, records/s, bytes on disk.

Three figures, each beside the in-memory queue measured in the same run (median of --reps):
- CPU per record on the worker's side (`put`, the lineage worker's call) and on the senders'
  side (`take` + `ack`), from thread CPU time, for 20 000 records of 5 metadata keys;
- records/s through `Delivery` to the local server (a subprocess), submit to flush;
- bytes on disk per record while they wait (database + WAL file sizes over the record count).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from typing import Any

from _common import API_KEY, clean_environment, emit, local_server, machine, median, parser

from otel_metadata import config
from otel_metadata.delivery import Delivery
from otel_metadata.queue import RecordQueue
from otel_metadata.spool import SpoolQueue
from otel_metadata.stats import Stats
from otel_metadata.transport import Transport

RECORDS = 20_000
DELIVERED = 5_000
METADATA = {"user_id": "user-12345", "conversation_id": "conv-6789abcdef", "tenant": "acme",
            "feature": "chat-summary", "model": "gpt-4o-mini"}


def _store(kind: str, spool_dir: str, size: int) -> RecordQueue:
    if kind == "memory":
        return RecordQueue(size, size, 60.0)
    return SpoolQueue(spool_dir, size, size, 60.0, stats=Stats())


def cpu_per_record(kind: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as spool_dir:
        q = _store(kind, spool_dir, RECORDS)
        t0 = time.thread_time()
        for rid in range(RECORDS):
            q.put(rid, dict(METADATA))
        put_s = time.thread_time() - t0
        on_disk = 0
        if isinstance(q, SpoolQueue):
            on_disk = sum(os.path.getsize(q.path + s) for s in ("", "-wal")
                          if os.path.exists(q.path + s))
        q.flush(0.0)
        t0 = time.thread_time()
        for _ in range(RECORDS):
            entry = q.take()
            assert entry is not None
            q.ack(entry, True, lambda: None)
        settle_s = time.thread_time() - t0
        q.close(keep=True)
    return {"put_us": put_s / RECORDS * 1e6, "take_ack_us": settle_s / RECORDS * 1e6,
            "bytes_per_record": on_disk / RECORDS}


def throughput(kind: str, base_url: str) -> float:
    settings = config.resolve(api_key=API_KEY, base_url=base_url, schedule_delay_millis=10)
    with tempfile.TemporaryDirectory() as spool_dir:
        store = _store(kind, spool_dir, DELIVERED)
        assert settings.api_key is not None
        stats = Stats()
        delivery = Delivery(store, Transport(settings.endpoint, settings.api_key,
                                             settings.max_concurrency, stats), settings, stats)
        t0 = time.perf_counter()
        for rid in range(DELIVERED):
            delivery.submit(rid, dict(METADATA))
        ok = delivery.force_flush(120.0)
        elapsed = time.perf_counter() - t0
        delivery.shutdown(5.0)
    assert ok, "not everything was delivered"
    return DELIVERED / elapsed


def measure(reps: int) -> dict[str, Any]:
    clean_environment()
    out: dict[str, Any] = {"records": RECORDS, "delivered": DELIVERED, "reps": reps}
    with local_server() as server:
        for kind in ("memory", "spool"):
            cpu = [cpu_per_record(kind) for _ in range(reps)]
            out[kind] = {k: median([c[k] for c in cpu]) for k in cpu[0]}
            out[kind]["records_per_s"] = median([throughput(kind, server.base_url)
                                                 for _ in range(reps)])
            server.report()
    return out


def report(res: dict[str, Any]) -> str:
    mem, sp = res["memory"], res["spool"]
    return "\n".join([
        f"spool: {res['records']} records of {len(METADATA)} keys (CPU), {res['delivered']} "
        f"delivered to the local server; median of {res['reps']} repetitions",
        f"  worker CPU per put:        {sp['put_us']:7.1f} us spool vs {mem['put_us']:6.1f} us "
        f"in memory",
        f"  senders' CPU take+ack:     {sp['take_ack_us']:7.1f} us spool vs "
        f"{mem['take_ack_us']:6.1f} us in memory",
        f"  records/s through Delivery: {sp['records_per_s']:6.0f} spool vs "
        f"{mem['records_per_s']:6.0f} in memory",
        f"  bytes on disk per waiting record: {sp['bytes_per_record']:.0f} (database + WAL)",
    ])


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    res = measure(args.reps)
    res["machine"] = machine()
    print(report(res))
    emit(res, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
