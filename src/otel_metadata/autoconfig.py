"""Zero-code setup: the ``promptlayer_metadata`` exporter that OpenTelemetry finds by entry point.

``OTEL_TRACES_EXPORTER=promptlayer_metadata`` (or an ``OTEL_CONFIG_FILE`` naming
``promptlayer_metadata`` as a span exporter) makes the SDK load `PromptLayerMetadataExporter` from
the ``opentelemetry_traces_exporter`` entry-point group, build it with no arguments (or with the
file's YAML keys as keyword arguments) and wrap it in its own `BatchSpanProcessor`.

That wrapper is not enough for this package (SPEC §6, §7): it only sees spans that ended and were
sampled, never a span start (where `metadata_context` and baggage are read) nor a ``RECORD_ONLY``
span. So the exporter is only a handle: building it installs one real `MetadataSpanProcessor` on
the tracer provider being configured, and `export()` ignores the batches it is handed. Every span
is therefore processed once, by that processor, whatever the wrapper does.

Which provider: the environment-variable path of the SDK makes its provider global before it builds
exporters, so the constructor installs at once. The configuration-file path builds exporters before
its provider becomes global; the exporter then waits, and `install_pending` installs it as soon as
the provider is global. ``opentelemetry-instrument`` calls `install_pending` itself, through this
package's ``opentelemetry_pre_instrument`` entry point, after configuring the SDK and before the
app runs.

At most one processor per provider: a second exporter (the name listed twice, two span processors
in a configuration file) or a processor the app added itself are reused, never doubled.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from . import config
from .processor import MetadataSpanProcessor
from .retry import RetryPolicy

_logger = logging.getLogger("otel_metadata")

#: The name to put in ``OTEL_TRACES_EXPORTER`` or under ``span_exporter`` in a config file.
EXPORTER_NAME = "promptlayer_metadata"

# The settings' arguments (config.py declares each once), and the processor's own objects.
_OPTION_NAMES = config.ARGUMENTS | {"retry", "meter_provider"}

_lock = threading.Lock()
# provider -> (its processor, the options it was built with); weak, so a test's provider can go.
_installed: weakref.WeakKeyDictionary[TracerProvider, tuple[MetadataSpanProcessor, dict[str, Any]]]
_installed = weakref.WeakKeyDictionary()
_pending: list[PromptLayerMetadataExporter] = []


class PromptLayerMetadataExporter(SpanExporter):
    """The ``promptlayer_metadata`` trace exporter: installs a `MetadataSpanProcessor`.

    Takes the keyword arguments of `MetadataSpanProcessor` (all optional; the environment fills
    in the rest, SPEC §8). Unknown names are dropped with a warning, and a ``retry`` given as a
    mapping (as a configuration file does) becomes a `RetryPolicy`: configuration never crashes
    the app. `export()` does nothing: the installed processor handles every span.
    """

    def __init__(self, **options: Any) -> None:
        self._options = _processor_options(options)
        self._processor: MetadataSpanProcessor | None = None
        provider = trace.get_tracer_provider()
        if not isinstance(provider, TracerProvider):
            with _lock:
                _pending.append(self)
            return
        self._processor = _install_or_log(provider, self._options)

    def __repr__(self) -> str:
        return f"PromptLayerMetadataExporter(processor={self._processor!r})"

    @property
    def processor(self) -> MetadataSpanProcessor | None:
        """The processor this exporter installed or reused; None until a provider is global."""
        return self._processor

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Ignore the batch: the installed processor has seen (or will see) these spans."""
        if self._processor is None and install_pending():
            _logger.warning(
                "otel-metadata: the %s exporter found its tracer provider only when spans "
                "had already ended; those got no metadata. After configuring the SDK yourself, "
                "call otel_metadata.autoconfig.install_pending().", EXPORTER_NAME)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        """Nothing to do: the provider shuts the installed processor down itself."""

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Nothing held here; ``provider.force_flush()`` flushes the processor itself."""
        return True


def install(provider: TracerProvider, **options: Any) -> MetadataSpanProcessor:
    """Add a `MetadataSpanProcessor` built with `options` to `provider`, unless it has one.

    Returns the processor now on `provider`. When one is there already (installed by an earlier
    exporter, or added by the app), it is reused and `options` are ignored, with a warning when
    they differ from the ones it was built with: two processors would post everything twice.
    """
    options = _processor_options(options)
    with _lock:
        known = _installed.get(provider)
        if known is None:
            found = _processor_on(provider)
            if found is not None:
                _logger.info("otel-metadata: the tracer provider already has %r; the %s "
                             "exporter uses it", found, EXPORTER_NAME)
                _installed[provider] = (found, options)
                return found
            processor = MetadataSpanProcessor(**options)
            provider.add_span_processor(processor)
            _installed[provider] = (processor, options)
            return processor
        processor, first_options = known
        differing = sorted(k for k in {*options, *first_options}
                           if options.get(k) != first_options.get(k))
        if differing:
            _logger.warning(
                "otel-metadata: a second %s exporter with other values for %s was ignored: a "
                "provider gets one metadata processor, built with the first one's options",
                EXPORTER_NAME, ", ".join(differing))
        return processor


def install_pending() -> bool:
    """Install the processor of every exporter still waiting for a global SDK tracer provider.

    ``opentelemetry-instrument`` calls this after configuring the SDK (entry point group
    ``opentelemetry_pre_instrument``). Call it yourself after configuring the SDK from a file in
    code (``configure_sdk(load_config_file(path))``). Returns True when exporters were waiting;
    does nothing until the global tracer provider is an SDK one.
    """
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        return False
    with _lock:
        waiting = list(_pending)
        _pending.clear()
    for exporter in waiting:
        exporter._processor = _install_or_log(provider, exporter._options)
    return bool(waiting)


def _install_or_log(
    provider: TracerProvider, options: dict[str, Any],
) -> MetadataSpanProcessor | None:
    """`install`, except that a bug of ours is logged instead of stopping the SDK's setup
    (of the app's other exporters, and of every instrumentation after it)."""
    try:
        return install(provider, **options)
    except Exception:
        _logger.exception("otel-metadata: could not start the metadata processor; "
                          "no metadata will be sent")
        return None


def installed_processor(provider: TracerProvider | None = None) -> MetadataSpanProcessor | None:
    """The processor zero-code setup installed on `provider` (default: the global one), if any.

    For apps that never built the processor themselves but want its ``stats()`` or a
    ``force_flush()`` before a short-lived process exits.
    """
    target = trace.get_tracer_provider() if provider is None else provider
    if not isinstance(target, TracerProvider):
        return None
    with _lock:
        known = _installed.get(target)
    return known[0] if known is not None else None


def _processor_on(provider: TracerProvider) -> MetadataSpanProcessor | None:
    """A `MetadataSpanProcessor` the app already added to `provider`, if the SDK lets us see it."""
    multi = getattr(provider, "_active_span_processor", None)
    for processor in getattr(multi, "_span_processors", ()):
        if isinstance(processor, MetadataSpanProcessor):
            return processor
    return None


def _processor_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The options `MetadataSpanProcessor` takes; others are dropped with a warning."""
    unknown = sorted(set(options) - _OPTION_NAMES)
    if unknown:
        _logger.warning("otel-metadata: ignoring unknown %s option(s) %s; known: %s",
                        EXPORTER_NAME, ", ".join(unknown), ", ".join(sorted(_OPTION_NAMES)))
    kept = {k: v for k, v in options.items() if k in _OPTION_NAMES}
    retry = kept.get("retry")
    if retry is not None and not isinstance(retry, RetryPolicy):
        try:
            kept["retry"] = RetryPolicy(**retry)
        except TypeError as exc:  # not a mapping, or not RetryPolicy's fields
            _logger.warning("otel-metadata: ignoring %s option retry=%r (%s); using the "
                            "default policy", EXPORTER_NAME, retry, exc)
            del kept["retry"]
    return kept
