"""One pipeline: intake → lineage join → record store → delivery → transport (SPEC §6, §7).

Every source feeds a `Pipeline` the same way: the SDK processor (`processor.py`) and the OTLP
receiver each build one from resolved `config.Settings` and hand spans to its `intake`. Flush,
shutdown and fork keep one order for the whole of it: join what was handed over, release what
the join holds, then flush delivery. Live pipelines are known (weakly) so that
`set_request_id` can reach them.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry.metrics import MeterProvider

from .config import Settings
from .conventions import chosen
from .delivery import Delivery
from .forking import ForkGuard
from .intake import MAX_BACKLOG, SPOOL_GATHER_S, Intake, Started
from .lineage import TraceJoin
from .mapping import MappingRules, RequestId, map_values
from .metrics import Metrics
from .queue import RecordQueue, RecordStore
from .retry import RetryPolicy
from .stats import Stats
from .transport import Transport

if TYPE_CHECKING:
    from .spool import SpoolQueue

_logger = logging.getLogger("otel_metadata")

# Counters worth a line at shutdown when not zero (`spooled`: kept for the next process).
_TROUBLE = ("dropped", "rejected", "ignored", "truncated", "errors", "spooled")

_live: weakref.WeakSet[Pipeline] = weakref.WeakSet()


class Pipeline:
    """The running parts behind one source. Needs an API key (`settings.api_key`)."""

    def __init__(self, settings: Settings, retry: RetryPolicy | None = None,
                 meter_provider: MeterProvider | None = None,
                 component_type: str = "otel_metadata_span_processor") -> None:
        assert settings.api_key is not None
        self.settings = s = settings
        self.counters = Stats()
        self.rules = MappingRules(s.request_id_attributes, s.extra_attributes,
                                  s.max_value_length, chosen(s.conventions))
        self._is_shutdown = False
        self._flushed_losses = 0  # `counters.losses` when the previous flush returned
        self._spool: SpoolQueue | None = None  # the store, when it is durable
        self.delivery = Delivery(self._store(), self._transport(), s, self.counters, retry)
        self.join = TraceJoin(self.delivery.submit, static=map_values(s.metadata, self.rules,
                              self.counters), max_traces=s.max_traces,
                              max_wait_s=s.max_trace_wait_s, stats=self.counters,
                              required=s.required_keys,
                              hold=self._hold if s.spool_dir else None)
        self.delivery.on_drop = self.join.unsend
        self.intake = Intake(self.join, self.rules, self.counters, max_wait_s=s.max_trace_wait_s,
                             gather_s=SPOOL_GATHER_S if s.spool_dir else None)
        self.intake.store_full = lambda: len(self.delivery) >= s.max_queue_size
        self.metrics = Metrics(self.counters.snapshot, queue_size=lambda: len(self.delivery),
                               handoff_size=lambda: len(self.intake),
                               handoff_capacity=MAX_BACKLOG, meter_provider=meter_provider,
                               component_type=component_type)
        self.delivery.on_post = self.metrics.posted
        self._fork_guard = ForkGuard(self._after_fork)
        if self._fork_guard.polling:
            self.intake.poll_forks(self._fork_guard.check)
        _live.add(self)

    def _store(self) -> RecordStore:
        """In memory, or a spool file of this process's own in `spool_dir` (in a forked child
        too: the spool disowns the parent's file there), which adopts on a timer of its own."""
        s = self.settings
        if not s.spool_dir:
            return RecordQueue(s.max_queue_size, s.max_export_batch_size, s.schedule_delay_s)
        from .spool import ADOPT_EVERY_S, SpoolQueue  # fcntl: not on every platform

        self._spool = SpoolQueue(s.spool_dir, s.max_queue_size, s.max_export_batch_size,
                                 s.schedule_delay_s, stats=self.counters,
                                 max_spool_bytes=s.max_spool_bytes, synchronous=s.spool_sync,
                                 adopt_every_s=ADOPT_EVERY_S)
        return self._spool

    def _hold(self, request_id: RequestId, metadata: dict[str, str]) -> None:
        """A request span the join holds: on disk now, with what is known (`SpoolQueue.hold`)."""
        spool = self._spool
        if spool is not None:
            spool.hold(request_id, metadata)

    def _transport(self) -> Transport:
        assert self.settings.api_key is not None
        return Transport(self.settings.endpoint, self.settings.api_key,
                         self.settings.max_concurrency, self.counters)

    def link(self, request_id: RequestId, trace_id: int, span_id: int, parent: Any,
             attrs: Mapping[str, Any] | None, ended_ns: int | None,
             started: Started | None) -> None:
        """Link a request ID to a span (see `Intake.link`)."""
        self._fork_guard.check()
        self.intake.link(request_id, trace_id, span_id, parent, attrs, ended_ns, started)

    def force_flush(self, timeout_millis: float = 30000) -> bool:
        """Post every held trace now, then wait for delivery: True when everything recorded
        before the call was delivered and nothing was lost since the previous flush."""
        if not isinstance(timeout_millis, (int, float)) or isinstance(timeout_millis, bool):
            timeout_millis = 30000
        self._fork_guard.check()
        timeout_s = timeout_millis / 1000
        deadline = time.monotonic() + timeout_s
        before = self._flushed_losses
        ok = (self.intake.release(timeout_s)
              and self.delivery.force_flush(max(0.0, deadline - time.monotonic())))
        self._flushed_losses = losses = self.counters.losses
        return ok and losses == before

    def shutdown(self, timeout_s: float | None = None) -> None:
        """Flush, then stop the threads, within `timeout_s` (default `shutdown_timeout`,
        whatever the export timeout: a process's exit is never held longer); safe to call
        twice."""
        if self._is_shutdown:
            return
        self._is_shutdown = True
        _live.discard(self)
        if timeout_s is None:
            timeout_s = self.settings.shutdown_timeout_s
        deadline = time.monotonic() + timeout_s
        try:
            self.intake.shutdown(timeout_s)
            self.delivery.shutdown(max(0.0, deadline - time.monotonic()))
        except Exception:  # never let our trouble break the provider's shutdown at exit
            _logger.exception("otel-metadata: shutdown failed")
        self.join.clear()
        self.metrics.close()
        self.report("at shutdown")

    def report(self, when: str, waiting: int = 0) -> None:
        """Log the losses so far (and records still `waiting`), if any: once, at the end."""
        counts = self.stats()
        trouble = {k: v for k, v in counts.items() if k.startswith(_TROUBLE) and v}
        if waiting:
            spool = self._spool
            trouble["kept in the spool" if spool is not None and spool.durable
                    else "not yet delivered"] = waiting
        if trouble:
            _logger.warning("otel-metadata: %s: %s (delivered %d)", when,
                            ", ".join(f"{k}={v}" for k, v in sorted(trouble.items())),
                            counts.get("delivered", 0))

    def waiting(self) -> int:
        """Records not delivered yet: queued or in flight."""
        return len(self.delivery)

    def stats(self) -> dict[str, int]:
        """Counts of what happened so far, plus what waits: never waits itself."""
        counts = self.counters.snapshot()
        counts["held_traces"] = len(self.join)
        counts["backlog"] = len(self.intake)
        return counts

    def _after_fork(self) -> None:
        if self._is_shutdown:
            return
        self.counters.reset_after_fork()
        self._flushed_losses = 0
        self.join.clear()
        self.intake.after_fork()
        self.delivery.after_fork(self._store(), self._transport())


def live() -> list[Pipeline]:
    """The pipelines running in this process (for `set_request_id`)."""
    return list(_live)
