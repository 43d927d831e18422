"""`MetadataSpanProcessor`: the OpenTelemetry SDK as a source of spans (SPEC §1, §7).

A thin adapter: it reads what the pipeline needs from the SDK's span objects and hands it to
the pipeline's intake, which does everything else (`pipeline.py`).
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.baggage import _BAGGAGE_KEY
from opentelemetry.context import Context, get_current
from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
from opentelemetry.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.trace import SpanContext

from . import config
from .context import _CONTEXT_KEY
from .pipeline import Pipeline
from .retry import RetryPolicy
from .signals import flush_on_sigterm

_logger = logging.getLogger("otel_metadata")

# Spans started inside a metadata_context/baggage but never ended must not grow memory forever.
_MAX_STARTED = 100_000


class MetadataSpanProcessor(SpanProcessor):
    """Reads finished spans and sends PromptLayer metadata for each request span.

    Add it to the provider beside your exporters; it exports nothing else. `on_start` notes the
    `metadata_context`/other tools'/baggage values a span started under; `on_end` hands the
    span to the pipeline's intake, which tells in a set test whether it matters (most carry
    nothing for us) and leaves the rest to a worker thread: neither hook raises or touches the
    network. Spans recorded but not sampled are processed too.

    Beware: nothing happens without an API key (argument or ``PROMPTLAYER_API_KEY``); the
    processor then logs one warning and stays inert.

    Args:
        api_key: PromptLayer API key (default ``PROMPTLAYER_API_KEY``).
        base_url: the API's base URL (default ``PROMPTLAYER_BASE_URL``, else PromptLayer's).
        metadata: static metadata for every request, the weakest layer.
        extra_attributes: more span attributes to send, attribute name -> metadata key.
        request_id_attributes: attributes that hold a request ID (``promptlayer.request_id``).
        conventions: other tools' metadata conventions read, a comma list or list of
            ``openinference``, ``traceloop``, ``langfuse``, ``genai``, or ``none``
            (``PROMPTLAYER_METADATA_CONVENTIONS``; default all).
        max_value_length: longer values are truncated (``PROMPTLAYER_METADATA_MAX_VALUE_LENGTH``).
        max_concurrency: most POSTs in flight, adapting below it to the load and the API's
            answers (``PROMPTLAYER_METADATA_MAX_CONCURRENCY``, default 64).
        schedule_delay_millis: how long a record waits for others (``OTEL_BSP_SCHEDULE_DELAY``).
        max_queue_size: request IDs waiting to be posted (``OTEL_BSP_MAX_QUEUE_SIZE``).
        max_export_batch_size: this many waiting records go at once
            (``OTEL_BSP_MAX_EXPORT_BATCH_SIZE``).
        export_timeout_millis: how long one record is retried (``OTEL_BSP_EXPORT_TIMEOUT``).
        max_trace_wait_millis: how long a request waits for its local root
            (``PROMPTLAYER_METADATA_MAX_TRACE_WAIT``).
        max_traces: traces held at once (``PROMPTLAYER_METADATA_MAX_TRACES``).
        request_timeout_s: one POST's timeout.
        required_keys: metadata keys every request should have; one missing is counted
            (``missing.<key>``) and warned about once (``PROMPTLAYER_METADATA_REQUIRED_KEYS``).
        shutdown_timeout_millis: shutdown never holds the process's exit longer
            (``PROMPTLAYER_METADATA_SHUTDOWN_TIMEOUT``, 5000).
        handle_sigterm: flush on SIGTERM, then hand the signal on
            (``PROMPTLAYER_METADATA_HANDLE_SIGTERM``, true).
        spool_dir: records wait in a SQLite file of this process's own in that directory, so a
            crash or ``kill -9`` loses none: the next process there delivers them
            (``PROMPTLAYER_METADATA_SPOOL_DIR``; default none: in memory).
        max_spool_bytes: the spool's bound (``PROMPTLAYER_METADATA_MAX_SPOOL_BYTES``, 256 MiB).
        spool_sync: ``normal`` survives the process dying; ``full`` survives power loss too, at
            an fsync per commit (``PROMPTLAYER_METADATA_SPOOL_SYNC``, normal).
        retry: the retry policy (backoff, jitter).
        meter_provider: where self-metrics go (default: the global meter provider; nothing is
            recorded with the API's no-op one).
    """

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str | None = None,
        *,
        metadata: Mapping[str, Any] | None = None,
        extra_attributes: Mapping[str, str] | None = None,
        request_id_attributes: Sequence[str] | None = None,
        conventions: str | Sequence[str] | None = None,
        max_value_length: int | None = None,
        max_concurrency: int | None = None,
        schedule_delay_millis: float | None = None,
        max_queue_size: int | None = None,
        max_export_batch_size: int | None = None,
        export_timeout_millis: float | None = None,
        max_trace_wait_millis: float | None = None,
        max_traces: int | None = None,
        request_timeout_s: float | None = None,
        required_keys: str | Sequence[str] | None = None,
        shutdown_timeout_millis: float | None = None,
        handle_sigterm: bool | None = None,
        spool_dir: str | None = None,
        max_spool_bytes: int | None = None,
        spool_sync: str | None = None,
        retry: RetryPolicy | None = None,
        meter_provider: MeterProvider | None = None,
    ) -> None:
        options = {k: v for k, v in locals().items() if k in config.ARGUMENTS}
        self._settings = s = config.resolve(**options)
        self._pipeline: Pipeline | None = None
        self._ended: Callable[..., bool] | None = None  # the intake's `ended`; None: inert
        self._started: dict[int, tuple[Any, ...]] = {}
        self._baggage: tuple[object, bool] = (None, False)  # (last baggage seen, relevant?)
        self._tool_keys: frozenset[str] = frozenset()  # other tools' context keys (conventions)
        # Every context key on_start reads: ours, baggage's, other tools'.
        self._watched: frozenset[str] = frozenset()
        # The SDK's span type when the probe found its private fields as on_end reads them;
        # None: the public API for every span (or inert).
        self._fast: type | None = None
        self._unhook: Callable[[], None] | None = None  # removes our SIGTERM handler
        if s.disabled:
            _logger.info("otel-metadata: OTEL_SDK_DISABLED=true; metadata processor inert")
            return
        if s.api_key is None:
            _logger.warning("otel-metadata: no PromptLayer API key (pass api_key= or set %s); "
                            "no metadata will be sent", config.ENV_API_KEY)
            return
        if config.is_plain_http_to_remote(s.base_url):
            _logger.warning("otel-metadata: %s is plain http to a remote host: the API key "
                            "would travel unencrypted; use https", s.base_url)
        try:
            self._pipeline = Pipeline(s, retry, meter_provider)
        except Exception:  # e.g. no thread can be started: stay inert, never break the app
            _logger.warning("otel-metadata: could not start; no metadata will be sent",
                            exc_info=True)
            return
        self._ended = self._pipeline.intake.ended
        self._fast = ReadableSpan if _private_fields_readable() else None
        self._tool_keys = self._pipeline.rules.context_keys
        self._watched = self._tool_keys | {_CONTEXT_KEY, _BAGGAGE_KEY}
        if s.handle_sigterm:
            self._unhook = flush_on_sigterm(self._flush_on_sigterm, s.shutdown_timeout_s)

    def _flush_on_sigterm(self, timeout_s: float) -> None:
        """The process may end right after this (the signal's default action): say what it
        would lose."""
        pipeline = self._pipeline
        if pipeline is not None and not self.force_flush(int(timeout_s * 1000)):
            pipeline.report(f"SIGTERM, not all delivered within {timeout_s:g} s",
                            pipeline.waiting())

    def __repr__(self) -> str:
        s = self._settings
        return (f"MetadataSpanProcessor(base_url={s.base_url!r}, api_key="
                f"{'<from ' + s.api_key_source + '>' if s.api_key_source else None}, "
                f"active={self._pipeline is not None})")

    # -- the SDK's hooks: on the app's thread, never raise, never block --

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        try:  # inert, `_watched` is empty
            ctx = _current_context() if parent_context is None else parent_context
            if self._watched.isdisjoint(ctx):  # most spans: one set test in C over its few keys
                return
            values = ctx.get(_CONTEXT_KEY)
            bag = ctx.get(_BAGGAGE_KEY)
            if bag:
                seen, relevant = self._baggage  # one tuple: two threads cannot mix its halves
                if bag is not seen:
                    relevant = self._pipeline.rules.is_relevant_baggage(bag)  # type: ignore[union-attr,arg-type]
                    self._baggage = (bag, relevant)
            # Other tools' context values: one set test in C over the context's few keys, and
            # read only when one is there.
            keys = self._tool_keys
            tools = None if keys.isdisjoint(ctx) else {k: ctx[k] for k in keys.intersection(ctx)}
            if values or tools or (bag and relevant):
                started = self._started
                started[span.context.span_id] = (values, bag, tools)
                if len(started) > _MAX_STARTED:
                    started.pop(next(iter(started)), None)
        except Exception:
            _logger.debug("otel-metadata: on_start failed", exc_info=True)

    def on_end(self, span: ReadableSpan) -> None:
        try:
            if type(span) is self._fast:  # never while inert: `_fast` is None then
                try:
                    # The SDK's own span: its fields read directly, not through properties, and
                    # its attributes from the plain dict inside the SDK's BoundedAttributes,
                    # whose public face (a MappingProxy over a mapping that iterates in Python)
                    # makes the relevance test about 3x dearer. The span has ended, so that
                    # dict no longer changes. Chosen by a probe at start-up. One assignment
                    # each: a tuple assignment of four builds and unpacks a tuple.
                    ctx = span._context
                    parent = span._parent
                    raw = span._attributes
                    resource = span._resource
                    attrs = raw._dict if type(raw) is BoundedAttributes else raw or {}
                except AttributeError:  # an SDK that renamed them since the probe
                    self._fast = None
                    ctx, parent, attrs, resource = _public_fields(span)
            elif self._ended is None:
                return
            else:  # another SDK version, a wrapper: the public API
                ctx, parent, attrs, resource = _public_fields(span)
            # A SpanContext is a tuple (trace_id, span_id, is_remote, ...), as its API type says:
            # indexing it saves a Python property call per field read, on every span.
            # `self._ended(...)` would look the instance's bound method up unspecialised on every
            # span; read as an attribute first, it is not (with the assignments above, 400
            # instructions a span less in bench_instructions.py).
            ended = self._ended
            ended(ctx[0], ctx[1], parent, attrs,  # type: ignore[misc,index]
                  self._started.pop(ctx[1], None) if self._started else None,  # type: ignore[index]
                  resource)
        except Exception:
            self._pipeline.intake.error(getattr(span, "name", "?"))  # type: ignore[union-attr]

    # -- flush and shutdown --

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Post every held trace now, then wait for delivery: True if all of it was delivered
        and nothing was lost since the previous flush returned."""
        if self._pipeline is None:
            return True
        try:
            return self._pipeline.force_flush(timeout_millis)
        except Exception:  # the SDK calls this unguarded, from the app or the exit hook
            _logger.exception("otel-metadata: force_flush failed")
            return False

    def shutdown(self) -> None:
        """Flush and stop the threads, within ``shutdown_timeout``; safe to call twice."""
        if self._pipeline is not None:
            self._pipeline.shutdown()
            if self._unhook is not None:
                self._unhook()
                self._unhook = None

    def stats(self) -> dict[str, int]:
        """Counts of what happened: queued, delivered, retried, dropped.<reason>, ...; and what
        waits now: ``held_traces``, ``backlog`` (spans handed over, not joined yet)."""
        if self._pipeline is None:
            return {}
        return self._pipeline.stats()


def _public_fields(span: ReadableSpan) -> tuple[Any, Any, Mapping[str, Any], Resource]:
    return span.context, span.parent, span.attributes or {}, span.resource


def _private_fields_readable() -> bool:
    """Whether this SDK's `ReadableSpan` keeps the fields `on_end` reads directly, as they were
    when it was written: checked on a span built through the public constructor."""
    try:
        attrs = BoundedAttributes(attributes={"probe": 1})
        span = ReadableSpan(name="probe", context=SpanContext(1, 2, False),
                            parent=SpanContext(1, 3, False), resource=Resource({}),
                            attributes=attrs)
        raw = span._attributes
        return (span._context is span.context and span._parent is span.parent
                and span._resource is span.resource and type(raw) is BoundedAttributes
                and raw._dict == dict(span.attributes or {}))
    except Exception:
        return False


def _context_getter() -> Callable[[], Context]:
    """`get_current`, without its two Python calls when the runtime context is the default one.

    on_start reads the current context for every span; with OpenTelemetry's default runtime
    context that is one context variable, read here directly (another runtime context, chosen
    with OTEL_PYTHON_CONTEXT, goes through `get_current`).
    """
    runtime = getattr(otel_context, "_RUNTIME_CONTEXT", None)
    var = getattr(runtime, "_current_context", None)
    if type(runtime) is ContextVarsRuntimeContext and isinstance(var, contextvars.ContextVar):
        return var.get
    return get_current


_current_context = _context_getter()
