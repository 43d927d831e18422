"""Self-metrics: what they cost, with no meter provider, the no-op one, and the SDK's.

Counting stays `Stats.add` alone whatever the provider: the counters are observable, read from
the `Stats` snapshot when a reader collects. So the figures are: `Stats.add` (the only cost per
count, with or without metrics), `Metrics.posted` (once per POST, on a sender thread) with no
meter provider configured (the API's proxy), the no-op provider and the SDK's, and one
collection by the SDK's `InMemoryMetricReader` (every 60 s with the periodic reader). Best of
5 repetitions of `timeit`, in ns per call, the call's own loop included.
"""

from __future__ import annotations

import sys
import timeit
from collections.abc import Callable
from typing import Any

from _common import clean_environment, emit, machine, parser
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from otel_metadata.metrics import Metrics
from otel_metadata.stats import Stats


def ns_per_call(fn: Callable[[], object], calls: int) -> float:
    return min(timeit.repeat(fn, number=calls, repeat=5)) / calls * 1e9


def measure(calls: int) -> dict[str, Any]:
    clean_environment()
    stats = Stats()
    reader = InMemoryMetricReader()
    sdk = MeterProvider(metric_readers=[reader])
    posted = {
        # Built first: nothing has set a global meter provider in this process.
        "no provider (API proxy)": Metrics(stats.snapshot, queue_size=lambda: 0),
        "no-op provider": Metrics(stats.snapshot, meter_provider=NoOpMeterProvider()),
        "SDK provider": Metrics(stats.snapshot, queue_size=lambda: 0, handoff_size=lambda: 0,
                                handoff_capacity=16_384, meter_provider=sdk),
    }
    out: dict[str, Any] = {"stats_add_ns": ns_per_call(lambda: stats.add("queued"), calls)}
    out["posted_ns"] = {name: ns_per_call(lambda m=m: m.posted(0.05, 200), calls)
                        for name, m in posted.items()}
    out["collect_us"] = ns_per_call(reader.get_metrics_data, 200) / 1000
    sdk.shutdown()
    return out


def report(res: dict[str, Any]) -> str:
    lines = ["self-metrics cost (ns per call, best of 5; timeit loop included)",
             f"  Stats.add, the only cost per count with or without metrics  "
             f"{res['stats_add_ns']:7.0f} ns"]
    lines += [f"  Metrics.posted, once per POST, {name:<27} {ns:7.0f} ns"
              for name, ns in res["posted_ns"].items()]
    lines.append(f"  one collection by the SDK reader (all our instruments)     "
                 f"{res['collect_us']:7.1f} µs")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=200_000)
    args = p.parse_args(argv)
    res = measure(args.calls)
    print(report(res), flush=True)
    emit({"machine": machine(), **res}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
