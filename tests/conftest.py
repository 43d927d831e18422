"""Shared fixtures: a strict local PromptLayer and real SDK tracer providers wired to it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Tracer, TracerProvider

from otel_metadata import MetadataSpanProcessor, RetryPolicy
from otel_metadata.server import TrackMetadataServer

API_KEY = "pl-test-key-0123456789"
FAST_RETRY = RetryPolicy(initial_backoff=0.01, max_backoff=0.2)

_ENV_VARS = [
    "PROMPTLAYER_API_KEY", "PROMPTLAYER_BASE_URL", "OTEL_BSP_SCHEDULE_DELAY",
    "OTEL_BSP_MAX_QUEUE_SIZE", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "OTEL_BSP_EXPORT_TIMEOUT",
    "OTEL_SDK_DISABLED", "OTEL_RESOURCE_ATTRIBUTES", "PROMPTLAYER_METADATA_MAX_CONCURRENCY",
    "PROMPTLAYER_METADATA_MAX_TRACE_WAIT", "PROMPTLAYER_METADATA_MAX_TRACES",
    "PROMPTLAYER_METADATA_MAX_VALUE_LENGTH",
]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests start from no configuration, whatever the developer's shell exports."""
    for name in _ENV_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def server() -> Iterator[TrackMetadataServer]:
    with TrackMetadataServer(api_key=API_KEY) as srv:
        yield srv


class Pipeline:
    """A real TracerProvider with a MetadataSpanProcessor posting to the local server."""

    def __init__(self, processor: MetadataSpanProcessor, provider: TracerProvider) -> None:
        self.processor = processor
        self.provider = provider
        self.tracer: Tracer = provider.get_tracer("tests")

    def flush(self, timeout_millis: int = 10_000) -> bool:
        return self.processor.force_flush(timeout_millis)


@pytest.fixture
def make_pipeline(server: TrackMetadataServer) -> Iterator[Callable[..., Pipeline]]:
    """Build pipelines with test-friendly defaults; every one is shut down after the test."""
    made: list[Pipeline] = []

    def make(resource: dict[str, Any] | None = None, **kwargs: Any) -> Pipeline:
        options: dict[str, Any] = {
            "api_key": API_KEY, "base_url": server.base_url, "schedule_delay_millis": 20,
            "export_timeout_millis": 5000, "retry": FAST_RETRY,
        }
        options.update(kwargs)
        processor = MetadataSpanProcessor(**options)
        provider = TracerProvider(resource=Resource.create(resource or {}))
        provider.add_span_processor(processor)
        pipeline = Pipeline(processor, provider)
        made.append(pipeline)
        return pipeline

    yield make
    for pipeline in made:
        pipeline.provider.shutdown()
