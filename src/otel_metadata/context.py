"""What the app says in code: `set_request_id` on a span, `metadata_context` around a block.

`metadata_context` values live in the OpenTelemetry `Context` (not a private ContextVar), so they
follow the same paths as the active span and baggage: threads given a copied context, asyncio
tasks, and an explicit `context=` passed to `start_span`.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from collections.abc import Callable, Mapping
from types import MappingProxyType, TracebackType
from typing import Any, TypeVar, cast

from opentelemetry import baggage, trace
from opentelemetry.baggage import _BAGGAGE_KEY
from opentelemetry.context import Context, attach, create_key, detach, get_current, set_value

from .conventions import CONTEXT_KEYS, METADATA_PREFIX
from .mapping import REQUEST_ID_ATTRIBUTE, check_request_id, stringify
from .pipeline import live

_logger = logging.getLogger("otel_metadata")

_CONTEXT_KEY = create_key("otel_metadata.values")
_warned_unlinked = False
_EMPTY: Mapping[str, str] = MappingProxyType({})
F = TypeVar("F", bound=Callable[..., Any])

# metadata_context keyword → the baggage entry a downstream service maps back to the same key.
_BAGGAGE_NAMES = {"user_id": "user.id", "conversation_id": "gen_ai.conversation.id"}


def set_request_id(request_id: int | str, span: trace.Span | None = None) -> None:
    """Link PromptLayer request `request_id` to `span` (default: the current span).

    The span may still be open or have ended already (within ``max_trace_wait`` of its end),
    and several IDs may be linked to one span: each gets that span's metadata. A span of
    another tracer provider is linked through its parent chain. Raises `TypeError`/`ValueError`
    for None, bool, float or an empty string: a request ID that cannot be posted is a bug worth
    hearing about at the call site.
    """
    link_request_id(request_id, span if span is not None else trace.get_current_span(), None)


def link_request_id(request_id: int | str, span: trace.Span, started: Context | None) -> None:
    """`set_request_id` with the context the request was made in (its `metadata_context`
    values and baggage), captured when the call began (the PromptLayer wrapper uses it).

    Without it, an open span's own start context is used, and for an ended span the current
    context.
    """
    check_request_id(request_id)
    ctx = span.get_span_context()
    if span.is_recording() and REQUEST_ID_ATTRIBUTE not in (getattr(span, "attributes", None)
                                                            or {}):
        # Exporters beside us (and PromptLayer's own OTLP ingestion) see which span it is.
        span.set_attribute(REQUEST_ID_ATTRIBUTE, request_id)
    pipelines = live()
    if not ctx.is_valid or not pipelines:
        _warn_unlinked(request_id, "found no span" if not ctx.is_valid else
                       "found no running MetadataSpanProcessor")
        return
    end_ns = getattr(span, "end_time", None)
    ended_ns = end_ns if isinstance(end_ns, int) and not span.is_recording() else None
    if started is None and ended_ns is not None:
        started = get_current()
    start = None if started is None else (
        cast(Mapping[str, str] | None, started.get(_CONTEXT_KEY)),
        cast(Mapping[str, str] | None, started.get(_BAGGAGE_KEY)),
        # other tools' context values (OpenInference's using_*, Traceloop's properties)
        {k: started[k] for k in CONTEXT_KEYS.intersection(started)} or None)
    # An open span's attributes are read when it ends; an ended one's now.
    attrs = getattr(span, "attributes", None) if ended_ns is not None else None
    for pipeline in pipelines:
        pipeline.link(request_id, ctx.trace_id, ctx.span_id, getattr(span, "parent", None),
                      attrs if isinstance(attrs, Mapping) else None, ended_ns, start)


def _warn_unlinked(request_id: object, why: str) -> None:
    """Said once per process; counted by every running pipeline (there may be none)."""
    for pipeline in live():
        pipeline.counters.add("ignored_request_ids")
    global _warned_unlinked
    if not _warned_unlinked and os.environ.get("OTEL_SDK_DISABLED", "").lower() != "true":
        _warned_unlinked = True
        _logger.warning("otel-metadata: set_request_id(%r) %s, so that request gets no "
                        "metadata (warned once; is tracing set up, and is the call inside a "
                        "span?)", request_id, why)


def context_values(context: Context | None = None) -> Mapping[str, str]:
    """The `metadata_context` values active in `context` (default: the current context)."""
    ctx = get_current() if context is None else context
    values = ctx.get(_CONTEXT_KEY)
    return cast(Mapping[str, str], values) if values is not None else _EMPTY


class metadata_context:  # noqa: N801 - named like the context managers of contextlib
    """Metadata for every request span started inside: a context manager and a decorator.

    ``with metadata_context(user_id="u1", plan="pro"):`` — nested contexts merge, the inner
    winning per key. ``propagate=True`` also writes W3C baggage entries (``user.id``,
    ``gen_ai.conversation.id``, ``promptlayer.metadata.<key>``) so downstream services running
    this processor get them; beware that baggage travels in clear in outgoing request headers,
    to every service you call, including third parties.
    """

    def __init__(
        self,
        user_id: object = None,
        conversation_id: object = None,
        *,
        propagate: bool = False,
        **metadata: object,
    ) -> None:
        given = {"user_id": user_id, "conversation_id": conversation_id, **metadata}
        values: dict[str, str] = {}
        for key, value in given.items():
            if value is None:
                continue
            text = stringify(value)
            if text is None:
                raise TypeError(f"metadata_context: {key}={value!r} is a "
                                f"{type(value).__name__}; use str, bool, int, float or a list")
            values[key] = text
        self._values = values
        self._propagate = propagate
        self._tokens: list[object] = []

    def _context(self) -> Context:
        ctx = get_current()
        merged = {**context_values(ctx), **self._values}
        ctx = set_value(_CONTEXT_KEY, MappingProxyType(merged), ctx)
        if self._propagate:
            for key, value in self._values.items():
                name = _BAGGAGE_NAMES.get(key, METADATA_PREFIX + key)
                ctx = baggage.set_baggage(name, value, ctx)
        return ctx

    def __enter__(self) -> Mapping[str, str]:
        ctx = self._context()
        self._tokens.append(attach(ctx))
        return context_values(ctx)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        detach(self._tokens.pop())  # type: ignore[arg-type]

    def _fresh(self) -> metadata_context:
        """A copy per call, so one decorator serves concurrent calls in many threads/tasks."""
        clone = metadata_context.__new__(metadata_context)
        clone._values, clone._propagate, clone._tokens = self._values, self._propagate, []
        return clone

    def __call__(self, func: F) -> F:
        if inspect.iscoroutinefunction(func):
            @functools.wraps(func)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                with self._fresh():
                    return await func(*args, **kwargs)

            return cast(F, async_wrapper)

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self._fresh():
                return func(*args, **kwargs)

        return cast(F, wrapper)
