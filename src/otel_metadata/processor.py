"""`MetadataSpanProcessor`: finished spans in, PromptLayer metadata out (SPEC §1, §6, §7)."""

from __future__ import annotations

import contextvars
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.baggage import _BAGGAGE_KEY
from opentelemetry.context import Context, get_current
from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor

from . import config
from .context import _CONTEXT_KEY
from .delivery import Delivery
from .lineage import LINK_GENERATION, SpanData, TraceJoin
from .mapping import (
    METADATA_PREFIX,
    MappingRules,
    map_attributes,
    map_values,
    request_id_of,
)
from .queue import MAX_WAIT_S
from .retry import RetryPolicy
from .stats import Stats

_logger = logging.getLogger("otel_metadata")

# Spans started inside a metadata_context/baggage but never ended must not grow memory forever.
_MAX_STARTED = 100_000
# Ended spans handed to the worker and not joined yet, past which on_end drops spans that carry
# metadata (counted): the app's thread never waits for the worker.
_MAX_INBOX = 16_384
# How long `stats()` waits for a pass of the worker under way, to count what was handed to it.
_STATS_WAIT_S = 1.0

# What on_end hands the worker: trace ID, span ID, parent context, the span's attributes (None
# when they hold nothing for us), its start context values and baggage, its resource.
_Item = tuple[int, int, Any, Any, Any, Any]


class MetadataSpanProcessor(SpanProcessor):
    """Reads finished spans and sends PromptLayer metadata for each request span.

    Add it to the provider beside your exporters; it exports nothing else. `on_start` notes the
    `metadata_context`/baggage values a span started under. `on_end` tells whether a span matters
    (most carry nothing for us) and hands those that do to a worker thread, which maps their
    attributes and joins request spans with their ancestors; the app's thread only appends to a
    deque. Neither hook raises or touches the network: sender threads post in the background.
    `force_flush`, `shutdown` and `stats` first join everything handed over. Spans recorded but
    not sampled are processed too.

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
        self._irrelevant = self._rules.irrelevant
        self._resource: Resource | None = None
        self._resource_metadata: Mapping[str, str] = {}
        self._baggage_seen: object = None
        self._baggage_relevant = False
        self._started: dict[int, tuple[Any, Any]] = {}
        self._is_shutdown = False
        self._delivery: Delivery | None = None
        self._inbox: deque[_Item] = deque()
        self._drain_lock = threading.Lock()
        self._drainer: int | None = None  # the thread inside `_drain_locked`
        self._wake = threading.Event()
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
            self._start_worker()
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
            ctx = _current_context() if parent_context is None else parent_context
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
            if type(span) is ReadableSpan:
                # The SDK's own: its fields read directly, not through properties, and its
                # attributes from the plain dict inside the SDK's BoundedAttributes, whose public
                # face (a MappingProxy over a mapping that iterates in Python) makes the relevance
                # test about 3x dearer. The span has ended, so that dict no longer changes (the
                # worker may read it later).
                ctx, parent, raw = span._context, span._parent, span._attributes
                attrs = raw._dict if type(raw) is BoundedAttributes else (raw or {})
            else:  # anything else (another SDK version, a wrapper) through the public API
                ctx, parent, attrs = span.context, span.parent, span.attributes or {}
            # A SpanContext is a tuple (trace_id, span_id, is_remote, ...), as its API type says:
            # indexing it saves a Python property call per field read, on every span.
            trace_id, span_id = ctx[0], ctx[1]  # type: ignore[index]  # None: counted below
            started = self._started.pop(span_id, None) if self._started else None
            inbox, join = self._inbox, self._join
            item: _Item
            # `MappingRules.is_relevant`, spelled out to save a call on every span: most spans
            # carry nothing for us and are told by one set test in C.
            rules = self._rules
            if not self._irrelevant.issuperset(attrs) and (
                    not rules.relevant.isdisjoint(attrs) or rules.prefixed_or_learn(attrs)):
                item = (trace_id, span_id, parent, attrs, started, span.resource)
            elif inbox or trace_id in join.traces or trace_id in join.ended_roots:
                # Its trace may be held: the join must see it, after what was handed off before.
                item = (trace_id, span_id, parent, None, None, None)
            else:
                if parent is not None and not parent[2]:
                    # Remembered in case a request below it ends later (a streamed response);
                    # as `TraceJoin.note_link` does, without a call.
                    links = join.links
                    links[span_id] = parent[1]
                    if len(links) >= LINK_GENERATION:
                        join.new_link_generation(links)
                return
            # Handed to the worker, which maps and joins it: on this thread, one append.
            if len(inbox) >= _MAX_INBOX or self._is_shutdown:
                self._refuse(item[3] is not None)
                return
            inbox.append(item)
            if not self._wake.is_set():  # after the append: the worker clears it, then drains
                self._wake.set()
        except Exception:
            self._error(getattr(span, "name", "?"))

    def _error(self, name: object) -> None:
        self._stats.add("errors")
        if self._stats.first("error", "on_end"):
            _logger.warning("otel-metadata: could not read span %r; skipped", name,
                            exc_info=True)

    # -- the hand-off: on_end only appends; the worker maps and joins (SPEC §7: never block) --

    def _refuse(self, relevant: bool) -> None:
        """A span not handed off: after shutdown, or while the worker is `_MAX_INBOX` behind
        (an app that makes spans faster than their metadata can be joined). Never waits."""
        if not relevant:  # its trace's requests are posted at their wait all the same
            return
        if self._is_shutdown:
            self._stats.add("dropped.shutdown")
            return
        self._stats.add("dropped.backlog")
        self._stats.warn_once("drop", "backlog", "otel-metadata: %d ended spans are waiting to "
                              "be joined; dropping spans that carry metadata until the worker "
                              "catches up, and counting them as dropped.backlog", _MAX_INBOX)

    def _drain(self, timeout: float | None = None) -> bool:
        """Join, in order, the spans handed off before this call: one bounded pass.

        False when `timeout` ran out waiting for a pass under way, or when this thread is the
        one draining (our log record reached a handler that calls back into us).
        """
        if not self._inbox:  # an item leaves the inbox only once joined
            return True
        me = threading.get_ident()
        # A lock's timeout overflows the platform's time_t far below inf; NaN: no wait.
        wait = -1.0 if timeout is None else min(timeout, MAX_WAIT_S) if timeout > 0 else 0.0
        if self._drainer == me or not self._drain_lock.acquire(timeout=wait):
            return False
        self._drainer = me
        try:
            self._drain_locked(len(self._inbox))
        finally:
            self._drainer = None
            self._drain_lock.release()
        return True

    def _drain_locked(self, count: int) -> None:
        inbox, join = self._inbox, self._join
        for _ in range(count):
            # Left in the inbox until joined, so on_end still sees that its trace may be held.
            item = inbox[0]
            trace_id, span_id, parent, attrs, _, _ = item
            try:
                if attrs is not None:
                    join.add(self._span_data(item, _relevant_items(attrs, self._rules)))
                elif join.holds(trace_id):
                    join.add(self._span_data(item, None))
                elif parent is not None and not parent[2]:
                    join.note_link(span_id, parent[1])
            except Exception:
                self._error(f"{span_id:016x}")
            finally:
                inbox.popleft()

    def _span_data(self, item: _Item, attrs: Mapping[str, Any] | None) -> SpanData:
        """`attrs`: the span's relevant attributes (None when it has none)."""
        trace_id, span_id, parent, _, started, resource = item
        rules, stats = self._rules, self._stats
        metadata = map_attributes(attrs, rules, stats) if attrs else {}
        request_id = request_id_of(attrs, rules.request_id_attributes, stats) if attrs else None
        context_md = resource_md = None
        if request_id is not None:  # only a request span needs its start context and resource
            if started is not None:
                values, bag = started
                context_md = map_attributes(bag, rules, stats) if bag else {}
                context_md.update(map_values(values or {}, rules, stats))  # context beats baggage
            resource_md = self._map_resource(resource)
        return SpanData(trace_id, span_id, parent.span_id if parent is not None else None,
                        parent is None or parent.is_remote, metadata, request_id, context_md,
                        resource_md)

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
            timeout_s = timeout_millis / 1000
            deadline = time.monotonic() + timeout_s
            if not self._drain(timeout_s):
                return False
            self._join.release_all()
            return self._delivery.force_flush(max(0.0, deadline - time.monotonic()))
        except Exception:  # the SDK calls this unguarded, from the app or the exit hook
            _logger.exception("otel-metadata: force_flush failed")
            return False

    def shutdown(self) -> None:
        """Flush (bounded by the export timeout), stop the threads; safe to call twice."""
        if self._delivery is None or self._is_shutdown:
            return
        self._is_shutdown = True
        self._wake.set()  # the worker stops; what it left is joined here
        try:
            deadline = time.monotonic() + self._settings.export_timeout_s
            self._drain(self._settings.export_timeout_s)
            self._join.release_all()
            self._delivery.shutdown(max(0.0, deadline - time.monotonic()))
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
        if self._delivery is not None:  # include every span ended before this call, if quick
            self._drain(_STATS_WAIT_S)
        counts = self._stats.snapshot()
        if self._delivery is not None:
            counts["held_traces"] = len(self._join)
        return counts

    # -- the worker: joins handed-off spans, posts traces whose root did not end in time --

    def _start_worker(self) -> None:
        thread = threading.Thread(target=self._work, name="otel-metadata-lineage", daemon=True)
        thread.start()

    def _work(self) -> None:
        tick = min(0.5, max(0.01, self._settings.max_trace_wait_s / 10))
        next_expiry = time.monotonic() + tick
        while True:
            # Woken by a span handed off since the last pass, else when expiry is due.
            self._wake.wait(max(0.0, next_expiry - time.monotonic()))
            self._wake.clear()
            if self._is_shutdown:
                return
            try:
                self._drain()
                if time.monotonic() >= next_expiry:
                    self._join.expire()
                    next_expiry = time.monotonic() + tick
            except Exception:
                _logger.exception("otel-metadata: lineage worker failed")

    def _after_fork(self) -> None:
        if self._is_shutdown:
            return
        self._started = {}
        self._inbox = deque()  # the parent joins what it handed off
        self._drain_lock = threading.Lock()
        self._drainer = None
        self._wake = threading.Event()
        self._join.clear()
        self._start_worker()


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


def _relevant_items(attrs: Mapping[str, Any], rules: MappingRules) -> dict[str, Any]:
    """The attributes the mapping rules read, in a plain dict.

    Mapping them gives the same result as mapping all of `attrs`, and a dict is much cheaper to
    probe than the SDK's attribute mapping (whose `in` raises and catches a KeyError per miss).
    """
    out = {k: attrs[k] for k in rules.relevant.intersection(attrs)}
    if METADATA_PREFIX in "\0".join(attrs):
        out.update((k, v) for k, v in attrs.items() if k.startswith(METADATA_PREFIX))
    return out
