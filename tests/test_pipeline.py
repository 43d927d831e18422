"""End to end: real SDK spans → processor → HTTP → the strict local server."""

from __future__ import annotations

import pytest

from otel_metadata import set_request_id
from otel_metadata.testing.track_metadata import TrackMetadataServer


def test_request_span_metadata_arrives_exactly(server: TrackMetadataServer, make_pipeline) -> None:
    p = make_pipeline()
    with p.tracer.start_as_current_span("llm") as span:
        span.set_attribute("user.id", "u-1")
        span.set_attribute("gen_ai.conversation.id", "c-9")
        span.set_attribute("promptlayer.metadata.plan", "pro")
        span.set_attribute("gen_ai.prompt", "secret prompt")
        set_request_id(42)
    assert p.flush()
    assert server.metadata == {42: {"user_id": "u-1", "conversation_id": "c-9", "plan": "pro"}}
    assert server.statuses() == {200: 1}


def test_spans_without_request_id_post_nothing(server: TrackMetadataServer, make_pipeline) -> None:
    p = make_pipeline()
    with p.tracer.start_as_current_span("handler") as span:
        span.set_attribute("user.id", "u-1")
    assert p.flush()
    assert server.posts == []


def test_string_request_ids_and_unicode_values_pass_exactly(server, make_pipeline) -> None:
    p = make_pipeline()
    value = 'naïve "quoted"\nline two \u2603 \x07'
    with p.tracer.start_as_current_span("llm") as span:
        span.set_attribute("promptlayer.metadata.note", value)
        set_request_id("req-abc")
    assert p.flush()
    assert server.metadata == {"req-abc": {"note": value}}


def test_updates_to_one_request_id_coalesce_into_one_post(server, make_pipeline) -> None:
    p = make_pipeline(schedule_delay_millis=60_000)
    for i in range(20):
        with p.tracer.start_as_current_span("llm") as span:
            span.set_attribute("promptlayer.metadata.step", str(i))
            span.set_attribute(f"promptlayer.metadata.k{i % 3}", "v")
            set_request_id(7)
    assert p.flush()
    assert server.statuses() == {200: 1}
    assert server.metadata == {7: {"step": "19", "k0": "v", "k1": "v", "k2": "v"}}


def test_record_only_spans_are_processed(server, make_pipeline) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult

    class RecordOnly(Sampler):
        def should_sample(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            return SamplingResult(Decision.RECORD_ONLY)

        def get_description(self) -> str:
            return "record-only"

    p = make_pipeline()
    provider = TracerProvider(sampler=RecordOnly())
    provider.add_span_processor(p.processor)
    with provider.get_tracer("t").start_as_current_span("llm") as span:
        assert span.is_recording() and not span.get_span_context().trace_flags.sampled
        span.set_attribute("user.id", "u-unsampled")
        set_request_id(5)
    assert p.flush()
    assert server.metadata == {5: {"user_id": "u-unsampled"}}


def test_server_is_strict_like_the_api(server: TrackMetadataServer) -> None:
    import requests

    url = server.base_url + "/rest/track-metadata"
    good = {"X-API-KEY": server.api_key, "Content-Type": "application/json"}
    assert requests.post(url, json={"request_id": 1, "metadata": {"a": "b"}},
                         headers=good).status_code == 200
    assert requests.post(url, json={"request_id": 1, "metadata": {"a": "b"}},
                         headers={**good, "X-API-KEY": "wrong"}).status_code == 401
    assert requests.post(url, json={"request_id": 1, "metadata": {"a": "b"}},
                         headers={"Content-Type": "application/json"}).status_code == 401
    assert requests.post(url, json={"request_id": 1, "metadata": {"a": 1}},
                         headers=good).status_code == 422
    assert requests.post(url, data=b'{"request_id": 1, "metadata": {"a": "b"}}',
                         headers={**good, "Content-Type": "text/plain"}).status_code == 400
    assert requests.post(url, json={"request_id": 1, "metadata": {"a": "b"},
                                    "api_key": server.api_key}, headers=good).status_code == 400
    assert requests.post(url, json={"request_id": True, "metadata": {"a": "b"}},
                         headers=good).status_code == 422
    assert server.metadata == {1: {"a": "b"}}


def test_force_flush_false_when_metadata_rejected(server, make_pipeline, caplog) -> None:
    p = make_pipeline(api_key="wrong-key")
    with p.tracer.start_as_current_span("llm") as span:
        span.set_attribute("user.id", "u")
        set_request_id(1)
    assert p.flush() is False
    assert server.statuses() == {401: 1}
    assert "the api_key argument" in caplog.text and "wrong-key" not in caplog.text
    # A rejected key is not retried, and later records are dropped without a POST.
    with p.tracer.start_as_current_span("llm") as span:
        span.set_attribute("user.id", "u")
        set_request_id(2)
    assert p.flush() is False
    assert server.statuses() == {401: 1}
    assert p.processor.stats()["dropped.unauthorized"] == 1


@pytest.mark.parametrize("bad", [None, 1.5, True, "", "   ", [1]])
def test_set_request_id_rejects_bad_ids(bad) -> None:
    with pytest.raises((TypeError, ValueError)):
        set_request_id(bad)


def test_without_key_the_processor_is_inert(caplog) -> None:
    from otel_metadata import MetadataSpanProcessor

    processor = MetadataSpanProcessor()
    assert "no PromptLayer API key" in caplog.text
    assert processor.force_flush() is True
    processor.shutdown()


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_a_request_without_a_required_key_is_posted_counted_and_said_once_per_key(
    server, make_pipeline, caplog, monkeypatch, how: str,
) -> None:
    if how == "environment":
        monkeypatch.setenv("PROMPTLAYER_METADATA_REQUIRED_KEYS", "user_id, tenant")
        p = make_pipeline()
    else:
        p = make_pipeline(required_keys=["user_id", "tenant"])
    for rid in (1, 2, 3):
        with p.tracer.start_as_current_span("llm") as span:
            if rid == 3:
                span.set_attribute("promptlayer.metadata.tenant", "acme")
            span.set_attribute("user.id", "u")
            set_request_id(rid)
    assert p.flush()  # nothing lost: posted all the same
    assert server.metadata == {1: {"user_id": "u"}, 2: {"user_id": "u"},
                               3: {"user_id": "u", "tenant": "acme"}}
    stats = p.processor.stats()
    assert (stats.get("missing.tenant"), stats.get("missing.user_id")) == (2, None)
    said = [r.getMessage() for r in caplog.records if "required metadata key" in r.getMessage()]
    assert len(said) == 1 and "'tenant'" in said[0]
