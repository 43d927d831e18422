"""Other tools' conventions (SPEC §4) reach the request, with the real libraries (SPEC §6).

Each tool writes what its users already call (OpenInference's `using_*`, Traceloop's
association properties, Langfuse's `propagate_attributes` and observations) around an LLM call
made with the official `openai` client against the local OpenAI-compatible stub, traced by the
tool's own instrumentation below the span the request ID is linked to.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openinference.instrumentation import (
    using_attributes,
    using_metadata,
    using_session,
    using_user,
)
from openinference.instrumentation.openai import OpenAIInstrumentor as OpenInferenceOpenAI
from opentelemetry import baggage, context
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.instrumentation.openai import OpenAIInstrumentor as TraceloopOpenAI
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator
from traceloop.sdk.tracing.tracing import get_default_span_processor, set_association_properties

from otel_metadata import metadata_context, set_request_id
from otel_metadata.testing.openai_api import OpenAIStub

QUESTION = [{"role": "user", "content": "What is OpenTelemetry?"}]


@pytest.fixture(autouse=True)
def _no_conventions_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMPTLAYER_METADATA_CONVENTIONS", raising=False)


@pytest.fixture(scope="module")
def stub() -> Iterator[OpenAIStub]:
    with OpenAIStub() as s:
        yield s


@pytest.fixture
def client(stub: OpenAIStub) -> openai.OpenAI:
    return openai.OpenAI(api_key=stub.api_key, base_url=stub.base_url, max_retries=0)


def ask(client: openai.OpenAI, **kwargs: Any) -> None:
    client.chat.completions.create(model="gpt-4o-mini", messages=QUESTION, **kwargs)


@contextmanager
def instrumented(instrumentor: Any, provider: Any) -> Iterator[None]:
    """One tool's OpenAI instrumentation on the test's provider, removed afterwards.

    Traceloop's `uninstrument` (0.62.4) leaves its wrappers on the client's methods, and they
    break later tests' streamed calls (PromptLayer's proxy): the methods are put back by hand.
    """
    before = _openai_methods()
    instrumentor.instrument(tracer_provider=provider)
    try:
        yield
    finally:
        instrumentor.uninstrument()
        for (cls, name), method in before.items():
            if cls.__dict__.get(name) is not method:
                setattr(cls, name, method)


def _openai_methods() -> dict[tuple[type, str], Any]:
    import sys

    return {(cls, name): method
            for module_name, module in list(sys.modules.items())
            if module_name.startswith("openai.resources") and module is not None
            for cls in vars(module).values() if isinstance(cls, type)
            and cls.__module__ == module_name
            for name, method in list(vars(cls).items()) if callable(method)}


@contextmanager
def restored_context() -> Iterator[None]:
    """Traceloop's `set_association_properties` attaches a context and never detaches it."""
    token = context.attach(context.get_current())
    try:
        yield
    finally:
        context.detach(token)


# -- OpenInference --

def test_openinference_using_attributes_on_its_llm_span_reach_the_request(
        server, make_pipeline, client) -> None:
    p = make_pipeline()
    with instrumented(OpenInferenceOpenAI(), p.provider):
        with using_attributes(user_id="u-oi", session_id="s-oi",
                              metadata={"plan": "pro", "seats": 3, "flags": {"beta": True}}):
            # The request span is the app's own; the LLM span below is OpenInference's.
            with p.tracer.start_as_current_span("handle"):
                set_request_id(1)
                ask(client)
    assert p.flush()
    assert server.metadata == {1: {"user_id": "u-oi", "conversation_id": "s-oi",
                                   "plan": "pro", "seats": "3", "flags": '{"beta": true}'}}
    assert p.processor.stats()["json_nested_values"] >= 1  # the span and the context each


def test_openinference_context_values_reach_a_request_without_its_instrumentation(
        server, make_pipeline, client) -> None:
    """The LLM call is not traced by OpenInference (another client, or PromptLayer's SDK): the
    values its helpers put in the context still reach the request span started inside."""
    p = make_pipeline()
    with using_user("u-ctx"), using_session("s-ctx"), using_metadata({"plan": "outer"}):
        with using_metadata({"plan": "inner", "tier": "gold"}):  # nested: the inner replaces
            with p.tracer.start_as_current_span("llm"):
                set_request_id(1)
                ask(client)
    assert p.flush()
    assert server.metadata == {1: {"user_id": "u-ctx", "conversation_id": "s-ctx",
                                   "plan": "inner", "tier": "gold"}}


# -- Traceloop / OpenLLMetry --

def test_traceloop_association_properties_in_the_context_reach_the_request(
        server, make_pipeline, client) -> None:
    p = make_pipeline()
    with instrumented(TraceloopOpenAI(), p.provider), restored_context():
        set_association_properties({"user_id": "u-tl", "tenant": "acme", "seats": 5})
        with p.tracer.start_as_current_span("llm-call"):
            set_request_id(1)
            ask(client, user="end-user-7")  # Traceloop records it as gen_ai.user: weaker
    assert p.flush()
    assert server.metadata == {1: {"user_id": "u-tl", "tenant": "acme", "seats": "5"}}


def test_traceloop_sdk_span_attributes_reach_the_request(server, make_pipeline, client) -> None:
    """Traceloop's own span processor copies the properties to every span as
    ``traceloop.association.properties.<key>``; its LLM span is below the request span."""
    p = make_pipeline()
    p.provider.add_span_processor(get_default_span_processor(
        disable_batch=True, exporter=InMemorySpanExporter()))
    with instrumented(TraceloopOpenAI(), p.provider), restored_context():
        with p.tracer.start_as_current_span("handle"):
            set_request_id(1)
            set_association_properties({"conversation": "c-9", "plan": "team"})
            ask(client)
    assert p.flush()
    assert server.metadata == {1: {"conversation": "c-9", "plan": "team"}}


# -- the LLM request's own end-user field --

def test_the_requests_own_end_user_field_is_the_weakest_user_id(
        server, make_pipeline, client) -> None:
    p = make_pipeline()
    with instrumented(TraceloopOpenAI(), p.provider):
        with p.tracer.start_as_current_span("handle"):
            set_request_id(1)
            ask(client, user="end-user-1")
        with p.tracer.start_as_current_span("handle") as span:
            span.set_attribute("enduser.id", "from-the-app")
            set_request_id(2)
            ask(client, user="end-user-2")
    assert p.flush()
    assert server.metadata == {1: {"user_id": "end-user-1"}, 2: {"user_id": "from-the-app"}}


def test_the_end_user_field_is_weaker_than_static_metadata(server, make_pipeline,
                                                           client) -> None:
    p = make_pipeline(metadata={"user_id": "static-user"})
    with instrumented(TraceloopOpenAI(), p.provider):
        with p.tracer.start_as_current_span("handle"):
            set_request_id(1)
            ask(client, user="end-user")
    assert p.flush()
    assert server.metadata == {1: {"user_id": "static-user"}}


# -- Langfuse --

@pytest.fixture
def langfuse_on(make_pipeline) -> Iterator[Any]:
    """A pipeline whose provider also runs Langfuse's client (spans kept in memory: nothing
    leaves the machine)."""
    from langfuse import Langfuse

    p = make_pipeline()
    # Langfuse keeps one client per public key: a key of this test's own.
    client = Langfuse(public_key=f"pk-lf-{id(p)}", secret_key="sk-lf-test",
                      base_url="http://127.0.0.1:9", tracer_provider=p.provider,
                      span_exporter=InMemorySpanExporter())
    p.langfuse = client
    try:
        yield p
    finally:
        client.shutdown()


def test_langfuse_propagated_attributes_and_observation_metadata_reach_the_request(
        server, langfuse_on) -> None:
    from langfuse import propagate_attributes

    p = langfuse_on
    with propagate_attributes(user_id="u-lf", session_id="s-lf", metadata={"plan": "lf"}):
        with p.tracer.start_as_current_span("handle"):
            set_request_id(1)
            with p.langfuse.start_as_current_observation(
                    name="answer", as_type="generation",
                    metadata={"step": "draft", "attempt": 2, "doc": {"id": 7}}):
                pass
    assert p.flush()
    # Langfuse JSON-encodes each metadata value: strings are decoded, the rest read as JSON.
    assert server.metadata == {1: {"user_id": "u-lf", "conversation_id": "s-lf", "plan": "lf",
                                   "step": "draft", "attempt": "2", "doc": '{"id":7}'}}


def test_langfuse_baggage_reaches_a_downstream_service(server, make_pipeline) -> None:
    from langfuse import propagate_attributes

    carrier: dict[str, str] = {}
    with propagate_attributes(user_id="u-up", session_id="s-up", metadata={"plan": "up"},
                              as_baggage=True):
        W3CBaggagePropagator().inject(carrier)
    p = make_pipeline()
    token = context.attach(W3CBaggagePropagator().extract(carrier))
    try:
        with p.tracer.start_as_current_span("llm"):
            set_request_id(1)
    finally:
        context.detach(token)
    assert p.flush()
    assert server.metadata == {1: {"user_id": "u-up", "conversation_id": "s-up", "plan": "up"}}


def test_langfuse_names_set_by_hand_as_its_otel_docs_say(server, make_pipeline) -> None:
    p = make_pipeline()
    with p.tracer.start_as_current_span("handle") as span:
        span.set_attributes({"langfuse.user.id": "u-hand", "langfuse.session.id": "s-hand",
                             "langfuse.trace.metadata.plan": "raw text",
                             "langfuse.observation.metadata.plan": '"observation wins"'})
        set_request_id(1)
    assert p.flush()
    assert server.metadata == {1: {"user_id": "u-hand", "conversation_id": "s-hand",
                                   "plan": "observation wins"}}


# -- choosing conventions --

@pytest.mark.parametrize(("chosen", "expected"), [
    (None, {"user_id": "u-oi", "tenant": "acme"}),
    ("openinference", {"user_id": "u-oi"}),
    ("traceloop,genai", {"user_id": "end-user", "tenant": "acme"}),
    ("none", {}),
])
def test_the_conventions_setting_chooses_the_tools(server, make_pipeline, client, chosen,
                                                   expected) -> None:
    p = make_pipeline(conventions=chosen)
    with instrumented(TraceloopOpenAI(), p.provider), restored_context():
        set_association_properties({"tenant": "acme"})
        with using_user("u-oi"), p.tracer.start_as_current_span("handle"):
            set_request_id(1)
            ask(client, user="end-user")
    assert p.flush()
    assert server.metadata.get(1, {}) == expected


def test_a_bad_conventions_variable_warns_and_means_all(server, make_pipeline, monkeypatch,
                                                        caplog) -> None:
    monkeypatch.setenv("PROMPTLAYER_METADATA_CONVENTIONS", "openinference,langsmith")
    p = make_pipeline()
    assert "PROMPTLAYER_METADATA_CONVENTIONS" in caplog.text and "langsmith" in caplog.text
    with p.tracer.start_as_current_span("handle") as span:
        span.set_attribute("langfuse.user.id", "u")
        set_request_id(1)
    assert p.flush()
    assert server.metadata == {1: {"user_id": "u"}}


# -- precedence between the layers and within one (SPEC §4, §6), over mixed layers --

SPAN_LAYERS = ("own", "child", "grandchild", "parent", "root")
# One layer's conventions, strongest first, each writing the key `k` its own way.
WRITERS = {
    "promptlayer": lambda v: {"promptlayer.metadata.k": v},
    "langfuse": lambda v: {"langfuse.observation.metadata.k": f'"{v}"'},
    "traceloop": lambda v: {"traceloop.association.properties.k": v},
    "openinference": lambda v: {"metadata": f'{{"k": "{v}"}}'},
}
USER_LAYERS = ("own", "child", "parent", "metadata_context", "baggage")

_request_ids = itertools.count(1)
layer_conventions = st.lists(st.sampled_from(sorted(WRITERS)), unique=True, max_size=3)


class CountingIds(IdGenerator):
    """Hypothesis seeds `random` alike for each example, and the SDK's default IDs come from
    it: every example would make the same trace and span IDs."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)

    def generate_span_id(self) -> int:
        return next(self._ids)

    def generate_trace_id(self) -> int:
        return next(self._ids)


@pytest.fixture
def mixed(make_pipeline):
    """One pipeline for all of hypothesis's examples (each its own request IDs)."""
    p = make_pipeline(resource={"promptlayer.metadata.k": "resource"},
                      metadata={"k": "static"})
    p.provider.id_generator = CountingIds()
    p.tracer = p.provider.get_tracer("mixed")  # a tracer takes the generator when it is made
    return p


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spans=st.fixed_dictionaries({name: layer_conventions for name in SPAN_LAYERS}),
       in_context=st.booleans(), in_tool_context=st.booleans(), in_baggage=st.booleans(),
       user_on=st.sets(st.sampled_from(USER_LAYERS)),
       end_user_on=st.sets(st.sampled_from(("own", "child", "parent"))))
def test_precedence_over_mixed_layers(server, mixed, spans, in_context, in_tool_context,
                                      in_baggage, user_on, end_user_on) -> None:
    """Key `k` set in any mix of layers, each layer by any mix of conventions: the strongest
    layer gives it, by its strongest convention; `user_id` likewise, the end-user field only
    when no layer has one. A sibling request and its LLM child never contribute."""
    p = mixed
    rid = next(_request_ids)

    def attrs(layer: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in spans[layer]:
            out.update(WRITERS[name](f"{layer}/{name}"))
        if layer in user_on:
            out["user.id"] = f"user/{layer}"
        if layer in end_user_on:
            out["gen_ai.user"] = f"end-user/{layer}"
        return out

    ctx = context.get_current()
    if in_baggage:
        ctx = baggage.set_baggage("promptlayer.metadata.k", "baggage", ctx)
    if "baggage" in user_on:
        ctx = baggage.set_baggage("user.id", "user/baggage", ctx)
    if in_tool_context:  # Traceloop's context key, as set_association_properties sets it
        ctx = context.set_value("association_properties", {"k": "tool-context"}, ctx)
    values = {"k": "context"} if in_context else {}
    if "metadata_context" in user_on:
        values["user_id"] = "user/metadata_context"
    token = context.attach(ctx)
    try:
        with metadata_context(**values), p.tracer.start_as_current_span("root") as root:
            root.set_attributes(attrs("root"))
            with p.tracer.start_as_current_span("parent") as parent:
                parent.set_attributes(attrs("parent"))
                with p.tracer.start_as_current_span("sibling request") as other:
                    other.set_attribute("promptlayer.metadata.k", "other request")
                    set_request_id(f"other-{rid}")
                    with p.tracer.start_as_current_span("its llm") as llm:
                        llm.set_attributes({"promptlayer.metadata.k": "other's child",
                                            "user.id": "other's child"})
                with p.tracer.start_as_current_span("request") as own:
                    own.set_attributes(attrs("own"))
                    set_request_id(rid)
                    with p.tracer.start_as_current_span("child") as child:
                        child.set_attributes(attrs("child"))
                        with p.tracer.start_as_current_span("grandchild") as grandchild:
                            grandchild.set_attributes(attrs("grandchild"))
    finally:
        context.detach(token)
    assert p.flush()

    given_k = {layer: f"{layer}/{_strongest(spans[layer])}"
               for layer in SPAN_LAYERS if spans[layer]}
    given_k.update({"resource": "resource", "static": "static"})
    for layer, on, value in (("context", in_context, "context"),
                             ("tool", in_tool_context, "tool-context"),
                             ("baggage", in_baggage, "baggage")):
        if on:
            given_k[layer] = value
    order = [*SPAN_LAYERS, "context", "tool", "baggage", "resource", "static"]
    expected = {"k": next(given_k[layer] for layer in order if layer in given_k)}
    users = [f"user/{layer}" for layer in USER_LAYERS if layer in user_on]
    end_users = [f"end-user/{layer}" for layer in ("own", "child", "parent")
                 if layer in end_user_on]
    if users or end_users:
        expected["user_id"] = (users or end_users)[0]
    assert server.metadata[rid] == expected
    assert server.metadata[f"other-{rid}"]["k"] == "other request"


def _strongest(names: list[str]) -> str:
    return next(name for name in WRITERS if name in names)
