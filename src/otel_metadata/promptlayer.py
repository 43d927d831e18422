"""Every request ID the PromptLayer SDK obtains, linked to the span where the app made the call.

``PromptLayerInstrumentor().instrument()`` (or ``opentelemetry-instrument``, which loads it by the
``opentelemetry_instrumentor`` entry point whenever ``promptlayer`` is importable) wraps the
``promptlayer`` SDK, 1.4.x and 1.5.x, so the app needs no ``set_request_id`` (SPEC §3a). Where the
SDK gets its request IDs (the same in both versions):

- ``run()`` / ``AsyncPromptLayer.run()``: ``_track_request_log`` posts ``/track-request`` and
  answers ``request_id``; also on the error path, where a failing LLM call is logged with
  ``status="ERROR"`` before ``run()`` raises. A streamed run posts only once the stream is
  consumed, through the callable ``_create_track_request_callable`` builds inside ``run()``.
- ``log_request()`` (sync, async): the ``id`` of the ``/log-request`` answer.
- The ``client.openai`` / ``client.anthropic`` proxies (``PromptLayerBase.__call__``):
  ``utils.promptlayer_api_request`` posts ``/track-request``; it returns the ID only with
  ``return_pl_id``, so without it the ID is read from the answer of that same POST. A streamed
  answer (``utils.GeneratorProxy``) posts when its last chunk is read; an async call, when
  awaited.

The span and the OpenTelemetry context are captured when the app's call starts (the outermost
PromptLayer call, so before the SDK's own tracing starts its spans), kept in a ContextVar through
the SDK's inner calls, and kept with the stream or the bound callable for what happens later.
The app gets exactly what the SDK returns. Our code runs inside ``try``: a failure of ours
leaves the SDK call as it would be, and a request ID we cannot link is logged at debug level.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import weakref
from collections.abc import Callable, Collection, Coroutine, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import wrapt
from opentelemetry import trace
from opentelemetry.context import Context, get_current
from opentelemetry.instrumentation.dependencies import get_dependency_conflicts
from opentelemetry.instrumentation.instrumentor import (  # type: ignore[attr-defined]
    BaseInstrumentor,
)
from opentelemetry.instrumentation.utils import unwrap
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider

from .autoconfig import _processor_on
from .context import link_request_id
from .pipeline import live

_logger = logging.getLogger("otel_metadata")

SUPPORTED = "promptlayer >= 1.4, < 1.6"
_warned_version = False


@dataclass(frozen=True)
class _Call:
    """Where the app made a PromptLayer call: the span then current, and the whole context."""

    span: trace.Span
    context: Context


# The app's PromptLayer call in progress, seen by the SDK's inner calls.
_CALL: ContextVar[_Call | None] = ContextVar("otel_metadata.promptlayer.call", default=None)
# The answers to the SDK's POSTs inside one `promptlayer_api_request`.
_POSTED: ContextVar[list[Any] | None] = ContextVar("otel_metadata.promptlayer.posted",
                                                   default=None)
# A streamed proxy answer -> the call it answers (its last chunk is read later, anywhere).
_STREAMS: weakref.WeakKeyDictionary[Any, _Call] = weakref.WeakKeyDictionary()

IdOf = Callable[[Any], object]


def _begin() -> _Call | None:
    """The call in progress, or a new one from the current context; None if that fails."""
    try:
        call = _CALL.get()
        if call is None:
            ctx = get_current()
            call = _Call(trace.get_current_span(ctx), ctx)
        return call
    except Exception:  # noqa: BLE001 - never into the app
        _logger.debug("otel-metadata: could not capture a PromptLayer call", exc_info=True)
        return None


def _link(call: _Call, id_of: IdOf, result: Any) -> None:
    """Link the request ID `id_of(result)` (if any) to where `call` was made; never raises."""
    try:
        request_id = id_of(result)
        if request_id is not None:
            link_request_id(request_id, call.span, call.context)  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - a bad or unlinkable ID is not the app's problem
        _logger.debug("otel-metadata: could not link a PromptLayer request ID", exc_info=True)


def _invoke(call: _Call | None, fn: Callable[..., Any], args: Any, kwargs: Any,
            id_of: IdOf | None = None) -> Any:
    """``fn(*args, **kwargs)`` inside `call`; then link ``id_of(result)``, once awaited if async."""
    if call is None:
        return fn(*args, **kwargs)
    token = _CALL.set(call)
    try:
        result = fn(*args, **kwargs)
    finally:
        _CALL.reset(token)
    if inspect.iscoroutine(result):
        return _finish(call, result, id_of)
    if id_of is not None:
        _link(call, id_of, result)
    return result


async def _finish(call: _Call, coro: Coroutine[Any, Any, Any], id_of: IdOf | None) -> Any:
    token = _CALL.set(call)
    try:
        result = await coro
    finally:
        _CALL.reset(token)
    if id_of is not None:
        _link(call, id_of, result)
    return result


def _get(key: str) -> IdOf:
    """The value of `key` in a dict answer (None for anything else)."""
    return lambda answer: answer.get(key) if isinstance(answer, Mapping) else None


_REQUEST_ID, _LOG_ID = _get("request_id"), _get("id")


# The wrappers, wrapt's signature: (wrapped, instance, args, kwargs).

def _scoped(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    """An app-facing call (`run`, a proxy call): its inner calls see where it was made."""
    return _invoke(_begin(), wrapped, args, kwargs)


def _linking(id_of: IdOf) -> Callable[[Any, Any, Any, Any], Any]:
    """A call whose answer carries a request ID (`_track_request_log`, `log_request`)."""
    def wrapper(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        return _invoke(_begin(), wrapped, args, kwargs, id_of)
    return wrapper


def _track_callable(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    """`_create_track_request_callable`: bind the callable a stream calls when consumed."""
    call = _begin()
    made = _invoke(call, wrapped, args, kwargs)
    if call is None:
        return made
    if inspect.iscoroutine(made):  # AsyncPromptLayer's is async
        return _bind_later(call, made)
    return _bind(call, made)


def _bind(call: _Call, track: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(track)
    def bound(*args: Any, **kwargs: Any) -> Any:
        return _invoke(call, track, args, kwargs, _REQUEST_ID)
    return bound


async def _bind_later(call: _Call, made: Coroutine[Any, Any, Any]) -> Callable[..., Any]:
    return _bind(call, await made)


def _api_request(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    """`utils.promptlayer_api_request` (the proxies): link the ID its POST was answered with."""
    call = _begin()
    if call is None:
        return wrapped(*args, **kwargs)
    posted: list[Any] = []
    token = _POSTED.set(posted)
    try:
        result = _invoke(call, wrapped, args, kwargs)
    finally:
        _POSTED.reset(token)
    _link(call, _request_id_of_post if not kwargs.get("return_pl_id") else _same, (result, posted))
    return result


def _same(pair: tuple[Any, list[Any]]) -> object:
    return pair[0]


def _request_id_of_post(pair: tuple[Any, list[Any]]) -> object:
    """The request ID in the answer to the POST, as the SDK reads it with ``return_pl_id``."""
    posted = pair[1]
    if not posted or getattr(posted[-1], "status_code", None) != 200:
        return None
    return _REQUEST_ID(posted[-1].json())


class _RecordingSession:
    """The SDK's `requests.Session`, keeping the answers to its POSTs in `posted`."""

    __slots__ = ("_session", "_posted")

    def __init__(self, session: Any, posted: list[Any]) -> None:
        self._session, self._posted = session, posted

    def post(self, *args: Any, **kwargs: Any) -> Any:
        answer = self._session.post(*args, **kwargs)
        self._posted.append(answer)
        return answer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


def _session(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    """`utils._get_requests_session`: recording inside `promptlayer_api_request` only."""
    session = wrapped(*args, **kwargs)
    posted = _POSTED.get()
    return session if posted is None else _RecordingSession(session, posted)


def _stream_init(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    """`GeneratorProxy.__init__`: remember the call a streamed answer belongs to."""
    wrapped(*args, **kwargs)
    call = _CALL.get()
    if call is not None:
        try:
            _STREAMS[instance] = call
        except Exception:  # noqa: BLE001 - never into the app
            _logger.debug("otel-metadata: could not follow a PromptLayer stream", exc_info=True)


def _in_stream(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    """A `GeneratorProxy` step (a chunk, entering, ``text_stream``), inside its call."""
    return _invoke(_STREAMS.get(instance), wrapped, args, kwargs)


# (module, attribute, wrapper) for everything patched; identical in 1.4.x and 1.5.x.
class _ParentLinks(SpanProcessor):
    """On PromptLayer's private tracer provider: tells our pipelines where each of its spans
    sits, so a request linked to a span nested in several `pl.traceable` spans still finds the
    app's spans above them. Carries nothing else (no attributes leave PromptLayer's spans)."""

    def on_end(self, span: ReadableSpan) -> None:
        try:
            ctx = span.context
            for pipeline in live():
                pipeline.intake.ended(ctx.trace_id, ctx.span_id, span.parent, {}, None, None)
        except Exception:  # never into the SDK's span.end()
            _logger.debug("otel-metadata: could not note a PromptLayer span", exc_info=True)


def _client_init(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    """`PromptLayer.__init__`: a private tracer provider (tracing on, no `tracer_provider=`)
    gets `_ParentLinks`; a provider our processor is on sees PromptLayer's spans already."""
    done = wrapped(*args, **kwargs)
    try:
        provider = getattr(instance, "tracer_provider", None)
        if isinstance(provider, TracerProvider) and _processor_on(provider) is None:
            provider.add_span_processor(_ParentLinks())
    except Exception:
        _logger.debug("otel-metadata: could not watch PromptLayer's tracer", exc_info=True)
    return done


_PATCHES: tuple[tuple[str, str, Callable[[Any, Any, Any, Any], Any]], ...] = (
    ("promptlayer.promptlayer", "PromptLayer.__init__", _client_init),
    ("promptlayer.promptlayer", "AsyncPromptLayer.__init__", _client_init),
    ("promptlayer.promptlayer", "PromptLayer.run", _scoped),
    ("promptlayer.promptlayer", "AsyncPromptLayer.run", _scoped),
    ("promptlayer.promptlayer", "PromptLayer._track_request_log", _linking(_REQUEST_ID)),
    ("promptlayer.promptlayer", "AsyncPromptLayer._track_request_log", _linking(_REQUEST_ID)),
    ("promptlayer.promptlayer", "PromptLayer._create_track_request_callable", _track_callable),
    ("promptlayer.promptlayer", "AsyncPromptLayer._create_track_request_callable",
     _track_callable),
    ("promptlayer.promptlayer", "PromptLayer.log_request", _linking(_LOG_ID)),
    ("promptlayer.promptlayer", "AsyncPromptLayer.log_request", _linking(_LOG_ID)),
    ("promptlayer.promptlayer_base", "PromptLayerBase.__call__", _scoped),
    ("promptlayer.utils", "promptlayer_api_request", _api_request),
    ("promptlayer.utils", "_get_requests_session", _session),
    ("promptlayer.utils", "GeneratorProxy.__init__", _stream_init),
    ("promptlayer.utils", "GeneratorProxy._abstracted_next", _in_stream),
    ("promptlayer.utils", "GeneratorProxy.__enter__", _in_stream),
    ("promptlayer.utils", "GeneratorProxy.__aenter__", _in_stream),
    ("promptlayer.utils", "GeneratorProxy.__getattr__", _in_stream),
)


def _owner(module: str, attribute: str) -> tuple[Any, str]:
    """The object holding `attribute` ("Class.method" or "function") and its last name."""
    owner: Any = importlib.import_module(module)
    *path, name = attribute.split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, name


class PromptLayerInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Links the request IDs of PromptLayer SDK calls to the app's spans, with no code at the call.

    ``PromptLayerInstrumentor().instrument()`` once at start-up, or nothing under
    ``opentelemetry-instrument`` (``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=promptlayer`` turns it
    off). Another SDK version than 1.4.x/1.5.x: one warning, nothing patched.
    """

    def instrumentation_dependencies(self) -> Collection[str]:
        return (SUPPORTED,)

    def _instrument(self, **kwargs: Any) -> None:
        # opentelemetry-instrument calls this with the dependency check skipped: check here.
        conflict = get_dependency_conflicts([SUPPORTED])
        if conflict is not None:
            global _warned_version
            if conflict.found is not None and not _warned_version:
                _warned_version = True
                _logger.warning("otel-metadata: %s is not supported (%s), so PromptLayer "
                                "request IDs are not linked automatically; use "
                                "set_request_id", conflict.found, SUPPORTED)
            return
        for module, attribute, wrapper in _PATCHES:
            wrapt.wrap_function_wrapper(module, attribute, wrapper)

    def _uninstrument(self, **kwargs: Any) -> None:
        for module, attribute, _ in _PATCHES:
            unwrap(*_owner(module, attribute))
