"""The trace-scoped join: a request span's metadata is the merge of its lineage (SPEC §6).

Works on plain `SpanData`, not on SDK spans, so spans decoded from OTLP can enter it too.

Strongest first: the request span's own attributes; its descendants' that are not inside another
request span (the LLM span an instrumentation made inside the call), nearer winning, then the
later-ended; its ancestors', nearer winning; the `metadata_context`/other tools'/baggage values
active when it started; resource attributes; static metadata. Below all of them, keys given only
the cross-layer way (`SpanData.fallback`: the LLM request's own end-user field). Siblings and
cousins never contribute: only the parent chain is walked, up from the request for its ancestors
and up from each span that carries metadata for its subtree.

A request is posted once its own local root (the first span up its chain whose parent is
remote or absent) has ended, or after `max_wait_s`. One trace may have several local roots in a
process (an upstream service calling this one twice): each request waits for its own root only,
and gets nothing from the other's subtree. The trace then lingers `max_wait_s` more so a request
span that ends after its root still finds its ancestors. What is learnt after a request was
posted goes out as a follow-up carrying only keys not sent yet, or changed keys from a layer at
least as strong as the one that sent them. Spans reach the join in the order they ended, so a
request's descendants that ended before it are known when it posts; one that ends after its
request was posted (a streamed LLM span outliving the request span) sends a follow-up.

Parent links of spans that carry nothing and end before anything in their trace is held live in a
small two-generation memory (`note_link`), so an ancestor that ended early is still found while
it is remembered; beyond that a chain stops at the gap (nothing is guessed). Local roots that end
with nothing of their trace known (a handler span with a user ID: most traces) are remembered the
same way (`remember`), as their metadata alone, until a later span of their trace arrives.
"""

from __future__ import annotations

import marshal
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from .mapping import RequestId
from .stats import Stats

# Layer strengths (higher wins): the request itself; its subtree, nearer stronger; its
# ancestors, nearer stronger; context; resource; static; the cross-layer fallback below all.
WEAKEST, STATIC, RESOURCE, CONTEXT = -1, 0, 1, 2
_MAX_DEPTH = 5_000
_ANCESTORS = CONTEXT + _MAX_DEPTH  # the parent's strength; an ancestor at depth d: 1 - d more
_SUBTREE = _ANCESTORS + _MAX_DEPTH  # a child's strength; a descendant at depth d: 1 - d more
OWN = _SUBTREE + 1
# After its first post, a trace whose root never ends is kept this many `max_wait_s` at most.
_FOLLOWUP_HORIZON = 12
_MIN_FOLLOWUP_HORIZON_S = 60.0

# Emit returns False when the record was refused (queue full): its keys then count as unsent.
Emit = Callable[[RequestId, dict[str, str]], bool]
# Told of a request joined but not posted yet, with what is known of it (a durable store writes
# it down, so a crash before its trace is released still delivers that).
Hold = Callable[[RequestId, dict[str, str]], None]
# Local roots that ended alone, remembered for `max_wait_s` in case a request below them ends late:
# at most this many, in two generations of half as many each.
MAX_REMEMBERED_ROOTS = 65_536
# Parent links remembered for spans outside held traces: two generations of this many each.
LINK_GENERATION = 16_384
# A local root remembered alone: when to forget (a double), then (span ID, parent ID, metadata,
# fallback) marshalled. As bytes it is not tracked by the garbage collector: as a tuple holding
# a dict it was, and every full collection visited each of tens of thousands of remembered
# roots (about 1 us each, cache misses; most of a full collection's time), also on the app's
# thread. The due time comes first, unmarshalled, so a generation's roots are counted cheaply.
_EndedRoot = bytes
_Root = tuple[int, "int | None", dict[str, str], "dict[str, str] | None"]
_DUE = struct.Struct("d")


@dataclass(slots=True)
class SpanData:
    """What the join needs of one ended span, already mapped to metadata."""

    trace_id: int
    span_id: int
    parent_id: int | None
    local_root: bool
    metadata: Mapping[str, str]
    request_ids: tuple[RequestId, ...] = ()  # several PromptLayer calls may share one span
    context: Mapping[str, str] | None = None
    resource: Mapping[str, str] | None = None
    # Keys a request gets from this span only when no layer gives them (`map_weakest`).
    fallback: Mapping[str, str] | None = None


class _Trace:
    __slots__ = ("parents", "metadata", "fallback", "requests", "sent", "roots", "phase", "due")

    roots: set[int]

    def __init__(self, due: float) -> None:
        self.parents: dict[int, int | None] = {}
        self.metadata: dict[int, Mapping[str, str]] = {}  # in the order the spans ended
        self.fallback: dict[int, Mapping[str, str]] = {}
        self.requests: dict[int, SpanData] = {}
        self.sent: dict[RequestId, dict[str, tuple[str, int]]] = {}
        self.roots = set()  # local roots of this trace that have ended
        self.phase: dict[int, _Trace] = {}  # which of the join's phase dicts holds it
        self.due = due


class TraceJoin:
    """Holds traces until their metadata is complete, then emits one record per request ID."""

    def __init__(
        self,
        emit: Emit,
        *,
        static: Mapping[str, str],
        max_traces: int,
        max_wait_s: float,
        stats: Stats,
        required: tuple[str, ...] = (),
        hold: Hold | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`hold`: told of each request span recorded but not posted at once (None: nobody)."""
        self._emit = emit
        self._hold = hold
        self._required = required
        self._static = dict(static)
        self._max_traces = max_traces
        # Remembered lone roots are cheap (a tuple and their metadata each): enough for
        # `max_trace_wait` of a busy app (10 000 handler spans/s for 5 s), and never fewer
        # than `max_traces`.
        self._root_generation = max(max_traces, MAX_REMEMBERED_ROOTS) // 2
        self._wait = max_wait_s
        self._horizon = max(_MIN_FOLLOWUP_HORIZON_S, _FOLLOWUP_HORIZON * max_wait_s)
        self._stats = stats
        self._clock = clock
        self._lock = threading.Lock()
        # `traces` and `links` are read (and `links` written) without the lock by the sources
        # (`Intake.ended`), on the app's thread: single dict operations, atomic under the GIL,
        # for the spans that carry nothing (most of them).
        self.traces: dict[int, _Trace] = {}
        # Phases, each in the order its `due` times grow: waiting for the root; posted early
        # and still waiting for the root; root ended and lingering. OrderedDicts: their oldest
        # entry is found in O(1) however many were removed before it (a plain dict's is not).
        self._waiting: OrderedDict[int, _Trace] = OrderedDict()
        self._early: OrderedDict[int, _Trace] = OrderedDict()
        self._lingering: OrderedDict[int, _Trace] = OrderedDict()
        self._sent_in: dict[RequestId, _Trace] = {}  # which held trace posted a request ID
        self.links: dict[int, int] = {}
        self._old_links: dict[int, int] = {}
        self._links_lock = threading.Lock()
        self._owner: int | None = None  # the thread inside the lock, to refuse re-entry
        self._clear_roots()

    def _clear_roots(self) -> None:
        # Local roots that ended while nothing else of their trace was known (`remember`):
        # trace ID -> `_EndedRoot`. Remembered like a lingering trace (`max_wait_s`) but
        # cheaply: most never see another span of their trace (a web handler span with
        # `user.id` and no LLM call under it). A trace enters `traces` only when another of its
        # spans arrives. Past its wait a root is never used. Two generations: once this one is
        # full, or as old as the wait, it becomes the old one and the old one is forgotten (its
        # roots still within their wait counted as `traces_evicted`): a root costs one plain
        # dict insert, and memory stays within `MAX_REMEMBERED_ROOTS`.
        self.ended_roots: dict[int, _EndedRoot] = {}
        self._old_roots: dict[int, _EndedRoot] = {}
        self._roots_until = float("-inf")  # past this due, `ended_roots` starts a generation

    def unsend(self, request_id: RequestId, metadata: Mapping[str, str]) -> None:
        """A record was given up on: its keys count as unsent, so a follow-up carries them."""
        if self._owner == threading.get_ident():
            return
        with self._locked():
            trace = self._sent_in.get(request_id)
            sent = trace.sent.get(request_id) if trace is not None else None
            for key, value in metadata.items():
                if sent is not None and key in sent and sent[key][0] == value:
                    del sent[key]

    def note_link(self, span_id: int, parent_id: int) -> None:
        """Remember the local parent of a span that was not added (lock-free, O(1))."""
        links = self.links
        links[span_id] = parent_id
        if len(links) >= LINK_GENERATION:
            self.new_link_generation(links)

    def new_link_generation(self, full: dict[int, int]) -> None:
        """`full`, if still the current links, becomes the old generation (the oldest are
        forgotten); once only, when several threads find it full at the same time."""
        with self._links_lock:
            if self.links is full:
                self._old_links, self.links = full, {}

    def remember(self, trace_id: int, span_id: int, parent_id: int | None,
                 metadata: dict[str, str], fallback: dict[str, str] | None) -> bool:
        """A local root that carries no request ID ended: remember it for `max_wait_s`, in case
        a request below it ends later, when nothing of its trace is known (most such roots),
        without a `SpanData`. False when it must be added as a span instead (or, inside our
        own work, skipped; or its mappings are not plain dicts of strings)."""
        if (trace_id in self.traces or trace_id in self.ended_roots
                or trace_id in self._old_roots or self._owner is not None):
            return False
        with self._lock:
            due = self._clock() + self._wait
            try:
                root = _DUE.pack(due) + marshal.dumps((span_id, parent_id, metadata, fallback))
            except ValueError:  # a str subclass among the values, say: marshal takes exact types
                return False
            roots = self.ended_roots
            roots[trace_id] = root
            if len(roots) >= self._root_generation or due > self._roots_until:
                self._new_root_generation(due - self._wait)
        return True

    def _new_root_generation(self, now: float) -> None:
        """The current generation becomes the old one; the old one is forgotten, each of its
        roots still within its wait counted as evicted."""
        # Roots were remembered in the order of their due times: those within their wait are
        # the newest.
        within = 0
        for root in reversed(self._old_roots.values()):
            if _root_due(root) <= now:
                break
            within += 1
        if within:
            self._stats.add("traces_evicted", within)
        self._old_roots, self.ended_roots = self.ended_roots, {}
        self._roots_until = now + 2 * self._wait

    def holds(self, trace_id: int) -> bool:
        """Whether spans of this trace must be recorded even when they carry nothing."""
        if trace_id in self.traces:
            return True
        now = self._clock()
        return any(root is not None and _root_due(root) > now
                   for root in (self.ended_roots.get(trace_id), self._old_roots.get(trace_id)))

    def linked(self, trace_id: int, span_id: int) -> bool:
        """Whether a request ID was linked to this span of a held trace."""
        trace = self.traces.get(trace_id)
        return trace is not None and span_id in trace.requests

    def __len__(self) -> int:
        return len(self.traces)

    def add(self, span: SpanData) -> None:
        """Record an ended span; post what became complete.

        A span that ends inside our own work on this thread (a log handler that traces, called
        while we post) is skipped: it is our own telemetry, and waiting would deadlock.
        """
        me = threading.get_ident()
        if self._owner == me:
            return
        with self._lock:  # as `_locked()` does, without a generator: this runs once per span
            self._owner = me
            try:
                self._restore_root(span.trace_id)
                self._add(span)
            finally:
                self._owner = None

    def _restore_root(self, tid: int) -> None:
        """Local roots of `tid` remembered while nothing else of its trace was known: hold the
        trace now, with those roots in it (those whose wait is not over), the older first."""
        if tid not in self._old_roots and tid not in self.ended_roots:
            return
        now = self._clock()
        for roots in (self._old_roots, self.ended_roots):
            packed = roots.pop(tid, None)
            if packed is not None and _root_due(packed) > now:
                span_id, parent_id, metadata, fallback = _unpack(packed)
                self._add(SpanData(tid, span_id, parent_id, True, metadata, fallback=fallback))

    def _add(self, span: SpanData) -> None:
        tid = span.trace_id
        trace = self.traces.get(tid)
        if trace is None:
            if span.local_root and not span.request_ids and self._full_of_open():
                return  # lingering for late request spans is best effort: never evict for it
            trace = self._new_trace(tid)
        linked = trace.requests.get(span.span_id)
        if linked is not None:  # linked before it ended: keep the links' IDs and context
            ids = span.request_ids + tuple(r for r in linked.request_ids
                                           if r not in span.request_ids)
            span = SpanData(tid, span.span_id, span.parent_id, span.local_root, span.metadata,
                            ids, span.context or linked.context,
                            span.resource or linked.resource, span.fallback)
        self._record(trace, span, ended=True)

    def link(self, span: SpanData, ended: bool) -> None:
        """Link `span.request_ids` to a span known by its context, which may still be open
        (then it is completed when it ends), have ended already, or belong to another tracer
        provider (then `span.parent_id` leads to the spans we saw). Each ID gets the span's
        lineage; none replaces another."""
        if self._owner == threading.get_ident():
            return
        with self._locked():
            tid = span.trace_id
            self._restore_root(tid)
            trace = self.traces.get(tid) or self._new_trace(tid)
            known = trace.requests.get(span.span_id)
            if known is not None:
                ids = known.request_ids + tuple(r for r in span.request_ids
                                                if r not in known.request_ids)
                span = SpanData(tid, known.span_id, known.parent_id, known.local_root,
                                known.metadata, ids, known.context or span.context,
                                known.resource, known.fallback)
                ended = ended or known.span_id in trace.roots
            elif span.span_id in trace.parents:  # it ended and was joined: its own values
                span = SpanData(tid, span.span_id, trace.parents[span.span_id],
                                span.span_id in trace.roots,
                                trace.metadata.get(span.span_id, span.metadata),
                                span.request_ids, span.context,
                                fallback=trace.fallback.get(span.span_id, span.fallback))
                ended = True
            self._record(trace, span, ended)

    def _record(self, trace: _Trace, span: SpanData, ended: bool) -> None:
        """Note `span` in its held trace; post what became complete. An open span (a link made
        while it runs) only waits: its end completes it."""
        tid = span.trace_id
        trace.parents[span.span_id] = span.parent_id
        if span.metadata:
            trace.metadata[span.span_id] = span.metadata
        if span.fallback:
            trace.fallback[span.span_id] = span.fallback
        if span.request_ids:
            trace.requests[span.span_id] = span
        if span.local_root and ended:
            trace.roots.add(span.span_id)
            self._settle(tid, trace)
        elif span.request_ids:
            if trace.phase is self._early or self._root_ended(trace, span):
                self._post(trace, span)
            else:
                if self._hold is not None:  # written down with what is known so far
                    known = {key: value for key, (value, _) in self._merge(trace, span).items()}
                    for request_id in span.request_ids:
                        self._hold(request_id, known)
                if trace.phase is self._lingering:  # under another, still open, local root
                    self._move(tid, trace, self._waiting, self._clock() + self._wait)
        elif trace.sent and (span.metadata or span.fallback):
            self._post_late_descendant(trace, span.span_id)
        if (not span.request_ids and not span.local_root and trace.roots
                and trace.phase is self._waiting):
            # Spans from several services arrive in any order (serve): this one may complete
            # the chain from a waiting request to a root that ended first.
            self._settle(tid, trace)

    def _post_late_descendant(self, trace: _Trace, span_id: int) -> None:
        """A span that carries metadata ended after the request it is inside was posted: that
        request's follow-up (only what is new, or from a layer at least as strong)."""
        node = self._parent(trace, span_id)
        for _ in range(_MAX_DEPTH):
            if node is None:
                return
            request = trace.requests.get(node)
            if request is not None:  # the nearest request above: its subtree, no other's
                if any(r in trace.sent for r in request.request_ids):
                    self._post(trace, request)
                return
            node = self._parent(trace, node)

    def _settle(self, tid: int, trace: _Trace) -> None:
        """A local root ended: post its requests; linger once every request's root has ended."""
        waiting = False
        for request in trace.requests.values():
            if self._root_ended(trace, request):
                self._post(trace, request)
            else:
                waiting = True
                if trace.phase is self._early:  # past its wait: posted with what is known
                    self._post(trace, request)
        if not waiting:
            self._move(tid, trace, self._lingering, self._clock() + self._wait)

    def expire(self) -> float | None:
        """Post traces whose wait ran out and forget old ones; return when to call again."""
        now = self._clock()
        with self._locked():
            for tid, trace in _due(self._waiting, now):
                self._post_all(trace)
                self._move(tid, trace, self._early, trace.due - self._wait + self._horizon)
            for tid, trace in _due(self._early, now) + _due(self._lingering, now):
                self._forget(tid, trace)
            dues = [next(iter(d.values())).due for d in (self._waiting, self._early,
                                                          self._lingering) if d]
            return min(dues) if dues else None

    def release_all(self) -> None:
        """Post every held request now, root ended or not (for `force_flush` and shutdown)."""
        with self._locked():
            for tid, trace in list(self._waiting.items()):
                self._post_all(trace)
                self._move(tid, trace, self._early, trace.due - self._wait + self._horizon)

    def clear(self) -> None:
        """Forget everything (a forked child: the parent posts what it held)."""
        self._lock = threading.Lock()
        self._owner = None
        self.traces = {}
        self._waiting, self._early, self._lingering = OrderedDict(), OrderedDict(), OrderedDict()
        self.links, self._old_links = {}, {}
        self._links_lock = threading.Lock()
        self._sent_in = {}
        self._clear_roots()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._lock:
            self._owner = threading.get_ident()
            try:
                yield
            finally:
                self._owner = None

    # -- inside the lock --

    def _parent(self, trace: _Trace, span_id: int) -> int | None:
        """The known local parent of `span_id` (None: a root, or not known)."""
        if span_id in trace.roots:
            return None
        if span_id in trace.parents:
            return trace.parents[span_id]
        return self.links.get(span_id, self._old_links.get(span_id))

    def _root_ended(self, trace: _Trace, span: SpanData) -> bool:
        """Whether the local root above `span` (or `span` itself) has ended."""
        node: int | None = span.span_id
        for _ in range(_MAX_DEPTH):
            if node is None:
                return False
            if node in trace.roots:
                return True
            node = self._parent(trace, node)
        return False

    def _new_trace(self, trace_id: int) -> _Trace:
        while len(self.traces) >= self._max_traces:
            self._evict_oldest()
        trace = _Trace(self._clock() + self._wait)
        trace.phase = self._waiting
        self._waiting[trace_id] = trace
        self.traces[trace_id] = trace
        return trace

    def _full_of_open(self) -> bool:
        return len(self.traces) >= self._max_traces and not (self._lingering or self._early)

    def _evict_oldest(self) -> None:
        phase = self._lingering or self._early or self._waiting
        tid, trace = next(iter(phase.items()))
        if phase is self._waiting:
            self._post_all(trace)
        self._stats.add("traces_evicted")
        self._forget(tid, trace)

    def _move(self, tid: int, trace: _Trace, phase: dict[int, _Trace], due: float) -> None:
        del trace.phase[tid]
        trace.phase, trace.due = phase, due
        phase[tid] = trace

    def _forget(self, tid: int, trace: _Trace) -> None:
        trace.phase.pop(tid, None)
        self.traces.pop(tid, None)
        for request_id in trace.sent:
            if self._sent_in.get(request_id) is trace:
                del self._sent_in[request_id]

    def _post_all(self, trace: _Trace) -> None:
        for span in trace.requests.values():
            self._post(trace, span)

    def _post(self, trace: _Trace, span: SpanData) -> None:
        merged = self._merge(trace, span)
        for request_id in span.request_ids:
            self._post_one(trace, request_id, merged)

    def _post_one(self, trace: _Trace, request_id: RequestId,
                  merged: dict[str, tuple[str, int]]) -> None:
        sent = trace.sent.setdefault(request_id, {})
        if not sent and self._required:
            self._check_required(merged)
        self._sent_in[request_id] = trace
        out: dict[str, str] = {}
        for key, (value, strength) in merged.items():
            before = sent.get(key)
            if before is None or (strength >= before[1] and value != before[0]):
                out[key] = value
                sent[key] = (value, strength)
            elif value == before[0] and strength > before[1]:
                sent[key] = (value, strength)
        if out:
            if len(sent) > len(out):
                self._stats.add("followups")
            if not self._emit(request_id, out):
                for key in out:  # refused: unsent, so a later post carries these keys again
                    del sent[key]

    def _check_required(self, merged: Mapping[str, object]) -> None:
        """A request's first post lacks a required key: still posted, counted, said once."""
        for key in self._required:
            if key not in merged:
                self._stats.add(f"missing.{key}")
                self._stats.warn_once("missing", key, "otel-metadata: a request was posted "
                                      "without the required metadata key %r (counted as "
                                      "missing.%s; said once per key)", key, key)

    def _merge(self, trace: _Trace, span: SpanData) -> dict[str, tuple[str, int]]:
        """The request's metadata, each key with the strength of the layer that gave it."""
        # (strength, span ID or None for the request itself), strongest first.
        lineage: list[tuple[int, int | None]] = [(OWN, None)]
        lineage += [(_SUBTREE + 1 - depth, sid) for depth, sid in self._subtree(trace, span)]
        parent = None if span.local_root else span.parent_id
        depth = 1
        while parent is not None and depth < _MAX_DEPTH:
            if parent in trace.metadata or parent in trace.fallback:
                lineage.append((_ANCESTORS + 1 - depth, parent))
            parent = self._parent(trace, parent)
            depth += 1
        layers: list[tuple[int, Mapping[str, str] | None]] = [(STATIC, self._static),
                                                              (RESOURCE, span.resource),
                                                              (CONTEXT, span.context)]
        layers += [(strength, span.metadata if sid is None else trace.metadata.get(sid))
                   for strength, sid in reversed(lineage)]
        merged: dict[str, tuple[str, int]] = {}
        for strength, values in layers:  # weakest first: a stronger layer overwrites
            for key, value in (values or {}).items():
                merged[key] = (value, strength)
        for _, sid in reversed(lineage):  # the cross-layer keys, nearest winning
            values = span.fallback if sid is None else trace.fallback.get(sid)
            for key, value in (values or {}).items():
                if key not in merged or merged[key][1] == WEAKEST:
                    merged[key] = (value, WEAKEST)
        return merged

    def _subtree(self, trace: _Trace, span: SpanData) -> list[tuple[int, int]]:
        """(depth, span ID) of the spans below the request span `span` that carry metadata and
        are not inside another request span, strongest first: the nearer, then, within a
        depth, the later-ended."""
        top = span.span_id
        # Depth below `top` of each span walked (None: not below it, or inside another request).
        depth: dict[int, int | None] = {top: 0}
        found: list[tuple[int, int, int]] = []  # (depth, -end order, span ID)
        spans = (*trace.metadata, *(s for s in trace.fallback if s not in trace.metadata))
        for ended, sid in enumerate(spans):
            path: list[int] = []
            node: int | None = sid
            while node is not None and node not in depth and len(path) < _MAX_DEPTH:
                if node in trace.requests:  # another request span: its subtree is its own
                    depth[node] = None
                    break
                path.append(node)
                node = self._parent(trace, node)
            above = depth.get(node) if node is not None else None
            for i, walked in enumerate(reversed(path), 1):
                depth[walked] = None if above is None else above + i
            d = depth[sid] if sid != top else None
            if d:
                found.append((d, -ended, sid))
        found.sort()
        return [(d, sid) for d, _, sid in found]


def _due(phase: dict[int, _Trace], now: float) -> list[tuple[int, _Trace]]:
    out = []
    for tid, trace in phase.items():
        if trace.due > now:
            break
        out.append((tid, trace))
    return out


def _root_due(root: _EndedRoot) -> float:
    return _DUE.unpack_from(root)[0]  # type: ignore[no-any-return]


def _unpack(root: _EndedRoot) -> _Root:
    return marshal.loads(memoryview(root)[_DUE.size:])  # type: ignore[no-any-return]
