"""TEMPORARY stand-in for `otel_metadata.pipeline.Pipeline` (issue 10), until main has it.

Only `otel-metadata serve` uses it. It builds one `MetadataSpanProcessor` from resolved settings
and hands decoded spans to the processor's worker the way its `on_end` does, so the receiver can
be tested end to end now. Delete this file and import `Pipeline` from `otel_metadata.pipeline`
once that exists: the receiver only uses `Pipeline(settings)`, `.intake.ended`, `.intake.room`,
`.force_flush`, `.shutdown` and `.stats`, as the brief gives them.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from opentelemetry.sdk.resources import Resource

from .config import Settings
from .processor import _MAX_INBOX, MetadataSpanProcessor
from .retry import RetryPolicy


class _Intake:
    """`Intake.ended` / `Intake.room` over the processor's hand-off."""

    def __init__(self, processor: MetadataSpanProcessor, capacity: int) -> None:
        self._processor = processor
        self._capacity = capacity

    def ended(self, trace_id: int, span_id: int, parent: Any,
              attrs: Mapping[str, Any] | None, started: Any, resource: Resource | None) -> bool:
        p = self._processor
        if p._delivery is None or p._is_shutdown or len(p._inbox) >= self._capacity:
            return False
        if attrs and p._rules.is_relevant(attrs):
            p._inbox.append((trace_id, span_id, parent, attrs, started, resource))
        else:  # the worker joins it only if its trace is held, else notes its parent link
            p._inbox.append((trace_id, span_id, parent, None, None, None))
        if not p._wake.is_set():
            p._wake.set()
        return True

    def room(self) -> int:
        p = self._processor
        if p._delivery is None or p._is_shutdown:
            return 0
        return max(0, self._capacity - len(p._inbox))


class Pipeline:
    """intake -> join -> queue -> delivery, from resolved settings (a processor underneath)."""

    def __init__(self, settings: Settings, *, retry: RetryPolicy | None = None,
                 capacity: int = _MAX_INBOX) -> None:
        s = settings
        self._settings = s
        self._processor = MetadataSpanProcessor(
            api_key=s.api_key, base_url=s.base_url, metadata=s.metadata,
            extra_attributes=s.extra_attributes, request_id_attributes=s.request_id_attributes,
            max_value_length=s.max_value_length, max_concurrency=s.max_concurrency,
            schedule_delay_millis=s.schedule_delay_s * 1000, max_queue_size=s.max_queue_size,
            max_export_batch_size=s.max_export_batch_size,
            export_timeout_millis=s.export_timeout_s * 1000,
            max_trace_wait_millis=s.max_trace_wait_s * 1000, max_traces=s.max_traces,
            request_timeout_s=s.request_timeout_s, retry=retry)
        self.intake = _Intake(self._processor, capacity)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._processor.force_flush(timeout_millis)

    def shutdown(self) -> None:
        """The processor's shutdown, held to `shutdown_timeout` (5 s until settings have it)."""
        timeout = getattr(self._settings, "shutdown_timeout_s", 5.0)
        thread = threading.Thread(target=self._processor.shutdown, daemon=True)
        thread.start()
        thread.join(timeout)

    def stats(self) -> dict[str, int]:
        return self._processor.stats()
