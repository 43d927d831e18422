"""Coalescing: 10 000 metadata updates spread over 500 request IDs -> how many POSTs.

Each update is a trace: a handler span with `user.id` and an LLM child span carrying one of 500
request IDs (round robin) and ``promptlayer.metadata.step=<n>``. Defaults throughout. We count
the POSTs the local server received, and check that every ID ends with its latest step. The
baseline is one POST per update (10 000), as with a blocking `track.metadata` call per update.
Two schedules: one flush at the end, and a flush after every 2 000 updates (5 flushes).
"""

from __future__ import annotations

import sys
from typing import Any

from _common import (
    API_KEY,
    clean_environment,
    emit,
    local_server,
    machine,
    median,
    parser,
    verdict,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind

from otel_metadata import MetadataSpanProcessor

UPDATES = 10_000
IDS = 500
TARGET_PER_ID_PER_FLUSH = 1.0


def run(base_url: str, flush_every: int, base: int) -> dict[str, Any]:
    processor = MetadataSpanProcessor(api_key=API_KEY, base_url=base_url)
    provider = TracerProvider(resource=Resource.create({"service.name": "bench-app"}))
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("bench")
    flushes, flush_ok = 0, True
    for n in range(UPDATES):
        with tracer.start_as_current_span("POST /v1/chat", kind=SpanKind.SERVER,
                                          attributes={"user.id": f"user-{n % IDS}"}), \
                tracer.start_as_current_span(
                    "chat gpt-4o-mini", kind=SpanKind.CLIENT,
                    attributes={"promptlayer.request_id": base + n % IDS,
                                "promptlayer.metadata.step": str(n)}):
            pass
        if (n + 1) % flush_every == 0:
            flush_ok &= processor.force_flush(30_000)
            flushes += 1
    stats = processor.stats()
    provider.shutdown()
    return {"flushes": flushes, "flush_ok": flush_ok, "queued": stats.get("queued", 0)}


def _latest(base: int) -> dict[int, dict[str, str]]:
    latest: dict[int, dict[str, str]] = {}
    for n in range(UPDATES):
        latest[base + n % IDS] = {"user_id": f"user-{n % IDS}", "step": str(n)}
    return latest


def measure(reps: int) -> dict[str, Any]:
    clean_environment()
    schedules: dict[str, dict[str, Any]] = {}
    with local_server() as server:
        base = 5_000_000
        for name, every in (("one flush at the end", UPDATES), ("a flush every 2 000", 2_000)):
            runs = []
            for _ in range(reps):
                r = run(server.base_url, every, base)
                got = server.report()
                r["posts"] = got["posts"]
                r["statuses"] = got["statuses"]
                r["latest_wins"] = {rid: md for rid, md in got["metadata"]} == _latest(base)
                runs.append(r)
                base += IDS
            posts = median([r["posts"] for r in runs])
            flushes = runs[0]["flushes"]
            schedules[name] = {
                "flushes": flushes,
                "posts": posts,
                "per_id_per_flush": posts / (IDS * flushes),
                "reduction": UPDATES / posts,
                "runs": runs,
                "correct": all(r["latest_wins"] and r["flush_ok"] and
                               r["statuses"] == {"200": r["posts"]} for r in runs),
            }
    return {"updates": UPDATES, "ids": IDS, "reps": reps, "schedules": schedules}


def report(res: dict[str, Any]) -> str:
    lines = [f"coalescing: {res['updates']} updates over {res['ids']} request IDs; baseline one "
             f"POST per update ({res['updates']}); median of {res['reps']} repetitions"]
    for name, s in res["schedules"].items():
        ok = s["per_id_per_flush"] <= TARGET_PER_ID_PER_FLUSH and s["correct"]
        lines.append(
            f"  {name + ':':24s} {s['posts']:6.0f} POSTs = {s['per_id_per_flush']:.2f} per ID per "
            f"flush ({s['flushes']} flush{'es' if s['flushes'] > 1 else ''}), "
            f"{s['reduction']:.0f}x fewer than the baseline  (target <= 1)  {verdict(ok)}; "
            f"latest value won for every ID: {s['correct']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    res = measure(args.reps)
    res["machine"] = machine()
    print(report(res))
    emit(res, args.json)
    return 0 if all(s["correct"] for s in res["schedules"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
