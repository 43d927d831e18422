"""Lineage (SPEC §6): metadata set once above reaches every request below it, never sideways."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from conftest import request_in, wait_for
from opentelemetry import baggage, context, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from otel_metadata import metadata_context, set_request_id
from otel_metadata.lineage import SpanData, TraceJoin
from otel_metadata.stats import Stats

PROPAGATOR = CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()])


def test_three_level_nesting_nearer_ancestor_wins(server, make_pipeline) -> None:
    p = make_pipeline()
    with p.tracer.start_as_current_span("handler") as root:
        root.set_attribute("user.id", "u-root")
        root.set_attribute("promptlayer.metadata.tier", "gold")
        root.set_attribute("promptlayer.metadata.region", "eu")
        with p.tracer.start_as_current_span("agent") as mid:
            mid.set_attribute("promptlayer.metadata.tier", "silver")
            with p.tracer.start_as_current_span("llm") as llm:
                llm.set_attribute("promptlayer.metadata.step", "3")
                set_request_id(1)
    assert p.flush()
    assert server.metadata == {1: {"user_id": "u-root", "tier": "silver", "region": "eu",
                                   "step": "3"}}


def test_own_standard_attribute_beats_ancestors_explicit_key(server, make_pipeline) -> None:
    p = make_pipeline()
    with p.tracer.start_as_current_span("handler") as root:
        root.set_attribute("promptlayer.metadata.user_id", "from-parent")
        with p.tracer.start_as_current_span("llm") as llm:
            llm.set_attribute("user.id", "own")
            set_request_id(1)
    assert p.flush()
    assert server.metadata == {1: {"user_id": "own"}}


def test_two_requests_under_one_parent_never_see_each_other(server, make_pipeline) -> None:
    p = make_pipeline()
    with p.tracer.start_as_current_span("handler") as root:
        root.set_attribute("user.id", "u")
        for rid, step in ((1, "plan"), (2, "answer")):
            with p.tracer.start_as_current_span("llm") as llm:
                llm.set_attribute("promptlayer.metadata.step", step)
                llm.set_attribute(f"promptlayer.metadata.only_{rid}", "x")
                set_request_id(rid)
    assert p.flush()
    assert server.metadata == {1: {"user_id": "u", "step": "plan", "only_1": "x"},
                               2: {"user_id": "u", "step": "answer", "only_2": "x"}}


def test_siblings_and_cousins_contribute_nothing(server, make_pipeline) -> None:
    p = make_pipeline()
    with p.tracer.start_as_current_span("handler") as root:
        root.set_attribute("user.id", "u")
        with p.tracer.start_as_current_span("branch-a") as a:
            a.set_attribute("promptlayer.metadata.branch", "a")
            with p.tracer.start_as_current_span("tool") as cousin:
                cousin.set_attribute("promptlayer.metadata.tool", "search")
        with p.tracer.start_as_current_span("branch-b"):
            with p.tracer.start_as_current_span("sibling") as sib:
                sib.set_attribute("gen_ai.conversation.id", "sibling-conv")
            with p.tracer.start_as_current_span("llm"):
                set_request_id(1)
    assert p.flush()
    assert server.metadata == {1: {"user_id": "u"}}


def test_request_span_ending_after_its_parents(server, make_pipeline) -> None:
    """A streamed LLM span outlives the handler (root) and a plain span between them."""
    p = make_pipeline()
    root = p.tracer.start_span("handler")
    root.set_attribute("user.id", "u-stream")
    with trace.use_span(root):
        middle = p.tracer.start_span("stream-setup")
        with trace.use_span(middle):
            llm = p.tracer.start_span("llm")
    middle.end()
    root.end()
    llm.set_attribute("promptlayer.metadata.streamed", True)
    set_request_id(1, llm)
    llm.end()
    assert p.flush()
    assert server.metadata == {1: {"user_id": "u-stream", "streamed": "true"}}


def test_long_running_root_posts_after_max_wait_then_a_follow_up(server, make_pipeline) -> None:
    p = make_pipeline(max_trace_wait_millis=50)
    root = p.tracer.start_span("session")
    with trace.use_span(root), p.tracer.start_as_current_span("llm") as llm:
        llm.set_attribute("user.id", "own-user")
        llm.set_attribute("promptlayer.metadata.step", "1")
        set_request_id(1)
    # The root is still running: after max_trace_wait the request goes out with what is known.
    assert wait_for(lambda: 1 in server.metadata)
    assert server.metadata == {1: {"user_id": "own-user", "step": "1"}}
    root.set_attribute("gen_ai.conversation.id", "conv-late")
    root.set_attribute("promptlayer.metadata.step", "root's weaker step")
    root.set_attribute("user.id", "weaker-user")
    root.end()
    assert p.flush()
    # Only keys not yet sent travel in the follow-up; the request's own values stay.
    assert server.metadata == {1: {"user_id": "own-user", "step": "1",
                                   "conversation_id": "conv-late"}}
    assert [post.metadata for post in server.accepted()] == [
        {"user_id": "own-user", "step": "1"}, {"conversation_id": "conv-late"}]


def test_force_flush_releases_traces_whose_root_is_still_open(server, make_pipeline) -> None:
    p = make_pipeline(max_trace_wait_millis=60_000)
    root = p.tracer.start_span("session")
    root.set_attribute("user.id", "u")
    with trace.use_span(root), p.tracer.start_as_current_span("llm") as llm:
        llm.set_attribute("promptlayer.metadata.step", "1")
        set_request_id(1)
    assert p.flush()
    assert server.metadata == {1: {"step": "1"}}
    root.end()
    assert p.flush()
    assert server.metadata == {1: {"step": "1", "user_id": "u"}}


def test_metadata_context_nested_merges_inner_wins(server, make_pipeline) -> None:
    p = make_pipeline()
    with metadata_context(user_id="outer", plan="free", region="eu"):
        with metadata_context(plan="pro"), p.tracer.start_as_current_span("llm"):
            set_request_id(1)
        with p.tracer.start_as_current_span("llm"):
            set_request_id(2)
    with p.tracer.start_as_current_span("llm") as span:
        span.set_attribute("user.id", "no-context")
        set_request_id(3)
    assert p.flush()
    assert server.metadata == {1: {"user_id": "outer", "plan": "pro", "region": "eu"},
                               2: {"user_id": "outer", "plan": "free", "region": "eu"},
                               3: {"user_id": "no-context"}}


def test_span_attributes_beat_context_which_beats_resource_and_static(server,
                                                                       make_pipeline) -> None:
    p = make_pipeline(resource={"promptlayer.metadata.environment": "prod",
                                "promptlayer.metadata.plan": "resource-plan",
                                "user.id": "resource-user"},
                      metadata={"environment": "static-env", "team": "search"})
    with metadata_context(plan="context-plan", user_id="context-user"):
        with p.tracer.start_as_current_span("handler") as root:
            root.set_attribute("user.id", "span-user")
            with p.tracer.start_as_current_span("llm"):
                set_request_id(1)
    assert p.flush()
    assert server.metadata == {1: {"user_id": "span-user", "plan": "context-plan",
                                   "environment": "prod", "team": "search"}}


def test_metadata_context_as_sync_and_async_decorator(server, make_pipeline) -> None:
    p = make_pipeline()

    @metadata_context(user_id="deco-sync")
    def handle(rid: int) -> None:
        with p.tracer.start_as_current_span("llm"):
            set_request_id(rid)

    @metadata_context(user_id="deco-async")
    async def handle_async(rid: int) -> None:
        await asyncio.sleep(0)
        with p.tracer.start_as_current_span("llm"):
            set_request_id(rid)

    handle(1)
    asyncio.run(handle_async(2))
    assert p.flush()
    assert server.metadata == {1: {"user_id": "deco-sync"}, 2: {"user_id": "deco-async"}}


def test_asyncio_tasks_keep_their_own_lineage(server, make_pipeline) -> None:
    p = make_pipeline()

    async def conversation(user: str, rid: int) -> None:
        with p.tracer.start_as_current_span("handler") as root:
            root.set_attribute("user.id", user)
            with metadata_context(conversation_id=f"conv-{user}"):
                await asyncio.sleep(0.001)
                with p.tracer.start_as_current_span("llm"):
                    await asyncio.sleep(0.001)
                    set_request_id(rid)

    async def main() -> None:
        await asyncio.gather(*(conversation(f"user{i}", i) for i in range(20)))

    asyncio.run(main())
    assert p.flush()
    assert server.metadata == {i: {"user_id": f"user{i}", "conversation_id": f"conv-user{i}"}
                               for i in range(20)}


def test_threads_that_carry_context_get_the_parents_metadata(server, make_pipeline) -> None:
    p = make_pipeline()

    def llm_call(rid: int) -> None:
        with p.tracer.start_as_current_span("llm"):
            set_request_id(rid)

    with p.tracer.start_as_current_span("handler") as root:
        root.set_attribute("user.id", "u-threads")
        with metadata_context(plan="pro"), ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(contextvars.copy_context().run, llm_call, rid)
                       for rid in range(1, 9)]
            for future in futures:
                future.result()
    assert p.flush()
    assert server.metadata == {rid: {"user_id": "u-threads", "plan": "pro"}
                               for rid in range(1, 9)}


def test_incoming_baggage_is_honoured_below_metadata_context(server, make_pipeline) -> None:
    p = make_pipeline()
    headers = {
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "baggage": "user.id=from-upstream,promptlayer.metadata.plan=basic,"
                   "gen_ai.conversation.id=conv-up,unrelated=x",
    }
    token = context.attach(PROPAGATOR.extract(headers))
    try:
        with metadata_context(plan="override"):
            with p.tracer.start_as_current_span("server") as span:
                assert span.get_span_context().trace_id == 0x0af7651916cd43dd8448eb211c80319c
                with p.tracer.start_as_current_span("llm"):
                    set_request_id(1)
    finally:
        context.detach(token)
    assert p.flush()
    assert server.metadata == {1: {"user_id": "from-upstream", "conversation_id": "conv-up",
                                   "plan": "override"}}


def test_propagate_writes_baggage_that_a_downstream_service_maps_back(server,
                                                                       make_pipeline) -> None:
    carrier: dict[str, str] = {}
    with metadata_context(user_id="u", conversation_id="c", propagate=True, plan="pro"):
        assert baggage.get_all() == {"user.id": "u", "gen_ai.conversation.id": "c",
                                     "promptlayer.metadata.plan": "pro"}
        PROPAGATOR.inject(carrier)
    with metadata_context(user_id="not-propagated"):
        assert baggage.get_all() == {}
    # The downstream service: extracts the headers and runs its own processor.
    p = make_pipeline()
    request_in(p, PROPAGATOR.extract(carrier))
    assert p.flush()
    assert server.metadata == {1: {"user_id": "u", "conversation_id": "c", "plan": "pro"}}


def test_memory_cap_posts_the_oldest_trace_early(server, make_pipeline) -> None:
    p = make_pipeline(max_traces=3, max_trace_wait_millis=60_000)
    roots = []
    for rid in range(1, 6):
        root = p.tracer.start_span("session")
        root.set_attribute("user.id", f"u{rid}")
        with trace.use_span(root), p.tracer.start_as_current_span("llm") as llm:
            llm.set_attribute("promptlayer.metadata.step", "s")
            set_request_id(rid)
        roots.append(root)
    # Traces 1 and 2 were evicted to keep 3 held, and posted early with what was known.
    stats = p.settled_stats()
    assert (stats["held_traces"], stats["traces_evicted"]) == (3, 2)
    for root in roots:
        root.end()
    assert p.flush()
    assert server.metadata == {1: {"step": "s"}, 2: {"step": "s"}} | {
        rid: {"user_id": f"u{rid}", "step": "s"} for rid in (3, 4, 5)}


def test_two_local_roots_in_one_trace_stay_apart(server, make_pipeline) -> None:
    """An upstream calls this service twice in one trace: each request gets its own root only."""
    p = make_pipeline()
    upstream = PROPAGATOR.extract(
        {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"})
    with p.tracer.start_as_current_span("POST /chat", context=upstream) as first:
        first.set_attribute("user.id", "alice")
        with p.tracer.start_as_current_span("llm"):
            set_request_id(1)
    with p.tracer.start_as_current_span("POST /summarize", context=upstream) as second:
        second.set_attribute("promptlayer.metadata.route", "summarize")
        with p.tracer.start_as_current_span("llm"):
            set_request_id(2)
    assert p.flush()
    assert server.metadata == {1: {"user_id": "alice"}, 2: {"route": "summarize"}}


def test_ancestors_that_ended_first_are_still_found(server, make_pipeline) -> None:
    """Fire-and-forget: the agent and a plain span between it and the LLM call end first."""
    p = make_pipeline()
    root = p.tracer.start_span("handler")
    root.set_attribute("user.id", "u")
    with trace.use_span(root):
        agent = p.tracer.start_span("agent")
        agent.set_attribute("promptlayer.metadata.plan", "pro")
        with trace.use_span(agent):
            plain = p.tracer.start_span("background-task")
            with trace.use_span(plain):
                llm = p.tracer.start_span("llm")
    plain.end()
    agent.end()
    set_request_id(1, llm)
    llm.end()
    root.end()
    assert p.flush()
    assert server.metadata == {1: {"user_id": "u", "plan": "pro"}}


@contextmanager
def tracing_log_handler(pipeline) -> Iterator[None]:
    """Our log records reach a handler that makes a span per record (a log shipper that traces)."""

    class TracedHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            with pipeline.tracer.start_as_current_span("ship-log"):
                pass

    handler = TracedHandler()
    logging.getLogger("otel_metadata").addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger("otel_metadata").removeHandler(handler)


def test_a_log_handler_that_traces_cannot_deadlock_the_app(server, make_pipeline) -> None:
    """Our warning (queue full) reaches a handler that makes a span inside the held trace."""
    p = make_pipeline(max_queue_size=1, max_export_batch_size=1, max_concurrency=1)
    server.gate = threading.Event()  # the server holds requests, so the queue stays full
    finished = threading.Event()

    def app() -> None:
        root = p.tracer.start_span("session")
        root.set_attribute("user.id", "u")
        with trace.use_span(root):
            root.end()  # ended but still current: later requests post at once, in this context
            for rid in range(3):
                with p.tracer.start_as_current_span("llm") as llm:
                    llm.set_attribute("promptlayer.metadata.n", str(rid))
                    set_request_id(rid)
        finished.set()

    try:
        with tracing_log_handler(p):
            worker = threading.Thread(target=app, daemon=True)
            worker.start()
            assert finished.wait(10), "the app thread hung in span.end()"
            assert wait_for(lambda: p.processor.stats()["dropped.queue_full"] >= 1)
    finally:
        server.gate.set()


def test_keys_of_a_post_given_up_on_travel_again_in_the_follow_up(server, make_pipeline) -> None:
    """An early post fails until its export timeout; the root's follow-up repairs it."""
    from otel_metadata import RetryPolicy
    from otel_metadata.testing.track_metadata import Faults

    # Every answer is a 503 until the first post is given up on: a count of scripted 503s could
    # run out inside the export timeout when the jittered backoffs come out short.
    server.faults = Faults(status={503: 1.0})
    p = make_pipeline(export_timeout_millis=200, retry=RetryPolicy(0.05, 0.05))
    root = p.tracer.start_span("session")
    with trace.use_span(root), p.tracer.start_as_current_span("llm") as llm:
        llm.set_attribute("promptlayer.metadata.step", "1")
        set_request_id(1)
    assert p.flush() is False  # released early, then given up on after 503s
    assert server.metadata == {}
    server.faults = None
    root.set_attribute("user.id", "u")
    root.end()
    assert p.flush()
    assert server.metadata == {1: {"step": "1", "user_id": "u"}}


# -- the request's own subtree (SPEC §6 layer 2) --

def test_the_requests_descendants_contribute_nearer_then_later_ended(server,
                                                                     make_pipeline) -> None:
    p = make_pipeline()
    with p.tracer.start_as_current_span("handler") as root:
        root.set_attribute("promptlayer.metadata.from", "root")
        with p.tracer.start_as_current_span("request") as request:
            set_request_id(1)
            request.set_attribute("promptlayer.metadata.own", "request")
            with p.tracer.start_as_current_span("llm") as child:
                child.set_attributes({"promptlayer.metadata.from": "child",
                                      "promptlayer.metadata.own": "child",
                                      "promptlayer.metadata.depth": "1"})
                with p.tracer.start_as_current_span("http") as grandchild:
                    grandchild.set_attributes({"promptlayer.metadata.depth": "2",
                                               "promptlayer.metadata.deep": "yes"})
            for n in ("first", "second"):  # the same depth: the later-ended wins
                with p.tracer.start_as_current_span("retry") as retry:
                    retry.set_attribute("promptlayer.metadata.attempt", n)
    assert p.flush()
    assert server.metadata == {1: {"own": "request", "from": "child", "depth": "1",
                                   "deep": "yes", "attempt": "second"}}


def test_two_requests_under_one_parent_keep_their_own_children(server, make_pipeline) -> None:
    p = make_pipeline()
    with p.tracer.start_as_current_span("handler") as root:
        root.set_attribute("user.id", "u")
        for rid in (1, 2):
            with p.tracer.start_as_current_span("request"):
                set_request_id(rid)
                with p.tracer.start_as_current_span("llm") as llm:
                    llm.set_attribute(f"promptlayer.metadata.only_{rid}", "x")
                    llm.set_attribute("gen_ai.conversation.id", f"c{rid}")
    assert p.flush()
    assert server.metadata == {1: {"user_id": "u", "only_1": "x", "conversation_id": "c1"},
                               2: {"user_id": "u", "only_2": "x", "conversation_id": "c2"}}


def test_a_nested_request_keeps_its_subtree_and_the_outer_keeps_out(server,
                                                                    make_pipeline) -> None:
    p = make_pipeline()
    with p.tracer.start_as_current_span("agent") as outer:
        set_request_id(1)
        outer.set_attribute("promptlayer.metadata.agent", "planner")
        with p.tracer.start_as_current_span("plan") as plan:  # the outer's own subtree
            plan.set_attribute("promptlayer.metadata.plan", "3 steps")
        with p.tracer.start_as_current_span("tool call") as inner:
            set_request_id(2)
            inner.set_attribute("promptlayer.metadata.tool", "search")
            with p.tracer.start_as_current_span("llm") as llm:
                llm.set_attribute("user.id", "inner's llm")
    assert p.flush()
    assert server.metadata == {1: {"agent": "planner", "plan": "3 steps"},
                               2: {"agent": "planner", "tool": "search",
                                   "user_id": "inner's llm"}}


def test_a_descendant_that_ends_after_the_post_sends_a_follow_up(server, make_pipeline) -> None:
    """A streamed LLM span outlives the request span and the handler (its local root)."""
    p = make_pipeline()
    with p.tracer.start_as_current_span("handler"):
        with p.tracer.start_as_current_span("request") as request:
            set_request_id(1)
            request.set_attribute("promptlayer.metadata.step", "1")
            stream = p.tracer.start_span("llm stream")
    assert p.flush()
    assert server.metadata == {1: {"step": "1"}}
    stream.set_attributes({"promptlayer.metadata.tokens": 42,
                           "promptlayer.metadata.step": "weaker than the request's own"})
    stream.end()
    assert p.flush()
    assert [post.metadata for post in server.accepted()] == [{"step": "1"}, {"tokens": "42"}]


def test_a_request_that_is_its_own_local_root_gets_children_that_ended_first(
        server, make_pipeline) -> None:
    p = make_pipeline()
    with p.tracer.start_as_current_span("job"):
        set_request_id(1)
        with p.tracer.start_as_current_span("llm") as llm:
            llm.set_attribute("enduser.id", "batch-user")
    assert p.flush()
    assert server.metadata == {1: {"user_id": "batch-user"}}


def test_a_chain_completed_after_its_root_ended_posts_at_once() -> None:
    """Fleet mode: the front service's root can arrive before the spans between it and a
    request; the request goes out when the chain is complete, not at the end of the wait."""
    posted: list[tuple[object, dict[str, str]]] = []
    join = TraceJoin(lambda rid, md: posted.append((rid, md)) is None, static={},
                     max_traces=10, max_wait_s=600, stats=Stats())
    join.add(SpanData(1, 10, None, True, {"user_id": "a"}))  # service A's root, first
    join.add(SpanData(1, 30, 20, False, {}, request_ids=(7,)))  # the request, under span 20
    assert posted == []  # span 20 is not known yet: neither is the root above the request
    join.add(SpanData(1, 20, 10, False, {"tier": "b"}))  # service B's server span arrives
    assert posted == [(7, {"user_id": "a", "tier": "b"})]


def test_lone_roots_are_remembered_beyond_max_traces(server, make_pipeline) -> None:
    """Handler spans that end before their request span (a streamed answer) are remembered
    by a bound of their own, not the few `max_traces` held traces."""
    p = make_pipeline(max_traces=3, max_trace_wait_millis=600_000)
    late = []
    for rid in range(1, 11):
        root = p.tracer.start_span("POST /chat")
        root.set_attribute("user.id", f"u{rid}")
        with trace.use_span(root):
            late.append((rid, p.tracer.start_span("llm")))
        root.end()  # the handler returned; its stream is read later
    for rid, llm in late:
        with trace.use_span(llm, end_on_exit=True):
            set_request_id(rid)
    assert p.flush()
    assert server.metadata == {rid: {"user_id": f"u{rid}"} for rid in range(1, 11)}


class _Name(str):
    """A str subclass, as an app's own string type: the SDK keeps it as an attribute value."""


def test_a_root_whose_values_are_str_subclasses_is_remembered_and_serves_a_late_request(
        server, make_pipeline) -> None:
    """Remembered roots are kept in a compact form that takes exact strings only: an app's own
    string type (a StrEnum, say) is mapped to its text as a plain string, so such a root is
    remembered like any other rather than held as a trace (each one under `max_traces`)."""
    p = make_pipeline(max_trace_wait_millis=600_000)
    root = p.tracer.start_span("POST /chat")
    root.set_attribute("user.id", _Name("bob"))
    with trace.use_span(root):
        llm = p.tracer.start_span("llm")
    root.end()  # the handler returned; its stream is read later
    assert wait_for(lambda: p.processor.stats()["backlog"] == 0)
    assert p.processor.stats()["held_traces"] == 0
    with trace.use_span(llm, end_on_exit=True):
        set_request_id(1)
    assert p.flush()
    assert server.metadata == {1: {"user_id": "bob"}}


def test_remembered_roots_cost_the_garbage_collector_nothing() -> None:
    """Tens of thousands of roots are remembered at a time on a busy app: none of them adds an
    object the garbage collector tracks, so a full collection (on whichever thread it falls,
    the app's too) does not visit them."""
    posted: list[tuple[object, dict[str, str]]] = []
    join = TraceJoin(lambda rid, md: posted.append((rid, md)) is None, static={},
                     max_traces=10, max_wait_s=600, stats=Stats())
    gc.collect()
    before = len(gc.get_objects())
    for tid in range(1, 20_001):
        assert join.remember(tid, tid, 7, {"user_id": f"u{tid}", "tier": "gold"},
                             {"end_user": f"e{tid}"})
    gc.collect()
    assert len(gc.get_objects()) - before < 100
    join.add(SpanData(123, 9, 123, False, {}, request_ids=(1,)))  # a late request below one
    assert posted == [(1, {"user_id": "u123", "tier": "gold", "end_user": "e123"})]


def test_remembered_roots_are_forgotten_after_their_wait_and_bounded(monkeypatch) -> None:
    """A lone root serves a request that ends within the wait, not after; past the bound the
    oldest go first, each counted; memory stays within the bound however many roots end."""
    monkeypatch.setattr("otel_metadata.lineage.MAX_REMEMBERED_ROOTS", 4096)
    now = [0.0]
    posted: list[tuple[object, dict[str, str]]] = []
    stats = Stats()
    join = TraceJoin(lambda rid, md: posted.append((rid, md)) is None, static={},
                     max_traces=10, max_wait_s=5.0, stats=stats, clock=lambda: now[0])

    def remember(tids: range) -> None:
        for tid in tids:
            join.remember(tid, tid, None, {"user_id": f"u{tid}"}, None)
            assert len(join.ended_roots) <= 2048  # one generation: half the bound

    remember(range(1, 1501))  # within one wait
    now[0] = 4.0
    join.add(SpanData(1, 10_001, 1, False, {}, request_ids=(1,)))  # still within root 1's wait
    now[0] = 6.0  # roots 2.. are past their wait now
    join.add(SpanData(2, 10_002, 2, False, {}, request_ids=(2,)))  # remembered, not used
    remember(range(3001, 3101))
    join.expire()
    assert stats.snapshot().get("traces_evicted", 0) == 0  # none forgotten within its wait
    remember(range(5001, 13001))  # 8 000 new ones within one wait: twice the bound
    join.add(SpanData(5001, 20_001, 5001, False, {}, request_ids=(3,)))  # evicted: the oldest
    join.add(SpanData(12000, 20_002, 12000, False, {}, request_ids=(4,)))  # recent ones stay
    join.release_all()
    # All but the two generations kept (at most the bound, at least one generation) counted.
    assert 8000 + 100 - 4096 <= stats.snapshot()["traces_evicted"] <= 8000 + 100 - 2048
    assert dict(posted) == {1: {"user_id": "u1"}, 4: {"user_id": "u12000"}}
