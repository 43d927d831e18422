"""Shared fixtures: a strict local PromptLayer and real SDK tracer providers wired to it."""

from __future__ import annotations

import collections
import itertools
import logging
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import pytest
from opentelemetry import context as otel_context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Tracer, TracerProvider

from otel_metadata import MetadataSpanProcessor, RetryPolicy, set_request_id
from otel_metadata.testing.track_metadata import TrackMetadataServer

API_KEY = "pl-test-key-0123456789"
FAST_RETRY = RetryPolicy(initial_backoff=0.01, max_backoff=0.2)

_ENV_VARS = [
    "PROMPTLAYER_API_KEY", "PROMPTLAYER_BASE_URL", "OTEL_BSP_SCHEDULE_DELAY",
    "OTEL_BSP_MAX_QUEUE_SIZE", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "OTEL_BSP_EXPORT_TIMEOUT",
    "OTEL_SDK_DISABLED", "OTEL_RESOURCE_ATTRIBUTES", "PROMPTLAYER_METADATA_MAX_CONCURRENCY",
    "PROMPTLAYER_METADATA_MAX_TRACE_WAIT", "PROMPTLAYER_METADATA_MAX_TRACES",
    "PROMPTLAYER_METADATA_MAX_VALUE_LENGTH", "PROMPTLAYER_METADATA_CONVENTIONS",
    "PROMPTLAYER_METADATA_SHUTDOWN_TIMEOUT", "PROMPTLAYER_METADATA_HANDLE_SIGTERM",
    "PROMPTLAYER_METADATA_REQUIRED_KEYS", "PROMPTLAYER_METADATA_SPOOL_DIR",
    "PROMPTLAYER_METADATA_MAX_SPOOL_BYTES", "PROMPTLAYER_METADATA_SPOOL_SYNC",
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

    def settled_stats(self) -> dict[str, int]:
        """`stats()` once the lineage worker has joined every span ended so far."""
        assert wait_for(lambda: self.processor.stats()["backlog"] == 0)
        return self.processor.stats()


@pytest.fixture
def closed_port() -> int:
    """A port that was free a moment ago: nobody listens there, connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def unaccepting_port() -> Iterator[int]:
    """A port whose listener never accepts and whose accept queue is full: a connect there
    waits in the SYN queue, as one to a host that drops packets does."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)  # one connection fills the queue
        port = int(listener.getsockname()[1])
        filler = socket.create_connection(("127.0.0.1", port), timeout=5)
        probe = socket.socket()
        probe.settimeout(0.2)
        try:  # the premise: a further connect does not complete
            with pytest.raises(TimeoutError):
                probe.connect(("127.0.0.1", port))
            yield port
        finally:
            probe.close()
            filler.close()


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The resolver, faked for host names under ``.test`` (a DNS answer lists
    ``lookups["answers"]``, loopback addresses) and counted for every name."""
    real = socket.getaddrinfo
    seen: dict[str, Any] = {"calls": collections.Counter(), "answers": ["127.0.0.1"]}

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        seen["calls"][host] += 1
        if isinstance(host, str) and host.endswith(".test"):
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
                    for a in seen["answers"]]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return seen


def wait_for(condition: Callable[[], object], timeout: float = 5.0) -> bool:
    """Poll `condition` (no fixed sleep): True once it holds, False at the deadline."""
    done = threading.Event()
    deadline = threading.Timer(timeout, done.set)
    deadline.start()
    try:
        while not done.is_set():
            if condition():
                return True
            done.wait(0.01)
        return bool(condition())
    finally:
        deadline.cancel()


def request_in(p: Pipeline, ctx: Any, request_id: int | str = 1) -> None:
    """End one request span started in OpenTelemetry context `ctx` (e.g. extracted headers)."""
    token = otel_context.attach(ctx)
    try:
        with p.tracer.start_as_current_span("llm"):
            set_request_id(request_id)
    finally:
        otel_context.detach(token)


def tcp_sockets() -> list[list[str]]:
    """This host's TCP sockets, IPv4 and IPv6, one row of /proc/net/tcp* fields each (Linux):
    [1] local and [2] remote address as hex ``ADDR:PORT``, [3] the state (``0A`` LISTEN,
    ``08`` CLOSE_WAIT), [9] the socket's inode."""
    rows = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            rows += [line.split() for line in lines.readlines()[1:]]
    return rows


def wait_until(condition: Callable[[], object], what: str = "", timeout: float = 10.0) -> None:
    """`wait_for`, failing the test (saying `what` it waited for) at the deadline."""
    if not wait_for(condition, timeout):
        pytest.fail(f"timed out waiting for {what or condition}")


def send(p: Pipeline, request_id: int | str, metadata: Mapping[str, Any]) -> None:
    """End one request span (its own trace) carrying `metadata` as promptlayer.metadata.*."""
    with p.tracer.start_as_current_span("llm") as span:
        span.set_attributes({f"promptlayer.metadata.{k}": v for k, v in metadata.items()})
        set_request_id(request_id)


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


_stalls = itertools.count()


@contextmanager
def worker_stuck(p: Pipeline, **attributes: Any) -> Iterator[None]:
    """The lineage worker stuck inside a pass, as behind a slow log shipper: an app's log handler
    blocks on the warning our worker logs while mapping a span with a too-long value (that span,
    with `attributes` too, is ended here), until the block ends."""
    entered, release = threading.Event(), threading.Event()

    class Blocking(logging.Handler):
        def handle(self, record: logging.LogRecord) -> bool:  # no handler lock: others pass
            if threading.current_thread().name == "otel-metadata-lineage":
                entered.set()
                release.wait(30)
            return True

    handler = Blocking()
    logging.getLogger("otel_metadata").addHandler(handler)
    try:
        with p.tracer.start_as_current_span("stall") as span:
            span.set_attributes(attributes)
            span.set_attribute(f"promptlayer.metadata.stall{next(_stalls)}", "x" * 100_000)
        assert entered.wait(10), "the worker did not reach the stall"
        yield
    finally:
        release.set()
        logging.getLogger("otel_metadata").removeHandler(handler)
