"""gunicorn server hooks for the signal tests: each worker says it is ready to be stopped.

A worker that gets SIGTERM before it has set its own signal handlers still runs the master's
(inherited across the fork), which only queues the signal for a master loop the worker does
not run: it then serves on until the master's graceful timeout. So the tests send SIGTERM only
once every worker is past that point, told by a file named for its pid in $WORKERS_READY_DIR.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def post_worker_init(worker: Any) -> None:
    ready = os.environ.get("WORKERS_READY_DIR")
    if ready:
        Path(ready, str(worker.pid)).touch()
