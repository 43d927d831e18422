"""Metadata whatever the trace sampling (SPEC §11): record what the sampler would drop.

A dropped span is not recording, so no span processor sees it end and its PromptLayer request
would get no metadata. `MetadataSampler` turns the wrapped sampler's ``DROP`` into
``RECORD_ONLY``: the span is recorded, so `MetadataSpanProcessor` sees it, but stays not
sampled, so the SDK's export processors (batch and simple), which pass on sampled spans only,
still export just the sampled fraction, and its context still says "not sampled" downstream.

``OTEL_TRACES_SAMPLER=promptlayer_metadata_traceidratio`` with ``OTEL_TRACES_SAMPLER_ARG=0.05``
gives the same with environment variables alone (`traceidratio_sampler`, found by the SDK's
configurator through the ``opentelemetry_traces_sampler`` entry point).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from opentelemetry.context import Context
from opentelemetry.sdk.trace.sampling import (
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import Link, SpanKind
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import Attributes

_logger = logging.getLogger("otel_metadata")

_DROP = Decision.DROP
_RECORD_ONLY = Decision.RECORD_ONLY

#: The name to put in ``OTEL_TRACES_SAMPLER``.
SAMPLER_NAME = "promptlayer_metadata_traceidratio"


class MetadataSampler(Sampler):
    """Wraps any sampler; where it says ``DROP``, says ``RECORD_ONLY`` instead.

    Every other decision is the wrapped sampler's, unchanged (the same result object). A drop
    becomes a recorded, not sampled span with the wrapped result's trace state and the span's
    own start attributes (plus any the wrapped sampler added): the SDK's samplers return no
    attributes with a drop, and the SDK gives a span the attributes of its sampling result, so
    passing a drop's empty ones on would strip ``promptlayer.request_id`` from a request span
    started with it.

    Beware, with a parent-based sampler: a child of a not-sampled parent is dropped by the
    wrapped sampler and so recorded here too, so the whole trace of a request stays visible to
    `MetadataSpanProcessor`, and none of it is exported.
    """

    def __init__(self, sampler: Sampler) -> None:
        self._sampler = sampler
        self._should_sample = sampler.should_sample

    @property
    def sampler(self) -> Sampler:
        """The wrapped sampler."""
        return self._sampler

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        result = self._should_sample(parent_context, trace_id, name, kind, attributes, links,
                                     trace_state)
        if result.decision is not _DROP:
            return result
        kept: Attributes = result.attributes
        if attributes:
            kept = {**attributes, **kept} if kept else attributes
        return SamplingResult(_RECORD_ONLY, kept, result.trace_state)

    def get_description(self) -> str:
        return f"MetadataSampler{{{self._sampler.get_description()}}}"


def traceidratio_sampler(arg: str | float | None = None) -> MetadataSampler:
    """``promptlayer_metadata_traceidratio``: the SDK's ``parentbased_traceidratio``, wrapped.

    The SDK's configurator calls this with ``OTEL_TRACES_SAMPLER_ARG`` (a string, or None when
    unset). Like the SDK's own ratio samplers, an unset argument means ratio 1.0; one that is
    not a number in [0, 1] is warned about and means 1.0 too (the SDK's default), rather than
    failing the configurator, which would fall back to a sampler without the wrapper.
    """
    rate = 1.0
    if arg is not None and (not isinstance(arg, str) or arg.strip()):
        try:
            rate = float(arg)
        except ValueError:
            rate = -1.0
        if not 0.0 <= rate <= 1.0:
            _logger.warning("otel-metadata: OTEL_TRACES_SAMPLER_ARG=%r is not a ratio between 0 "
                            "and 1; %s samples every trace (ratio 1.0)", arg, SAMPLER_NAME)
            rate = 1.0
    return MetadataSampler(ParentBased(TraceIdRatioBased(rate)))
