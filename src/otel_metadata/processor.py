"""`MetadataSpanProcessor`: finished spans in, PromptLayer metadata out (SPEC §1, §6, §7)."""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.attributes import BoundedAttributes
from opentelemetry.baggage import _BAGGAGE_KEY
from opentelemetry.context import Context, get_current
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor

from . import config
from .context import _CONTEXT_KEY
from .delivery import Delivery
from .lineage import SpanData, TraceJoin
from .mapping import (
    METADATA_PREFIX,
    MappingRules,
    map_attributes,
    map_values,
    request_id_of,
)
from .retry import RetryPolicy
from .stats import Stats

_logger = logging.getLogger("otel_metadata")

# Spans started inside a metadata_context/baggage but never ended must not grow memory forever.
_MAX_STARTED = 100_000


class MetadataSpanProcessor(SpanProcessor):
    """Reads finished spans and sends PromptLayer metadata for each request span.

    Add it to the provider beside your exporters; it exports nothing else. `on_start` notes the
    `metadata_context`/baggage values a span started under; `on_end` maps attributes and joins
    request spans with their ancestors. Neither raises nor touches the network: sender threads
    post in the background. Spans recorded but not sampled are processed too.

    Beware: nothing happens without an API key (argument or ``PROMPTLAYER_API_KEY``); the
    processor then logs one warning and stays inert.
    """

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str | None = None,
        *,
        metadata: Mapping[str, Any] | None = None,
        extra_attributes: Mapping[str, str] | None = None,
        request_id_attributes: Sequence[str] | None = None,
        max_value_length: int | None = None,
        max_concurrency: int | None = None,
        schedule_delay_millis: float | None = None,
        max_queue_size: int | None = None,
        max_export_batch_size: int | None = None,
        export_timeout_millis: float | None = None,
        max_trace_wait_millis: float | None = None,
        max_traces: int | None = None,
        request_timeout_s: float | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self._settings = s = config.resolve(
            api_key=api_key, base_url=base_url, metadata=metadata,
            extra_attributes=extra_attributes, request_id_attributes=request_id_attributes,
            max_value_length=max_value_length, max_concurrency=max_concurrency,
            schedule_delay_millis=schedule_delay_millis, max_queue_size=max_queue_size,
            max_export_batch_size=max_export_batch_size,
            export_timeout_millis=export_timeout_millis,
            max_trace_wait_millis=max_trace_wait_millis, max_traces=max_traces,
            request_timeout_s=request_timeout_s,
        )
        self._stats = Stats()
        self._rules = MappingRules(s.request_id_attributes, s.extra_attributes, s.max_value_length)
        self._resource: Resource | None = None
        self._resource_metadata: Mapping[str, str] = {}
        self._baggage_seen: object = None
        self._baggage_relevant = False
        self._started: dict[int, tuple[Any, Any]] = {}
        self._is_shutdown = False
        self._delivery: Delivery | None = None
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
            delivery = Delivery(s, self._stats, retry)
            self._join = TraceJoin(delivery.submit, static=map_values(s.metadata, self._rules,
                                   self._stats), max_traces=s.max_traces,
                                   max_wait_s=s.max_trace_wait_s, stats=self._stats)
            self._start_janitor()
        except Exception:  # e.g. no thread can be started: stay inert, never break the app
            _logger.warning("otel-metadata: could not start; no metadata will be sent",
                            exc_info=True)
            return
        delivery.on_drop = self._join.unsend
        self._delivery = delivery
        ref = weakref.WeakMethod(self._after_fork)
        os.register_at_fork(after_in_child=lambda: (m := ref()) and m())

    def __repr__(self) -> str:
        s = self._settings
        return (f"MetadataSpanProcessor(base_url={s.base_url!r}, api_key="
                f"{'<from ' + s.api_key_source + '>' if s.api_key_source else None}, "
                f"active={self._delivery is not None})")

    # -- the SDK's hooks: on the app's thread, never raise, never block --

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        if self._delivery is None:
            return
        try:
            ctx = get_current() if parent_context is None else parent_context
            values = ctx.get(_CONTEXT_KEY)
            bag = ctx.get(_BAGGAGE_KEY)
            if bag and bag is not self._baggage_seen:
                self._baggage_relevant = self._rules.is_relevant(bag)  # type: ignore[arg-type]
                self._baggage_seen = bag
            if values or (bag and self._baggage_relevant):
                started = self._started
                started[span.context.span_id] = (values, bag)
                if len(started) > _MAX_STARTED:
                    started.pop(next(iter(started)), None)
        except Exception:
            _logger.debug("otel-metadata: on_start failed", exc_info=True)

    def on_end(self, span: ReadableSpan) -> None:
        if self._delivery is None:
            return
        try:
            ctx = span.context
            assert ctx is not None
            # A SpanContext is a tuple (trace_id, span_id, is_remote, ...), as its API type says:
            # indexing it here saves a Python property call per field read, on every span.
            started = self._started.pop(ctx[1], None) if self._started else None
            # The public `span.attributes` wraps the SDK's BoundedAttributes, whose iteration runs
            # in Python, in a MappingProxy. The span has ended, so the plain dict inside it holds
            # the same items and no longer changes; reading it makes the relevance test about 3x
            # cheaper. Anything else (another SDK version) takes the public property.
            raw = getattr(span, "_attributes", None)
            attrs = raw._dict if type(raw) is BoundedAttributes else span.attributes
            if attrs and self._rules.is_relevant(attrs):
                self._join.add(self._span_data(span, _relevant_items(attrs, self._rules), started))
            elif self._join.holds(ctx[0]):
                self._join.add(self._span_data(span, None, started))
            else:  # remembered in case a request below it ends later (a streamed response)
                parent = span.parent
                if parent is not None and not parent[2]:
                    self._join.note_link(ctx[1], parent[1])
        except Exception:
            self._stats.add("errors")
            if self._stats.first("error", "on_end"):
                _logger.warning("otel-metadata: could not read span %r; skipped",
                                getattr(span, "name", "?"), exc_info=True)

    def _span_data(
        self, span: ReadableSpan, attrs: Mapping[str, Any] | None,
        started: tuple[Any, Any] | None,
    ) -> SpanData:
        """`attrs`: the span's relevant attributes (None when it has none)."""
        ctx, parent = span.context, span.parent
        assert ctx is not None
        rules, stats = self._rules, self._stats
        metadata = map_attributes(attrs, rules, stats) if attrs else {}
        request_id = request_id_of(attrs, rules.request_id_attributes, stats) if attrs else None
        context_md = resource = None
        if request_id is not None:  # only a request span needs its start context and resource
            if started is not None:
                values, bag = started
                context_md = map_attributes(bag, rules, stats) if bag else {}
                context_md.update(map_values(values or {}, rules, stats))  # context beats baggage
            resource = self._map_resource(span.resource)
        # Positional, in SpanData's field order: keywords cost more on this path.
        return SpanData(ctx.trace_id, ctx.span_id, parent.span_id if parent is not None else None,
                        parent is None or parent.is_remote, metadata, request_id, context_md,
                        resource)

    def _map_resource(self, resource: Resource | None) -> Mapping[str, str]:
        if resource is None:
            return {}
        if resource is not self._resource:
            self._resource_metadata = map_attributes(resource.attributes, self._rules,
                                                     self._stats)
            self._resource = resource
        return self._resource_metadata

    # -- flush and shutdown --

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Post every held trace now, then wait for delivery: True if all of it was delivered."""
        if self._delivery is None:
            return True
        if not isinstance(timeout_millis, (int, float)) or isinstance(timeout_millis, bool):
            timeout_millis = 30000
        try:
            self._join.release_all()
            return self._delivery.force_flush(timeout_millis / 1000)
        except Exception:  # the SDK calls this unguarded, from the app or the exit hook
            _logger.exception("otel-metadata: force_flush failed")
            return False

    def shutdown(self) -> None:
        """Flush (bounded by the export timeout), stop the threads; safe to call twice."""
        if self._delivery is None or self._is_shutdown:
            return
        self._is_shutdown = True
        self._janitor_stop.set()
        try:
            self._join.release_all()
            self._delivery.shutdown(self._settings.export_timeout_s)
        except Exception:  # never let our trouble break the provider's shutdown at exit
            _logger.exception("otel-metadata: shutdown failed")
        counts = self.stats()
        trouble = {k: v for k, v in counts.items()
                   if k.startswith(("dropped", "rejected", "ignored", "truncated", "errors")) and v}
        if trouble:
            _logger.warning("otel-metadata: at shutdown: %s (delivered %d)",
                            ", ".join(f"{k}={v}" for k, v in sorted(trouble.items())),
                            counts.get("delivered", 0))

    def stats(self) -> dict[str, int]:
        """Counts of what happened: queued, delivered, retried, dropped.<reason>, ..."""
        counts = self._stats.snapshot()
        if self._delivery is not None:
            counts["held_traces"] = len(self._join)
        return counts

    # -- the janitor: posts traces whose root did not end within max_trace_wait --

    def _start_janitor(self) -> None:
        self._janitor_stop = threading.Event()
        thread = threading.Thread(target=self._janitor, name="otel-metadata-janitor", daemon=True)
        thread.start()

    def _janitor(self) -> None:
        tick = min(0.5, max(0.01, self._settings.max_trace_wait_s / 10))
        while not self._janitor_stop.wait(tick):
            try:
                self._join.expire()
            except Exception:
                _logger.exception("otel-metadata: lineage janitor failed")

    def _after_fork(self) -> None:
        if self._is_shutdown:
            return
        self._started = {}
        self._join.clear()
        self._start_janitor()


def _relevant_items(attrs: Mapping[str, Any], rules: MappingRules) -> dict[str, Any]:
    """The attributes the mapping rules read, in a plain dict.

    Mapping them gives the same result as mapping all of `attrs`, and a dict is much cheaper to
    probe than the SDK's attribute mapping (whose `in` raises and catches a KeyError per miss).
    """
    relevant = rules.relevant
    return {k: attrs[k] for k in attrs if k in relevant or k.startswith(METADATA_PREFIX)}
