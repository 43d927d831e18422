"""Self-metrics (SPEC §11) read back through the real SDK's InMemoryMetricReader."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

import pytest
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from otel_metadata.metrics import Metrics
from otel_metadata.stats import STANDARD_COUNTERS, Stats

# Every attribute any of our data points may carry: all have a handful of values.
LOW_CARDINALITY = {"otel.component.type", "otel.component.name", "error.type",
                   "http.response.status_code", "otel_metadata.key"}


def collect(reader: InMemoryMetricReader) -> dict[str, dict[str, Any]]:
    """name -> {"unit": ..., "points": [(attributes, value or (count, sum))]}."""
    out: dict[str, dict[str, Any]] = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else []:
        for sm in rm.scope_metrics:
            assert sm.scope.name == "otel_metadata"
            for metric in sm.metrics:
                out[metric.name] = {"unit": metric.unit, "points": [
                    (dict(p.attributes), getattr(p, "value", None)
                     if not hasattr(p, "bucket_counts") else (p.count, p.sum))
                    for p in metric.data.data_points]}
    return out


def values(metrics: dict[str, dict[str, Any]], name: str, component: str,
           by: str | None = None) -> Any:
    """One component's value of `name`, or its values keyed by attribute `by`."""
    points = [(a, v) for a, v in metrics[name]["points"] if a["otel.component.name"] == component]
    if by is None:
        [(_, value)] = points
        return value
    return {a[by]: v for a, v in points}


@pytest.fixture
def reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture
def provider(reader: InMemoryMetricReader):
    provider = MeterProvider(metric_readers=[reader])
    yield provider
    provider.shutdown()


def test_counts_sizes_and_post_durations_under_convention_names(provider, reader) -> None:
    stats = Stats()
    queue = [3]
    m = Metrics(stats.snapshot, queue_size=lambda: queue[0], handoff_size=lambda: 7,
                handoff_capacity=16_384, meter_provider=provider)
    me = m.attributes["otel.component.name"]
    assert me.startswith("otel_metadata_span_processor/")
    for name, n in [("queued", 5), ("delivered", 3), ("retried", 2), ("dropped.queue_full", 1),
                    ("dropped.backlog", 4), ("missing.user_id", 2), ("posts", 9),
                    ("truncated_values", 1)]:
        stats.add(name, n)
    m.posted(0.02, 200)
    m.posted(0.04, 200)
    m.posted(0.5, 503)
    m.posted(1.0, None, "ReadTimeout")

    got = collect(reader)
    assert values(got, "otel_metadata.record.queued", me) == 5
    assert values(got, "otel_metadata.record.delivered", me) == 3
    assert values(got, "otel_metadata.record.retried", me) == 2
    dropped = values(got, "otel_metadata.record.dropped", me, by="error.type")
    # Every standard reason is reported, at zero until it happens, so alerts need no guessing.
    assert dropped == {**{c.split(".", 1)[1]: 0 for c in STANDARD_COUNTERS
                          if c.startswith("dropped.")}, "queue_full": 1, "backlog": 4}
    assert values(got, "otel_metadata.record.missing_key", me, by="otel_metadata.key") == {
        "user_id": 2}
    assert values(got, "otel.sdk.processor.span.queue.size", me) == 7
    assert values(got, "otel.sdk.processor.span.queue.capacity", me) == 16_384
    assert values(got, "otel_metadata.queue.size", me) == 3
    assert got["otel_metadata.record.queued"]["unit"] == "{record}"
    assert got["otel.sdk.processor.span.queue.size"]["unit"] == "{span}"

    durations = got["otel_metadata.post.duration"]
    assert durations["unit"] == "s"
    by_outcome = {(a.get("http.response.status_code"), a.get("error.type")): v
                  for a, v in durations["points"]}
    assert by_outcome == {(200, None): (2, pytest.approx(0.06)), (503, "503"): (1, 0.5),
                          (None, "ReadTimeout"): (1, 1.0)}
    # Later counts and sizes are read at the next collection: nothing was forwarded one by one.
    stats.add("delivered", 2)
    queue[0] = 0
    again = collect(reader)
    assert values(again, "otel_metadata.record.delivered", me) == 5
    assert values(again, "otel_metadata.queue.size", me) == 0
    attributes = {k for metric in again.values() for a, _ in metric["points"] for k in a}
    assert attributes <= LOW_CARDINALITY


def test_two_pipelines_report_side_by_side_and_a_closed_one_stops(provider, reader) -> None:
    first, second = Stats(), Stats()
    a = Metrics(first.snapshot, meter_provider=provider)
    b = Metrics(second.snapshot, meter_provider=provider)
    first.add("queued", 1)
    second.add("queued", 2)
    a.posted(0.1, 200)
    b.posted(0.2, 200)
    got = collect(reader)
    names = (a.attributes["otel.component.name"], b.attributes["otel.component.name"])
    assert names[0] != names[1]
    assert values(got, "otel_metadata.record.queued", names[0]) == 1
    assert values(got, "otel_metadata.record.queued", names[1]) == 2
    b.close()
    got = collect(reader)
    assert [a["otel.component.name"] for a, _ in
            got["otel_metadata.record.queued"]["points"]] == [names[0]]
    # Sizes not given are not reported at all, rather than as zero.
    assert "otel_metadata.queue.size" not in got


def test_the_no_op_meter_provider_gets_nothing_and_costs_no_lookup() -> None:
    m = Metrics(Stats().snapshot, queue_size=lambda: 1, meter_provider=NoOpMeterProvider())
    m.posted(0.1, 200)
    assert m.posted.__name__ == "_nothing"  # bound to a function that does nothing at all
    m.close()


def test_a_failing_record_never_reaches_the_caller(provider, reader) -> None:
    m = Metrics(Stats().snapshot, meter_provider=provider)
    m.posted("not a number", 200)  # type: ignore[arg-type]  # the SDK raises on it
    m.posted(0.1, 200)
    assert values(collect(reader), "otel_metadata.post.duration",
                  m.attributes["otel.component.name"])[0] == 1


LATE_GLOBAL = textwrap.dedent("""
    import json
    from opentelemetry import metrics
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from otel_metadata.metrics import Metrics
    from otel_metadata.stats import Stats

    stats = Stats()
    m = Metrics(stats.snapshot, queue_size=lambda: 4)   # no meter provider yet: the API's proxy
    stats.add("queued", 3)
    m.posted(0.1, 200)                                   # before any provider: nowhere to go
    reader = InMemoryMetricReader()
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    stats.add("queued", 1)
    m.posted(0.2, 200)
    out = {}
    for rm in reader.get_metrics_data().resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                p = metric.data.data_points[0]
                out[metric.name] = getattr(p, "value", None) if not hasattr(p, "count") \\
                    else [p.count, p.sum]
    print(json.dumps(out))
""")


def test_a_global_meter_provider_set_later_gets_every_count() -> None:
    """Set once per process, so in a fresh interpreter: a pipeline built before the app sets
    its meter provider (the usual import order) still reports, counts since the start."""
    done = subprocess.run([sys.executable, "-c", LATE_GLOBAL], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert got["otel_metadata.record.queued"] == 4
    assert got["otel_metadata.queue.size"] == 4
    assert got["otel_metadata.post.duration"] == [1, pytest.approx(0.2)]


def test_the_processor_reports_what_its_pipeline_does(make_pipeline, server, reader) -> None:
    """End to end: a real processor given `meter_provider=` reports its records and POSTs."""
    from conftest import send

    p = make_pipeline(meter_provider=MeterProvider(metric_readers=[reader]),
                      required_keys=["tenant"])
    for rid in (1, 2):
        send(p, rid, {"step": "one"})
    assert p.flush()
    got = collect(reader)
    component = next(a["otel.component.name"] for a, _ in got["otel_metadata.record.queued"]
                     ["points"])
    assert values(got, "otel_metadata.record.queued", component) == 2
    assert values(got, "otel_metadata.record.delivered", component) == 2
    assert values(got, "otel_metadata.record.missing_key", component,
                  by="otel_metadata.key") == {"tenant": 2}
    (attributes, (count, _)), = got["otel_metadata.post.duration"]["points"]
    assert count == 2 and attributes["http.response.status_code"] == 200
    for name in got:
        for attributes, _ in got[name]["points"]:
            assert set(attributes) <= LOW_CARDINALITY
    p.processor.shutdown()
