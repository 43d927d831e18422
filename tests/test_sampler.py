"""Sampling (SPEC §11): exporters see the sampled fraction, every request still gets metadata."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk._configuration import _import_sampler
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags

from otel_metadata import MetadataSampler
from otel_metadata.sampler import SAMPLER_NAME
from otel_metadata.testing.track_metadata import TrackMetadataServer

TRACES = 1000
RATIO = 0.05


class EvenlySpreadTraceIds(IdGenerator):
    """Trace IDs whose low 64 bits (what the ratio sampler reads) step evenly through their
    range, so exactly RATIO * TRACES of the first TRACES fall below the sampler's bound."""

    def __init__(self) -> None:
        self._next = 0
        self._spans = RandomIdGenerator()

    def generate_span_id(self) -> int:
        return self._spans.generate_span_id()

    def generate_trace_id(self) -> int:
        step = (1 << 64) // TRACES
        low = self._next * step + step // 2  # mid-steps: none lies on the sampler's bound
        self._next += 1
        return (0xABC << 64) | low  # high bits set: never the invalid trace ID 0


def sampled_provider(processor, sampler: Sampler) -> tuple[TracerProvider, InMemorySpanExporter]:
    """A provider with `sampler`, an exporter beside our processor, as a user would set it up."""
    provider = TracerProvider(sampler=sampler, id_generator=EvenlySpreadTraceIds())
    exported = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    provider.add_span_processor(processor)
    return provider, exported


def test_exporter_sees_the_sampled_fraction_and_every_request_gets_metadata(
        server: TrackMetadataServer, make_pipeline) -> None:
    p = make_pipeline()
    provider, exported = sampled_provider(
        p.processor, MetadataSampler(ParentBased(TraceIdRatioBased(RATIO))))
    tracer = provider.get_tracer("app")
    for i in range(TRACES):
        with tracer.start_as_current_span("POST /chat", kind=SpanKind.SERVER,
                                          attributes={"user.id": f"u-{i}"}):
            # The request ID given at start, as instrumentations do: it must survive a drop.
            with tracer.start_as_current_span("chat", kind=SpanKind.CLIENT,
                                              attributes={"promptlayer.request_id": i + 1}):
                pass
    assert p.flush(30_000)
    spans = exported.get_finished_spans()
    assert len(spans) == 2 * int(TRACES * RATIO)  # exactly the sampled traces, both spans each
    assert all(s.context.trace_flags.sampled for s in spans)
    assert server.metadata == {i + 1: {"user_id": f"u-{i}"} for i in range(TRACES)}
    provider.shutdown()


def test_child_of_a_remote_unsampled_parent_is_recorded_not_exported(
        server: TrackMetadataServer, make_pipeline) -> None:
    """An upstream service sampled the trace out (traceparent flags 00): ParentBased drops the
    whole trace here, so without the wrapper its requests would get nothing."""
    p = make_pipeline()
    provider, exported = sampled_provider(p.processor, MetadataSampler(ParentBased(ALWAYS_ON)))
    upstream = SpanContext(trace_id=0x1234, span_id=0x99, is_remote=True,
                           trace_flags=TraceFlags(TraceFlags.DEFAULT))
    parent = trace.set_span_in_context(NonRecordingSpan(upstream))
    tracer = provider.get_tracer("app")
    with tracer.start_as_current_span("handler", context=parent,
                                      attributes={"user.id": "u-remote"}) as handler:
        assert handler.is_recording() and not handler.get_span_context().trace_flags.sampled
        with tracer.start_as_current_span("chat", attributes={"promptlayer.request_id": 77}):
            pass
    assert p.flush()
    assert exported.get_finished_spans() == ()
    assert server.metadata == {77: {"user_id": "u-remote"}}
    provider.shutdown()


def test_wrapper_changes_only_drops() -> None:
    inner = ParentBased(TraceIdRatioBased(RATIO))
    sampler = MetadataSampler(inner)
    ids = EvenlySpreadTraceIds()
    decisions = [sampler.should_sample(None, ids.generate_trace_id(), "s", attributes={"a": 1})
                 for _ in range(TRACES)]
    assert [d.decision for d in decisions] == (
        [Decision.RECORD_AND_SAMPLE] * int(TRACES * RATIO)
        + [Decision.RECORD_ONLY] * (TRACES - int(TRACES * RATIO)))
    assert all(dict(d.attributes) == {"a": 1} for d in decisions)
    assert sampler.sampler is inner
    assert sampler.get_description() == f"MetadataSampler{{{inner.get_description()}}}"


@pytest.mark.parametrize(("arg", "rate", "warned"), [
    ("0.05", 0.05, False), (" 0.25 ", 0.25, False), (None, 1.0, False), ("", 1.0, False),
    ("five percent", 1.0, True), ("1.5", 1.0, True), ("-0.1", 1.0, True), ("nan", 1.0, True),
])
def test_sdk_configurator_loads_the_entry_point_with_the_env_arg(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        arg: str | None, rate: float, warned: bool) -> None:
    """The SDK's own loader (what opentelemetry-instrument and the distro call), by entry point."""
    if arg is None:
        monkeypatch.delenv("OTEL_TRACES_SAMPLER_ARG", raising=False)
    else:
        monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", arg)
    with caplog.at_level(logging.WARNING):
        sampler = _import_sampler(SAMPLER_NAME)
    assert isinstance(sampler, MetadataSampler)
    expected = MetadataSampler(ParentBased(TraceIdRatioBased(rate)))
    assert sampler.get_description() == expected.get_description()
    ours = [r for r in caplog.records if r.name == "otel_metadata"]
    assert [r.levelno for r in ours] == ([logging.WARNING] if warned else [])
    assert caplog.records == ours  # the SDK did not fall back to its default sampler


APP = textwrap.dedent("""
    import json
    from opentelemetry import trace
    tracer = trace.get_tracer("app")
    recorded = sampled = 0
    for _ in range(200):
        with tracer.start_as_current_span("root") as root:
            with tracer.start_as_current_span("child") as child:
                for span in (root, child):
                    recorded += span.is_recording()
                    sampled += span.get_span_context().trace_flags.sampled
    print(json.dumps([trace.get_tracer_provider().sampler.get_description(), recorded,
                      sampled]))
""")


def test_env_vars_alone_give_the_wrapped_sampler_under_opentelemetry_instrument(
        tmp_path: Path) -> None:
    app = tmp_path / "app.py"
    app.write_text(APP)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PROMPTLAYER_"))}
    env.update(OTEL_TRACES_SAMPLER=SAMPLER_NAME, OTEL_TRACES_SAMPLER_ARG="0",
               OTEL_TRACES_EXPORTER="none", OTEL_METRICS_EXPORTER="none",
               OTEL_LOGS_EXPORTER="none")
    instrument = Path(sys.executable).with_name("opentelemetry-instrument")
    done = subprocess.run([str(instrument), sys.executable, str(app)], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    description, recorded, sampled = json.loads(done.stdout.splitlines()[-1])
    assert description == MetadataSampler(ParentBased(TraceIdRatioBased(0.0))).get_description()
    assert (recorded, sampled) == (400, 0)  # every span recorded, none sampled at ratio 0
