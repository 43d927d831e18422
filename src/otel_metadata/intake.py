"""The intake: every source's spans and request-ID links, handed to one lineage worker (SPEC §7).

Sources (the SDK processor's hooks, the OTLP receiver, the PromptLayer wrapper) call `ended`
and `link` on whatever thread they run on; those calls only append to a bounded deque (the
hand-off) and never wait. One worker thread maps what was handed over and feeds the trace join
in the order it arrived, posts traces whose wait ran out, and sleeps while nothing is held.
`force_flush`, `shutdown` and fork handling keep one order: join what was handed over, release
what the join holds, then flush delivery.

The worker wakes seldom, as a wake-up costs far more CPU than the pass it starts (`_work`): at
most one pass per `GATHER_S` while spans keep coming, woken by nobody; a source wakes it only
when it sleeps idle, or when the hand-off fills past a quarter of its bound.

Beware: most spans carry nothing for us, so `ended` decides that first with set tests (learnt
attribute names), and such a span only leaves its parent link behind: keep that path short.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from opentelemetry.sdk.resources import Resource

from .lineage import LINK_GENERATION, SpanData, TraceJoin
from .mapping import (
    MappingRules,
    RequestId,
    map_attributes,
    map_baggage,
    map_values,
    request_id_of,
)
from .queue import MAX_WAIT_S
from .stats import Stats

_logger = logging.getLogger("otel_metadata")

# Ended spans (and links) handed over and not joined yet, past which spans that carry metadata
# are dropped (counted): the source's thread never waits for the worker.
MAX_BACKLOG = 16_384

# Request IDs refused at the hand-off that are remembered, so each is counted once.
_MAX_REFUSED_IDS = 4096
# The worker's pause between passes while spans keep coming: what it joins waits for the
# queue's schedule delay (seconds) anyway, and held traces expire this much late at most.
GATHER_S = 0.1
# ... with a spool: a span handed over is not on disk until joined, and `kill -9` loses what the
# hand-off holds, so passes come this often instead (more CPU per record, a smaller window).
SPOOL_GATHER_S = 0.01
# While it gathers, the worker is woken early once the hand-off holds MAX_BACKLOG // this: at
# 100 000 spans/s that is 41 ms in, with 120 ms of room left for the pass to start.
_EARLY_WAKE_SHARE = 4
# `Intake._wake_at` while the worker is awake (or already woken): no source wakes it.
_AWAKE = 1 << 62

# What a source hands over for one ended span: trace ID, span ID, parent (a tuple-like
# (trace_id, span_id, is_remote), e.g. an SDK SpanContext; None for a root), the attributes that
# matter (None: nothing for us), what it started under, its resource. What it started under:
# (metadata_context values, baggage) or (metadata_context values, baggage, other tools' context
# values by context key: `MappingRules.context_keys`, or `conventions.CONTEXT_KEYS`).
Started = tuple[Any, ...]
# What `MappingRules.read` makes of a span's attributes: metadata, fallback, request ID.
Read = tuple[dict[str, str], "dict[str, str] | None", "RequestId | None"]
_Item = tuple[int, int, Any, Any, Any, Any]


@dataclass(slots=True)
class _Link:
    """A request ID linked to a span by its context: the span may be open, ended, or another
    tracer provider's (then its parent chain leads to the spans we saw)."""

    request_id: RequestId
    trace_id: int
    span_id: int
    parent: Any
    attrs: Mapping[str, Any] | None
    started: Started | None
    ended: bool


class Intake:
    """The bounded hand-off in front of the trace join, and the worker that drains it."""

    def __init__(self, join: TraceJoin, rules: MappingRules, stats: Stats, *,
                 max_wait_s: float, gather_s: float | None = None) -> None:
        self._join = join
        self._gather_s = GATHER_S if gather_s is None else gather_s
        self._rules = rules
        self._irrelevant = rules.irrelevant
        self._relevant = rules.relevant
        self._stats = stats
        self._max_wait_ns = int(max_wait_s * 1e9)
        self._resource: Resource | None = None
        self._resource_metadata: Mapping[str, str] = {}
        self._is_shutdown = False
        # Called before each hand-off where the platform has no after-fork hook (forking.py).
        self.fork_check: Callable[[], None] | None = None  # set by `poll_forks`
        # Hand-offs at least this long take `_hand_off`'s slow path: MAX_BACKLOG; 0 once shut
        # down, or while forks are polled for.
        self._bound = MAX_BACKLOG
        self.store_full: Callable[[], bool] | None = None  # set by the pipeline
        self._fresh_state()

    def _fresh_state(self) -> None:
        self._inbox: deque[_Item | _Link] = deque()
        # Traces with a span (or link) in the inbox that carries something: their other spans
        # are handed off too. Added by sources before the append, discarded by the worker once
        # that item is joined (then the join holds the trace).
        self._pending: set[int] = set()
        self._refused: OrderedDict[RequestId, None] = OrderedDict()  # counted once each
        self._drain_lock = threading.Lock()
        self._drainer: int | None = None  # the thread inside `_drain_locked`
        self._wake = threading.Event()
        # A hand-off that leaves the inbox longer than this wakes the worker: 0 while it sleeps
        # idle, a share of MAX_BACKLOG while it gathers, `_AWAKE` otherwise (set by `_work`).
        self._wake_at = 0
        thread = threading.Thread(target=self._work, name="otel-metadata-lineage", daemon=True)
        thread.start()

    # -- the sources' side: never raise, never wait --

    def ended(self, trace_id: int, span_id: int, parent: Any, attrs: Mapping[str, Any],
              started: Started | None, resource: Resource | None) -> bool:
        """A span ended. False when it carried metadata and was refused (backlog, shutdown):
        a receiver answers that with backpressure."""
        # `MappingRules.is_relevant`, spelled out to save a call on every span: most spans carry
        # nothing for us and are told by one set test in C.
        if not self._irrelevant.issuperset(attrs) and (
                not self._relevant.isdisjoint(attrs) or self._rules.prefixed_or_learn(attrs)):
            item = (trace_id, span_id, parent, attrs, started, resource)
            # A local root (most carriers: a handler span with a user ID) is the last of its
            # trace here to end, so only a span below one makes its trace pending.
            below = parent is not None and not parent[2]
            inbox = self._inbox
            if len(inbox) >= self._bound:
                return self._hand_off(item, True, trace_id if below else None)
            # `_hand_off`'s common case, without the call: one in two spans may come here.
            if below:
                self._pending.add(trace_id)
            inbox.append(item)
            if len(inbox) > self._wake_at:
                self._wake_worker()
            return True
        pending, join = self._pending, self._join
        if (pending and trace_id in pending) or trace_id in join.traces:
            # Its trace is (or is about to be) held: the join must see it, after what was
            # handed off before. Spans of other traces never wait in the hand-off, also while
            # it is long (a backlog of one trace's spans costs no other trace anything). A
            # remembered root's trace is not held: a span under it that carries nothing leaves
            # its parent link below, all the join would keep of it (and the lookup would cost
            # every span a cache miss in the large dict of remembered roots).
            return self._hand_off((trace_id, span_id, parent, None, started, resource), False)
        if parent is not None and not parent[2]:
            # Remembered in case a request below it ends later (a streamed response); as
            # `TraceJoin.note_link` does, without a call. Also what keeps the lineage of a
            # span that ends while its trace's root waits in the hand-off.
            links = join.links
            links[span_id] = parent[1]
            if len(links) >= LINK_GENERATION:
                join.new_link_generation(links)
        return True

    def link(self, request_id: RequestId, trace_id: int, span_id: int, parent: Any,
             attrs: Mapping[str, Any] | None, ended_ns: int | None,
             started: Started | None) -> None:
        """Link a request ID to a span. `ended_ns` is the span's end (``time.time_ns()``
        clock), None while it is open; a link later than the trace wait after the end comes
        too late for its lineage: counted and warned about, not joined."""
        if ended_ns is not None and time.time_ns() - ended_ns > self._max_wait_ns:
            self._stats.add("ignored_request_ids")
            self._stats.warn_once("late_link", "", "otel-metadata: request %r was linked to a "
                                  "span that ended more than max_trace_wait ago; it gets no "
                                  "metadata (link it sooner, or raise "
                                  "PROMPTLAYER_METADATA_MAX_TRACE_WAIT)", request_id)
            return
        relevant = dict(attrs) if attrs else None
        self._hand_off(_Link(request_id, trace_id, span_id, parent, relevant, started,
                             ended_ns is not None), True, trace_id)

    def room(self) -> int:
        """How many more spans the pipeline takes now: the hand-off's room, and none while the
        record store behind the join is full (a receiver answers with backpressure then,
        rather than accept spans whose records would be dropped)."""
        if self._is_shutdown or (self.store_full is not None and self.store_full()):
            return 0
        return max(0, MAX_BACKLOG - len(self._inbox))

    def __len__(self) -> int:
        return len(self._inbox)

    def poll_forks(self, check: Callable[[], None]) -> None:
        """Call `check` before each hand-off (a platform without an after-fork hook)."""
        self.fork_check = check
        self._bound = 0

    def _hand_off(self, item: _Item | _Link, carries: bool, pend: int | None = None) -> bool:
        """`carries`: whether `item` carries something (refused, it is counted); `pend`: the
        trace whose other spans must follow it into the join while it waits (None: none)."""
        inbox = self._inbox
        if len(inbox) >= self._bound:  # the one test on the way in; past it, the rare cases
            if self.fork_check is not None:
                self.fork_check()
                inbox = self._inbox
            if len(inbox) >= MAX_BACKLOG or self._is_shutdown:
                if carries:
                    self._refuse(item)
                return not carries  # a span that carries nothing costs its trace nothing
        if pend is not None:  # before the append, so `ended` sees it while it waits
            self._pending.add(pend)
        inbox.append(item)
        if len(inbox) > self._wake_at:  # after the append: the worker publishes, then looks
            self._wake_worker()
        return True

    def _wake_worker(self) -> None:
        self._wake_at = _AWAKE  # one `set` per sleep, however many sources see it
        self._wake.set()

    def _refuse(self, item: _Item | _Link) -> None:
        """After shutdown, or while the worker is `MAX_BACKLOG` behind (spans made faster
        than their metadata can be joined). Never waits.

        ``dropped.<why>`` counts request IDs lost (once each, however many of their spans and
        links were refused); a refused span that carries metadata but no request ID is
        ``dropped_spans.<why>``: its requests are posted without what it carried.
        """
        why = "shutdown" if self._is_shutdown else "backlog"
        request_id = item.request_id if type(item) is _Link else request_id_of(
            item[3], self._rules.request_id_attributes, self._stats)  # type: ignore[index]
        if request_id is None:
            self._stats.add(f"dropped_spans.{why}")
        elif request_id not in self._refused:
            self._refused[request_id] = None
            if len(self._refused) > _MAX_REFUSED_IDS:
                self._refused.pop(next(iter(self._refused), request_id), None)
            self._stats.add(f"dropped.{why}")
        if why == "backlog":
            self._stats.warn_once("drop", "backlog", "otel-metadata: %d ended spans are "
                                  "waiting to be joined; dropping spans that carry metadata "
                                  "until the worker catches up (dropped.backlog counts the "
                                  "requests lost)", MAX_BACKLOG)

    def error(self, name: object) -> None:
        """A span a source could not read: counted, and logged once."""
        self._stats.add("errors")
        if self._stats.first("error", "span"):
            _logger.warning("otel-metadata: could not read span %r; skipped", name,
                            exc_info=True)

    # -- flush and shutdown, in one order: hand-off, join, delivery --

    def drain(self, timeout: float | None = None) -> bool:
        """Join, in order, what was handed off before this call: one bounded pass.

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

    def release(self, timeout: float) -> bool:
        """Join what was handed over, then post everything the join holds (root ended or not).
        False when the hand-off could not be joined within `timeout`."""
        if not self.drain(timeout):
            return False
        self._join.release_all()
        return True

    def shutdown(self, timeout: float) -> None:
        """Refuse new spans, stop the worker, join and release what is left."""
        self._is_shutdown = True
        self._bound = 0
        self._wake.set()  # the worker stops; what it left is joined here
        self.release(timeout)

    def after_fork(self) -> None:
        """A forked child: the parent joins what it handed off; start empty with a worker."""
        if not self._is_shutdown:
            self._fresh_state()

    # -- the worker --

    def _work(self) -> None:
        """Join what was handed over, one pass per wake-up.

        A wake-up costs the worker more CPU than a pass's work (the scheduler, then a pass on
        cold caches: ~300 µs each, measured), and the app's thread a GIL hand-over, so they are
        kept few: while the previous pass found spans, the next comes
        `GATHER_S` later (at most 1 / `GATHER_S` passes a second, however fast spans come),
        sooner only when the hand-off passes a quarter of `MAX_BACKLOG`. Once a pass found
        none, the worker sleeps idle until a source hands something over (that source sets the
        event: the only `set` a steady stream costs is the first) or the next held trace is
        due, never sooner than `GATHER_S` after the last pass. So a trace is posted at most
        `GATHER_S` after it is due, and a worker with nothing held sleeps without a timeout.
        """
        wake, join, inbox = self._wake, self._join, self._inbox
        due: float | None = None  # when the join's next held trace is due; None: none held
        gathering = False  # the last pass found spans: more are likely coming
        while True:
            if gathering:
                self._wake_at = MAX_BACKLOG // _EARLY_WAKE_SHARE
                timeout: float | None = self._gather_s
            else:
                self._wake_at = 0
                timeout = None if due is None else max(due - time.monotonic(), self._gather_s)
            # Looked at after `_wake_at` is published: a hand-off that read the old value
            # appended before this test, so it is seen here instead.
            if len(inbox) <= self._wake_at:
                wake.wait(None if timeout is None else min(timeout, MAX_WAIT_S))
            self._wake_at = _AWAKE
            wake.clear()
            if self._is_shutdown:
                return
            try:
                gathering = bool(inbox)
                self.drain()
                due = join.expire()
            except Exception:
                _logger.exception("otel-metadata: lineage worker failed")
                due = time.monotonic() + 1.0

    def _drain_locked(self, count: int) -> None:
        inbox, join, pending, span_data = self._inbox, self._join, self._pending, self._span_data
        rules, stats = self._rules, self._stats
        for _ in range(count):
            # Left in the inbox until joined, so `ended` still sees that its trace may be held.
            item = inbox[0]
            try:
                if type(item) is _Link:
                    self._join_link(item)
                    pending.discard(item.trace_id)
                elif item[3] is not None:  # type: ignore[index]  # it carries something
                    read = rules.read(item[3], stats)  # type: ignore[index]
                    if not self._remembered(item, read):  # type: ignore[arg-type]
                        join.add(span_data(item, read))  # type: ignore[arg-type]
                    pending.discard(item[0])  # type: ignore[index]
                elif join.holds(item[0]):  # type: ignore[index]
                    join.add(span_data(item, None))  # type: ignore[arg-type]
                else:
                    parent = item[2]  # type: ignore[index]
                    if parent is not None and not parent[2]:
                        join.note_link(item[1], parent[1])  # type: ignore[index]
            except Exception:
                self.error(getattr(item, "span_id", None) or item[1])  # type: ignore[index]
            finally:
                inbox.popleft()

    def _remembered(self, item: _Item, read: Read) -> bool:
        """Most spans that carry something are local roots of traces without a request (a
        handler with a user ID): remembered for a late request straight away, as their
        metadata (mapped, so bounded however large their attributes), with no SpanData, when
        the join knows nothing of their trace."""
        trace_id, span_id, parent, _, _, _ = item
        return read[2] is None and (parent is None or parent[2]) and self._join.remember(
            trace_id, span_id, parent[1] if parent is not None else None, read[0], read[1])

    def _span_data(self, item: _Item, read: Read | None = None) -> SpanData:
        """`read`: what `MappingRules.read` made of the span's attributes (None: nothing)."""
        trace_id, span_id, parent, attrs, started, resource = item
        metadata, fallback, request_id = read or ({}, None, None)
        context_md = resource_md = None
        # Only a request span needs its start context and resource: one by its attribute, or
        # one a link named before it ended (in a held trace).
        join = self._join
        if request_id is not None or (trace_id in join.traces
                                      and join.linked(trace_id, span_id)):
            context_md = self._map_started(started)
            resource_md = self._map_resource(resource)
        return SpanData(trace_id, span_id, parent[1] if parent is not None else None,
                        parent is None or parent[2], metadata,
                        (request_id,) if request_id is not None else (), context_md, resource_md,
                        fallback)

    def _join_link(self, link: _Link) -> None:
        metadata, fallback = ({}, None) if not link.attrs else self._rules.read(
            link.attrs, self._stats)[:2]
        parent = link.parent
        span = SpanData(link.trace_id, link.span_id, parent[1] if parent is not None else None,
                        parent is None or parent[2], metadata, (link.request_id,),
                        self._map_started(link.started), fallback=fallback)
        self._join.link(span, link.ended)

    def _map_started(self, started: Started | None) -> dict[str, str] | None:
        """The context layer (SPEC §6 layer 4): `metadata_context` values, then other tools'
        context values (mapped as their attributes would be, §4's ranks within), then baggage."""
        if started is None:
            return None
        rules, stats = self._rules, self._stats
        values, bag = started[0], started[1]
        tools = started[2] if len(started) > 2 else None
        context_md = map_baggage(bag, rules, stats) if bag else {}
        if tools:
            context_md.update(map_attributes(rules.context_attributes(tools), rules, stats))
        context_md.update(map_values(values or {}, rules, stats))
        return context_md

    def _map_resource(self, resource: Resource | None) -> Mapping[str, str]:
        if resource is None:
            return {}
        if resource is not self._resource:
            self._resource_metadata = map_attributes(resource.attributes, self._rules,
                                                     self._stats)
            self._resource = resource
        return self._resource_metadata

