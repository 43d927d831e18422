"""A traced app for the crash tests: request spans through a MetadataSpanProcessor with a spool.

    crash_app.py SPOOL_DIR BASE_URL COUNT DELAY_MS send     # two rounds of COUNT requests
    crash_app.py SPOOL_DIR BASE_URL COUNT DELAY_MS hold     # COUNT requests under an open root
    crash_app.py SPOOL_DIR BASE_URL 0 DELAY_MS restart      # only adopt and deliver

`send`: each request ID 0..COUNT-1 gets a span in round 1, then another in round 2 (an update
of the same ID: `round` goes from 1 to 2, `r1` and `r2` are set once); after each round, once
the processor has queued every record (each on disk then), it prints ``round N``. Then it waits
to be killed. `hold`: the same final values in one span per request ID, all inside one root
span that never ends (its trace stays held: `max_trace_wait` is 2 minutes); it prints ``held``
once the worker joined every one. With CRASH_AFTER_ADOPTED=K in the environment, the process
kills itself (SIGKILL) right after the K-th record it adopted was committed to its own file.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

from opentelemetry.sdk.trace import TracerProvider

from otel_metadata import MetadataSpanProcessor, RetryPolicy, set_request_id, spool

API_KEY = "pl-test-key-0123456789"  # conftest's


def _die_after_adopting(count: int) -> None:
    real = spool.SpoolQueue._store
    adopted = [0]

    def store(self: spool.SpoolQueue, request_id: Any, metadata: Any) -> bool:
        out = real(self, request_id, metadata)
        if isinstance(metadata, spool._Under):
            adopted[0] += 1
            if adopted[0] == count:
                os.kill(os.getpid(), signal.SIGKILL)
        return out

    spool.SpoolQueue._store = store  # type: ignore[method-assign]


def main() -> None:
    spool_dir, base_url, count, delay_ms, mode = sys.argv[1:6]
    if os.environ.get("CRASH_AFTER_ADOPTED"):
        _die_after_adopting(int(os.environ["CRASH_AFTER_ADOPTED"]))
    processor = MetadataSpanProcessor(
        api_key=API_KEY, base_url=base_url, spool_dir=spool_dir,
        schedule_delay_millis=float(delay_ms), export_timeout_millis=120_000,
        max_concurrency=4, request_timeout_s=60, max_trace_wait_millis=120_000,
        retry=RetryPolicy(initial_backoff=0.05, max_backoff=0.2))
    provider = TracerProvider()
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("crash-app")
    if mode == "send":
        for round_ in (1, 2):
            for rid in range(int(count)):
                with tracer.start_as_current_span("llm") as span:
                    span.set_attributes({"promptlayer.metadata.round": str(round_),
                                         f"promptlayer.metadata.r{round_}": "x"})
                    set_request_id(rid)
            while processor.stats()["queued"] < round_ * int(count):
                time.sleep(0.01)
            print(f"round {round_}", flush=True)
    elif mode == "hold":
        with tracer.start_as_current_span("GET /batch") as root:
            root.set_attribute("user.id", "never known: the root never ends")
            for rid in range(int(count)):
                with tracer.start_as_current_span("llm") as span:
                    span.set_attributes({"promptlayer.metadata.round": "2",
                                         "promptlayer.metadata.r1": "x",
                                         "promptlayer.metadata.r2": "x"})
                    set_request_id(rid)
            while processor.stats()["backlog"] or processor.stats()["held_traces"] != 1:
                time.sleep(0.01)
            print("held", flush=True)
            while True:  # killed with the root still open
                time.sleep(1)
    print("ready", flush=True)
    while True:  # the worker adopts and the senders deliver; the test kills us
        time.sleep(1)


if __name__ == "__main__":
    main()
