"""Bad input never raises into the app: whatever a span holds, on_start/on_end return quietly,
odd values are carried exactly or stringified, limits are counted, and what is posted is valid."""

from __future__ import annotations

import itertools
import math
import os
from typing import Any

import pytest
from conftest import send
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from opentelemetry.context import Context, create_key
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.trace import SpanContext, TraceFlags

from otel_metadata import metadata_context, set_request_id
from otel_metadata.mapping import MappingRules, map_attributes, map_weakest
from otel_metadata.stats import Stats
from otel_metadata.testing.track_metadata import TrackMetadataServer


class Hostile:
    """A value that fails every way Python lets it: str, repr, eq, hash, len, iteration."""

    def _boom(self, *args: Any) -> Any:
        raise RuntimeError("hostile")

    __str__ = __repr__ = __eq__ = __hash__ = __len__ = __iter__ = __bool__ = _boom


class HostileMapping(dict):  # type: ignore[type-arg]
    """Attributes that fail when read."""

    def _boom(self, *args: Any) -> Any:
        raise RuntimeError("hostile mapping")

    __contains__ = __getitem__ = __iter__ = items = keys = get = _boom


KEYS = st.sampled_from(["user.id", "enduser.id", "session.id", "gen_ai.conversation.id",
                        "promptlayer.request_id", "other"]) | st.text(max_size=30).map(
    "promptlayer.metadata.".__add__) | st.text(max_size=30) | st.text(min_size=1025,
                                                                      max_size=1100)
SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(min_value=2**64)
           | st.floats() | st.text() | st.text(min_size=1025, max_size=1100) | st.binary()
           | st.just(""))
VALUES = SCALARS | st.lists(SCALARS, max_size=4) | st.dictionaries(st.text(max_size=5), SCALARS,
                                                                   max_size=3)
ATTRIBUTES = st.dictionaries(KEYS, VALUES, max_size=8)
_unique = itertools.count()


@pytest.fixture
def pipeline(make_pipeline: Any) -> Any:
    # Records pile up (coalesced by request ID) and go out at the test's flush, not per example.
    return make_pipeline(schedule_delay_millis=60_000)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(attributes=ATTRIBUTES, parent=ATTRIBUTES, request_id=st.integers(0, 20) | st.text(
    min_size=1, max_size=5).filter(str.strip))
@example(attributes={}, parent={"gen_ai.user": False}, request_id=0)  # a fallback alone
def test_real_spans_with_any_attributes_never_raise_and_post_only_valid_metadata(
    pipeline: Any, server: TrackMetadataServer, attributes: dict[str, Any],
    parent: dict[str, Any], request_id: int | str,
) -> None:
    rid = f"{next(_unique)}-{request_id}"  # examples share the server: one ID each
    # Hypothesis reseeds `random` for every example, and with it the SDK's span IDs: fresh ones.
    provider = TracerProvider(id_generator=_UrandomIds())
    provider.add_span_processor(pipeline.processor)
    tracer = provider.get_tracer("t")
    # The SDK calls on_start/on_end bare: an exception from us would surface right here.
    with tracer.start_as_current_span("parent", attributes=_sdk_safe(parent)) as top:
        with tracer.start_as_current_span("llm") as span:
            for key, value in attributes.items():
                span.set_attribute(key, value)
            set_request_id(rid)
    assert pipeline.flush(10_000) is True  # odd values are stringified or counted, never lost
    # Whatever the spans held, nothing the API would refuse was sent, and the request got the
    # lineage of what the SDK kept on the two spans (nothing when nothing maps).
    assert set(server.statuses()) <= {200}
    rules, stats = MappingRules(), Stats()
    expected = {**map_attributes(top.attributes or {}, rules, stats),
                **map_attributes(span.attributes or {}, rules, stats)}
    # The LLM request's own end-user field (gen_ai.user) fills only a key nothing else gave,
    # the nearer span's first.
    weakest = {**map_weakest(top.attributes or {}, rules, stats),
               **map_weakest(span.attributes or {}, rules, stats)}
    expected = {**weakest, **expected}
    assert server.metadata.get(rid) == (expected or None)


class _UrandomIds(IdGenerator):
    def generate_span_id(self) -> int:
        return int.from_bytes(os.urandom(8), "big") or 1

    def generate_trace_id(self) -> int:
        return int.from_bytes(os.urandom(16), "big") or 1


def _sdk_safe(attributes: dict[str, Any]) -> dict[str, Any]:
    """`start_span(attributes=...)` takes only what the SDK allows; set_attribute takes all."""
    return {k: v for k, v in attributes.items() if isinstance(v, (str, bool, int, float))}


def _span(attributes: Any, span_id: int = 1, parent: SpanContext | None = None) -> ReadableSpan:
    ctx = SpanContext(trace_id=7, span_id=span_id, is_remote=False,
                      trace_flags=TraceFlags(TraceFlags.SAMPLED))
    return ReadableSpan(name="llm", context=ctx, parent=parent, attributes=attributes)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(attributes=st.dictionaries(KEYS, VALUES | st.builds(Hostile), max_size=8))
def test_on_start_and_on_end_never_raise_whatever_the_span_holds(
    pipeline: Any, attributes: dict[str, Any],
) -> None:
    processor = pipeline.processor
    errors = processor.stats()["errors"]  # examples share the pipeline
    span = _span(attributes)
    processor.on_start(span, parent_context=Context({create_key("junk"): Hostile()}))
    processor.on_end(span)
    # A span that could not be read is counted, and the next flush says something was lost.
    assert processor.force_flush(5_000) is (processor.stats()["errors"] == errors)


@pytest.mark.parametrize("attributes", [
    HostileMapping(), {"promptlayer.request_id": Hostile(), "user.id": "u"},
    {"promptlayer.request_id": 1, "user.id": Hostile()},
    {"promptlayer.request_id": 1, "promptlayer.metadata.x": [Hostile()]},
    {"promptlayer.request_id": 1, 7: "v", ("promptlayer.metadata.t",): "x", None: "n"},
])
def test_hostile_attribute_objects_are_skipped_quietly(pipeline: Any, attributes: Any) -> None:
    pipeline.processor.on_start(_span(attributes))
    pipeline.processor.on_end(_span(attributes))
    assert pipeline.flush(5_000) is (pipeline.processor.stats()["errors"] == 0)


def test_unicode_and_control_characters_are_carried_exactly(
    server: TrackMetadataServer, make_pipeline: Any,
) -> None:
    values = {
        "control": "\x00\x01\x1f\x7f\x1b[31m",
        "unicode": "naïve ☃ 𝄞 \u200f\u2028 עברית 日本語 \U0001f600",
        "quotes": "'\"\\ \\u0000 {}[]",
        "newlines": "a\r\nb\n\tc",
        "lone surrogate": "\ud800x",
        "key \u2603\x01": "value",
    }
    p = make_pipeline()
    send(p, "req-\u2603\x01", values)
    assert p.flush()
    assert server.metadata == {"req-\u2603\x01": values}


def test_non_string_values_follow_the_opentelemetry_rule(
    server: TrackMetadataServer, make_pipeline: Any,
) -> None:
    p = make_pipeline()
    send(p, 1, {"int": 5, "big": 2**70, "float": 1.5, "bool": True, "ints": [1, 2],
                "strs": ["a", "ü"], "bools": [True, False], "nan": math.nan})
    assert p.flush()
    assert server.metadata == {1: {
        "int": "5", "big": str(2**70), "float": "1.5", "bool": "true", "ints": "[1, 2]",
        "strs": '["a", "ü"]', "bools": "[true, false]", "nan": "nan"}}


def test_huge_values_are_truncated_and_huge_keys_dropped_counted_and_logged_once(
    server: TrackMetadataServer, make_pipeline: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    p = make_pipeline(max_value_length=100)
    long_key = "k" * 1025
    for rid in (1, 2):
        send(p, rid, {"long": "v" * 100_000, long_key: "x", "ok": "y"})
    assert p.flush()
    assert server.metadata == {1: {"long": "v" * 100, "ok": "y"}, 2: {"long": "v" * 100,
                                                                      "ok": "y"}}
    stats = p.processor.stats()
    assert (stats["truncated_values"], stats["dropped_keys"]) == (2, 2)
    assert sum("truncating" in r.getMessage() for r in caplog.records) == 1
    assert sum("longer than" in r.getMessage() for r in caplog.records) == 1
    assert long_key not in caplog.text  # a huge key is quoted by its start only


@pytest.mark.parametrize("bad_id", [1.5, True, False, "", [1, 2], ["a"]])
def test_odd_request_id_types_are_ignored_counted_and_never_posted(
    server: TrackMetadataServer, make_pipeline: Any, bad_id: Any,
) -> None:
    p = make_pipeline()
    with p.tracer.start_as_current_span("llm") as span:
        span.set_attribute("user.id", "u")
        span.set_attribute("promptlayer.request_id", bad_id)
    assert p.flush()
    assert server.posts == []
    assert p.processor.stats()["ignored_request_ids"] == 1


@pytest.mark.parametrize(("bad", "error", "says"), [
    (None, TypeError, "None"), (1.5, TypeError, "float"), (True, TypeError, "bool"),
    ("", ValueError, "empty"), ([1], TypeError, "list"),
])
def test_set_request_id_rejects_bad_ids_clearly(bad: Any, error: type, says: str) -> None:
    with pytest.raises(error, match=says):
        set_request_id(bad)


@pytest.mark.parametrize("timeout_millis", [0, -5, math.nan, math.inf, 10**15])
def test_force_flush_takes_any_number_as_timeout(
    server: TrackMetadataServer, make_pipeline: Any, timeout_millis: float,
) -> None:
    p = make_pipeline()
    assert p.processor.force_flush(timeout_millis) is True  # nothing pending: nothing to wait
    send(p, 1, {"a": "b"})
    flushed = p.processor.force_flush(timeout_millis)
    if timeout_millis > 1000:  # time enough to deliver it
        assert flushed is True
    # A flush that gave up waiting gave up nothing else: the record still arrives.
    assert p.flush() and server.metadata == {1: {"a": "b"}}


def test_metadata_context_with_odd_values_never_breaks_the_span(
    server: TrackMetadataServer, make_pipeline: Any,
) -> None:
    p = make_pipeline()
    with metadata_context(user_id=7, tags=["a", 1], flag=False, **{"\u2603": "s"}):
        send(p, 1, {})
    assert p.flush()
    assert server.metadata == {1: {"user_id": "7", "tags": '["a", 1]', "flag": "false",
                                   "\u2603": "s"}}

