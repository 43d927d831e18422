"""Self-metrics through the OpenTelemetry metrics API (SPEC §11).

What a dashboard needs to see whether metadata is arriving: records queued, delivered, retried
and dropped by reason; how full the hand-off and the record queue are; how long POSTs take and
what they are answered. Names follow the semantic conventions for SDK self-metrics
(``otel.sdk.*``) where one applies, our ``otel_metadata.`` prefix otherwise; every attribute
has a handful of values (never a request or user ID).

Counts are not forwarded one by one: the counters are *observable*, read from the pipeline's
`stats.Stats` snapshot when a metric reader collects (every 60 s by default). So counting costs
the app and our threads nothing more than `Stats.add` already does, with or without a meter
provider, and a global meter provider set after the pipeline was built still gets every count
since the start (the API's proxy hands our instruments and callbacks to it). The POST duration
histogram is the one instrument recorded as things happen, once per POST on a sender thread.

With the API's no-op meter provider given (or set globally) nothing is created at all.
"""

from __future__ import annotations

import itertools
import logging
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from opentelemetry.metrics import (
    CallbackOptions,
    MeterProvider,
    NoOpMeterProvider,
    Observation,
    get_meter_provider,
)

_logger = logging.getLogger("otel_metadata")

METER_NAME = "otel_metadata"

# Observable counters: instrument name -> (unit, description, Stats counter name or prefix,
# the attribute that carries what follows the prefix). A prefix ends with a dot.
COUNTERS: tuple[tuple[str, str, str, str, str | None], ...] = (
    ("otel_metadata.record.queued", "{record}",
     "Records handed to the queue (updates of one request ID coalesce).", "queued", None),
    ("otel_metadata.record.delivered", "{record}",
     "Records PromptLayer answered with a 2xx.", "delivered", None),
    ("otel_metadata.record.retried", "{retry}",
     "POSTs retried after a 429, a 5xx, a timeout or a connection error.", "retried", None),
    ("otel_metadata.record.dropped", "{record}",
     "Records (or request spans) lost, by cause in error.type.", "dropped.", "error.type"),
    ("otel_metadata.record.missing_key", "{record}",
     "Records posted without a required key, by key.", "missing.", "otel_metadata.key"),
)
# Observable up-down counters (sizes now): name -> (unit, description, the Metrics callable).
SIZES: tuple[tuple[str, str, str, str], ...] = (
    ("otel.sdk.processor.span.queue.size", "{span}",
     "Ended spans handed to the metadata worker and not joined yet.", "handoff_size"),
    ("otel.sdk.processor.span.queue.capacity", "{span}",
     "The most spans the metadata worker's hand-off holds.", "handoff_capacity"),
    ("otel_metadata.queue.size", "{record}", "Records waiting to be posted or in flight.",
     "queue_size"),
)
POST_DURATION = "otel_metadata.post.duration"
# The HTTP semantic conventions' advisory boundaries for request durations, in seconds.
_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                     10.0)
# Distinct (status, error) attribute sets kept ready for the histogram; beyond, built per POST.
_MAX_CACHED_ATTRIBUTES = 64

_Attributes = dict[str, Any]


class Metrics:
    """One pipeline's self-metrics, on the given meter provider (default: the global one).

    `counts` returns cumulative counts by `Stats` name (`Stats.snapshot`); `queue_size` and
    `handoff_size` return how many records and spans wait now; `handoff_capacity` is the
    hand-off's bound. Callbacks run on the metric reader's thread and must not block for long.
    Every pipeline is told apart by ``otel.component.name`` (``<type>/<n>``, as the
    conventions say), so two processors in one process report side by side.

    Call `posted` after each POST, and `close` at shutdown (the pipeline's series then stop).
    """

    def __init__(
        self,
        counts: Callable[[], Mapping[str, int]],
        queue_size: Callable[[], int] | None = None,
        handoff_size: Callable[[], int] | None = None,
        handoff_capacity: int | None = None,
        meter_provider: MeterProvider | None = None,
        component_type: str = "otel_metadata_span_processor",
    ) -> None:
        self.counts = counts
        self.queue_size = queue_size
        self.handoff_size = handoff_size
        self.handoff_capacity = (lambda: handoff_capacity) if handoff_capacity is not None \
            else None
        with _lock:
            number = next(_component_ids.setdefault(component_type, itertools.count()))
        self.attributes: Mapping[str, str] = {
            "otel.component.type": component_type,
            "otel.component.name": f"{component_type}/{number}",
        }
        self._post_attributes: dict[tuple[int | None, str | None], _Attributes] = {}
        provider = get_meter_provider() if meter_provider is None else meter_provider
        self._instruments = None if isinstance(provider, NoOpMeterProvider) else \
            _instruments_for(provider, meter_provider is None)
        if self._instruments is None:
            self.posted = _nothing  # type: ignore[method-assign]
        else:
            self._record = self._instruments.duration.record
            with _lock:
                self._instruments.sources.add(self)

    def posted(self, seconds: float, status: int | None, error: str | None = None) -> None:
        """One POST took `seconds`: answered `status`, or none (`error`: the exception's name).

        ``error.type`` is set as the HTTP conventions say: the status for anything not 2xx,
        the error's name when no answer came. Never raises.
        """
        try:
            key = (status, error)
            attributes = self._post_attributes.get(key)
            if attributes is None:
                attributes = dict(self.attributes)
                if status is not None:
                    attributes["http.response.status_code"] = status
                if status is None or not 200 <= status < 300:
                    attributes["error.type"] = str(status) if status is not None else \
                        error or "_OTHER"
                if len(self._post_attributes) < _MAX_CACHED_ATTRIBUTES:
                    self._post_attributes[key] = attributes
            self._record(seconds, attributes)
        except Exception:
            _logger.debug("otel-metadata: recording a POST's duration failed", exc_info=True)

    def close(self) -> None:
        """Stop reporting this pipeline (at its shutdown)."""
        if self._instruments is not None:
            with _lock:
                self._instruments.sources.discard(self)


def _nothing(seconds: float, status: int | None, error: str | None = None) -> None:
    """`Metrics.posted` with the no-op meter provider: not even a dict lookup."""


_Callback = Callable[[CallbackOptions], Iterable[Observation]]


class _Instruments:
    """The instruments of one meter provider, shared by every pipeline reporting to it.

    Shared because a meter hands back the first instrument of a name and ignores the callbacks
    of a second one; each callback reports every live pipeline, told apart by its attributes.
    """

    def __init__(self, provider: MeterProvider) -> None:
        self.sources: weakref.WeakSet[Metrics] = weakref.WeakSet()
        meter = provider.get_meter(METER_NAME)
        for name, unit, description, counter, attribute in COUNTERS:
            meter.create_observable_counter(name, [self._counts(counter, attribute)], unit,
                                            description)
        for name, unit, description, size in SIZES:
            meter.create_observable_up_down_counter(name, [self._size(size)], unit, description)
        self.duration = meter.create_histogram(
            POST_DURATION, "s", "Duration of one POST to PromptLayer's track-metadata API.",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS)

    def _live(self) -> list[Metrics]:
        with _lock:
            return list(self.sources)

    def _counts(self, name: str, attribute: str | None) -> _Callback:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            out = []
            for source in self._live():
                counts = source.counts()
                if attribute is None:
                    out.append(Observation(counts.get(name, 0), source.attributes))
                else:  # one series per what follows the prefix: a reason, a key
                    out.extend(Observation(n, {**source.attributes, attribute: key[len(name):]})
                               for key, n in counts.items() if key.startswith(name))
            return out
        return observe

    def _size(self, size: str) -> _Callback:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(read(), source.attributes) for source in self._live()
                    if (read := getattr(source, size)) is not None]
        return observe


_lock = threading.Lock()
_component_ids: dict[str, itertools.count[int]] = {}
# Instruments per explicit meter provider; one set for the global one, whether it was the API's
# proxy when they were made (the proxy hands them on once a provider is set) or not.
_registry: weakref.WeakKeyDictionary[MeterProvider, _Instruments] = weakref.WeakKeyDictionary()
_global: list[_Instruments] = []


def _instruments_for(provider: MeterProvider, is_global: bool) -> _Instruments:
    with _lock:
        if is_global or provider is get_meter_provider():
            if not _global:
                _global.append(_Instruments(provider))
            return _global[0]
        found = _registry.get(provider)
        if found is None:
            found = _registry[provider] = _Instruments(provider)
        return found
