"""`otel-metadata drain --spool-dir DIR`: deliver what dead processes left in a spool (SPEC §9).

Adopts every file in the directory whose owner is dead, delivers its records with the settings
of the environment (key, base URL, timeouts), and exits 0 only when all of them were delivered
and nothing is left behind. Files of live processes are not touched; what could not be delivered
stays in the directory for the next drain or start. Run it after a crash when no process will
start again on that directory, or before deleting a host's spool directory.
"""

from __future__ import annotations

import os
import time
from typing import TextIO

from . import config
from .delivery import Delivery
from .spool import SpoolQueue, records_left
from .stats import Stats
from .transport import Transport


def run(out: TextIO, spool_dir: str, timeout: float) -> int:
    """Drain `spool_dir` within `timeout` seconds; 0 when everything was delivered, else 1
    (2 when it cannot start: no key, no such directory)."""
    settings = config.resolve()
    if settings.api_key is None:
        print(f"no PromptLayer API key: set {config.ENV_API_KEY}", file=out)
        return 2
    if not os.path.isdir(spool_dir):
        print(f"no such directory: {spool_dir}", file=out)
        return 2
    stats = Stats()
    store = SpoolQueue(spool_dir, settings.max_queue_size, settings.max_export_batch_size, 0.0,
                       stats=stats, synchronous=settings.spool_sync)
    if not store.durable:
        print(f"cannot write in {spool_dir}: nothing was adopted", file=out)
        return 1
    delivery = Delivery(store, Transport(settings.endpoint, settings.api_key,
                                         settings.max_concurrency, stats), settings, stats)
    deadline = time.monotonic() + timeout
    ok = True
    try:
        # Each flush adopts what the queue has room for, and delivers it before the next.
        while ok:
            before = stats.snapshot().get("adopted", 0)
            ok = delivery.force_flush(max(0.0, deadline - time.monotonic()))
            if stats.snapshot().get("adopted", 0) == before:
                break
    finally:
        delivery.shutdown(max(0.0, deadline - time.monotonic()))  # the rest stays on disk
    left, live = records_left(spool_dir)
    counts = stats.snapshot()
    print(f"adopted {counts.get('adopted', 0)}, delivered {counts['delivered']}, left "
          f"{left} in the spool; {live} file(s) of live processes not touched", file=out)
    trouble = {k: v for k, v in counts.items()
               if v and k.startswith(("dropped.", "rejected.", "spool_errors"))}
    if trouble:
        print(", ".join(f"{k}={v}" for k, v in sorted(trouble.items())), file=out)
    return 0 if ok and not left and not trouble else 1
