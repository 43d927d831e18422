"""PromptLayer SDK calls linked automatically (SPEC §3a): the real `promptlayer` package, a strict
local PromptLayer (`otel_metadata.testing.promptlayer_api`) in front of the local track-metadata
server, and an app that never calls `set_request_id`.

`make test` runs this file against promptlayer 1.5.16 (.venv) and 1.4.7 (.venv-pl14).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import promptlayer
import pytest
from conftest import API_KEY, Pipeline
from instrumented import QUIET_SIGNALS, run_app
from opentelemetry.context import Context
from opentelemetry.instrumentation import dependencies
from promptlayer import AsyncPromptLayer, PromptLayer
from promptlayer_calls import LATER, PROMPT, STYLES, VARIABLES, Clients, handler, stream_of

import otel_metadata.promptlayer as instrumentation
from otel_metadata import metadata_context
from otel_metadata.promptlayer import _PATCHES, PromptLayerInstrumentor, _owner
from otel_metadata.testing.promptlayer_api import ANTHROPIC_MODEL, PromptLayerAPI
from otel_metadata.testing.track_metadata import TrackMetadataServer

PL_14 = promptlayer.__version__.startswith("1.4.")
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "promptlayer_app.py"
# Tracing in the SDK: off; on (its private TracerProvider); on with the app's own provider
# (`tracer_provider=`, which 1.4 does not have).
MODES = ["off", "on", "user"]


@pytest.fixture
def api(server: TrackMetadataServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[PromptLayerAPI]:
    with PromptLayerAPI(API_KEY, track_metadata=server) as fake:
        monkeypatch.setenv("OPENAI_API_KEY", fake.llm_api_key)
        monkeypatch.setenv("OPENAI_BASE_URL", fake.llm_base_url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", fake.llm_api_key)
        monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.anthropic_base_url)
        # The 1.5 SDK's tracing sets these; keep them from leaking into later tests.
        for name in ("OTEL_SEMCONV_STABILITY_OPT_IN",
                     "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"):
            monkeypatch.delenv(name, raising=False)
        yield fake


@pytest.fixture
def instrumented() -> Iterator[PromptLayerInstrumentor]:
    instrumentor = PromptLayerInstrumentor()
    instrumentor.instrument()
    yield instrumentor
    instrumentor.uninstrument()


@pytest.fixture
def pipeline(make_pipeline: Callable[..., Pipeline]) -> Pipeline:
    return make_pipeline()


@pytest.fixture
def make_clients(api: PromptLayerAPI, pipeline: Pipeline) -> Iterator[Callable[[str], Clients]]:
    """Clients for a tracing mode; their private providers are flushed to the fake after."""
    made: list[Clients] = []

    def make(mode: str) -> Clients:
        if mode == "user" and PL_14:
            pytest.skip("promptlayer 1.4 has no tracer_provider=")
        options: dict[str, Any] = {"api_key": API_KEY, "base_url": api.base_url,
                                   "enable_tracing": mode != "off"}
        if mode == "user":
            options["tracer_provider"] = pipeline.provider
        clients = Clients(api, PromptLayer(**options), AsyncPromptLayer(**options),
                          asyncio.new_event_loop())
        made.append(clients)
        return clients

    yield make
    for clients in made:
        clients.loop.close()
        for client in (clients.sync, clients.aio):
            if client.tracer_provider not in (None, pipeline.provider):
                client.tracer_provider.shutdown()


def metadata_of(pipeline: Pipeline, server: TrackMetadataServer) -> dict[Any, dict[str, str]]:
    assert pipeline.flush()
    return server.metadata


def users(pipeline: Pipeline, server: TrackMetadataServer) -> dict[Any, str | None]:
    """Request ID -> the user.id that reached it."""
    return {rid: md.get("user_id") for rid, md in metadata_of(pipeline, server).items()}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("style", STYLES)
def test_every_call_style_gets_the_handlers_metadata(
    style: str, mode: str, instrumented: PromptLayerInstrumentor, api: PromptLayerAPI,
    pipeline: Pipeline, make_clients: Callable[[str], Clients], server: TrackMetadataServer,
) -> None:
    clients = make_clients(mode)
    with handler(pipeline.tracer):
        STYLES[style](clients)
    (request_id,) = api.ids()
    assert users(pipeline, server) == {request_id: "ana"}
    assert api.refused == ([] if not style.endswith("error") else
                           [("/v1/chat/completions", 400, "The model refused this request")])


def shape(value: Any) -> Any:
    """What the app got, with the request IDs (which differ per call) left out."""
    if isinstance(value, dict):
        return {k: "<id>" if k in ("request_id", "id") else shape(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [shape(v) for v in value])
    if isinstance(value, int) and not isinstance(value, bool):
        return "<id>"
    if hasattr(value, "model_dump"):
        return (type(value).__name__, value.model_dump())
    return value


@pytest.mark.parametrize("style", STYLES)
def test_the_app_gets_what_the_bare_sdk_returns(
    style: str, api: PromptLayerAPI, pipeline: Pipeline,
    make_clients: Callable[[str], Clients],
) -> None:
    clients = make_clients("off")
    with handler(pipeline.tracer):
        bare = STYLES[style](clients)
        instrumentor = PromptLayerInstrumentor()
        instrumentor.instrument()
        try:
            wrapped = STYLES[style](clients)
        finally:
            instrumentor.uninstrument()
    assert shape(wrapped) == shape(bare)
    assert len(api.ids()) == 2


# The six ways metadata was lost before (issue 11), each as the app writes it.

def two_calls_in_one_handler(c: Clients, pipeline: Pipeline, user: str) -> None:
    with handler(pipeline.tracer, user):
        c.sync.run(PROMPT, input_variables=VARIABLES)
        c.sync.openai.OpenAI().chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "and then?"}])


def inside_traceable(c: Clients, pipeline: Pipeline, user: str) -> None:
    @c.sync.traceable()
    def answer() -> Any:
        return c.sync.run(PROMPT, input_variables=VARIABLES)

    with handler(pipeline.tracer, user):
        answer()


def inside_nested_traceables(c: Clients, pipeline: Pipeline, user: str) -> None:
    @c.sync.traceable()
    def inner() -> Any:
        return c.sync.run(PROMPT, input_variables=VARIABLES)

    @c.sync.traceable()
    def outer() -> Any:
        return inner()

    with handler(pipeline.tracer, user):
        outer()


def stream_read_after_the_handler(c: Clients, pipeline: Pipeline, user: str) -> None:
    with handler(pipeline.tracer, user):
        stream = c.sync.run(PROMPT, input_variables=VARIABLES, stream=True)
    stream_of(stream)


def proxy_without_return_pl_id(c: Clients, pipeline: Pipeline, user: str) -> None:
    with handler(pipeline.tracer, user):
        STYLES["proxy"](c)


def failing_run(c: Clients, pipeline: Pipeline, user: str) -> None:
    with handler(pipeline.tracer, user):
        STYLES["run_error"](c)


LOSSES = [two_calls_in_one_handler, inside_traceable, inside_nested_traceables,
          stream_read_after_the_handler,
          proxy_without_return_pl_id, failing_run]


TRACING = (inside_traceable, inside_nested_traceables)  # the SDK's own tracing on


@pytest.mark.parametrize("loss", LOSSES, ids=lambda f: f.__name__)
def test_no_loss(loss: Callable[..., None], instrumented: PromptLayerInstrumentor,
                 api: PromptLayerAPI, pipeline: Pipeline,
                 make_clients: Callable[[str], Clients], server: TrackMetadataServer) -> None:
    """Losses 1-5 of issue 11: every request PromptLayer logged gets the handler's user."""
    loss(make_clients("on" if loss in TRACING else "off"), pipeline, "ana")
    assert api.ids() and users(pipeline, server) == dict.fromkeys(api.ids(), "ana")


@pytest.mark.parametrize("loss", LOSSES, ids=lambda f: f.__name__)
def test_no_loss_the_second_time(
    loss: Callable[..., None], instrumented: PromptLayerInstrumentor, api: PromptLayerAPI,
    pipeline: Pipeline, make_clients: Callable[[str], Clients], server: TrackMetadataServer,
) -> None:
    """Loss 6: the same again, later in the process (where a once-only warning stays silent)."""
    clients = make_clients("on" if loss in TRACING else "off")
    loss(clients, pipeline, "ana")
    first = api.ids()
    loss(clients, pipeline, "ben")
    again = [rid for rid in api.ids() if rid not in first]
    assert again and users(pipeline, server) == {**dict.fromkeys(first, "ana"),
                                                 **dict.fromkeys(again, "ben")}


@pytest.mark.parametrize("style", LATER)
def test_an_answer_read_elsewhere_belongs_to_where_the_call_was_made(
    style: str, instrumented: PromptLayerInstrumentor, api: PromptLayerAPI, pipeline: Pipeline,
    make_clients: Callable[[str], Clients], server: TrackMetadataServer,
) -> None:
    """A stream read, or a coroutine awaited, in another trace's span: the call's span wins."""
    clients = make_clients("off")
    call, read = LATER[style]
    with handler(pipeline.tracer, "ana"):
        answer = call(clients)
        with pipeline.tracer.start_as_current_span("elsewhere", context=Context()) as other:
            other.set_attribute("user.id", "ben")
            read(clients, answer)
    assert users(pipeline, server) == {api.ids()[0]: "ana"}


def test_context_values_are_those_where_the_call_started(
    instrumented: PromptLayerInstrumentor, api: PromptLayerAPI, pipeline: Pipeline,
    make_clients: Callable[[str], Clients], server: TrackMetadataServer,
) -> None:
    clients = make_clients("off")
    with handler(pipeline.tracer):
        with metadata_context(conversation_id="c-7"):
            stream = clients.sync.run(PROMPT, input_variables=VARIABLES, stream=True)
        stream_of(stream)  # read outside metadata_context, still in the handler
    assert metadata_of(pipeline, server) == {
        api.ids()[0]: {"user_id": "ana", "conversation_id": "c-7"}}


def originals() -> list[Any]:
    return [_owner(module, attribute)[0].__dict__[_owner(module, attribute)[1]]
            for module, attribute, _ in _PATCHES]


def test_uninstrument_restores_the_sdk(api: PromptLayerAPI, pipeline: Pipeline,
                                       make_clients: Callable[[str], Clients],
                                       server: TrackMetadataServer) -> None:
    before = originals()
    instrumentor = PromptLayerInstrumentor()
    instrumentor.instrument()
    assert all(a is not b for a, b in zip(originals(), before, strict=True))
    instrumentor.uninstrument()
    assert all(a is b for a, b in zip(originals(), before, strict=True))
    with handler(pipeline.tracer):
        STYLES["proxy"](make_clients("off"))
    assert metadata_of(pipeline, server) == {}


def test_another_sdk_version_is_left_alone_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    real = dependencies.version
    monkeypatch.setattr(dependencies, "version",
                        lambda name: "1.6.0" if name == "promptlayer" else real(name))
    monkeypatch.setattr(instrumentation, "_warned_version", False)
    before = originals()
    instrumentor = PromptLayerInstrumentor()
    with caplog.at_level(logging.WARNING, logger="otel_metadata"):
        for _ in range(2):  # as opentelemetry-instrument calls it: dependency check skipped
            instrumentor.instrument(skip_dep_check=True)
            instrumentor.uninstrument()
        instrumentor.instrument()  # as an app calls it: BaseInstrumentor's own check refuses
    assert originals() == before
    warnings = [r for r in caplog.records if r.name == "otel_metadata"]
    assert len(warnings) == 1 and "promptlayer 1.6.0 is not supported" in warnings[0].message


@pytest.mark.parametrize("broken", ["link_request_id", "get_current"])
@pytest.mark.parametrize("style", ["run", "run_stream", "run_error", "proxy_stream_pl_id",
                                   "proxy_async", "log_request_async"])
def test_a_failure_of_ours_never_reaches_the_app(
    style: str, broken: str, instrumented: PromptLayerInstrumentor,
    monkeypatch: pytest.MonkeyPatch, api: PromptLayerAPI, pipeline: Pipeline,
    make_clients: Callable[[str], Clients],
) -> None:
    def fail(*args: Any) -> None:
        raise RuntimeError("a bug of ours")

    clients = make_clients("off")
    with handler(pipeline.tracer):
        bare = STYLES[style](clients)
        monkeypatch.setattr(instrumentation, broken, fail)
        assert shape(STYLES[style](clients)) == shape(bare)


@pytest.mark.parametrize(("change", "error", "reason"), [
    ({"api_key": "sk-wrong"}, "AuthenticationError", "invalid x-api-key"),
    ({"extra_body": {"temprature": 0.5}}, "BadRequestError", "Extra inputs are not permitted"),
    ({"max_tokens": 0}, "BadRequestError", "max_tokens is missing or of the wrong type"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "BadRequestError",
     "the first message must use the user role"),
], ids=["key", "unknown field", "max_tokens", "first turn"])
def test_the_local_messages_api_refuses_what_anthropics_would(
        change: dict[str, Any], error: str, reason: str, api: PromptLayerAPI) -> None:
    """The Anthropic proxies are only as well tested as the fake is strict."""
    import anthropic

    def client(api_key: str = api.llm_api_key) -> anthropic.Anthropic:
        return anthropic.Anthropic(api_key=api_key, base_url=api.anthropic_base_url,
                                   max_retries=0)

    request = {"model": ANTHROPIC_MODEL, "max_tokens": 16,
               "messages": [{"role": "user", "content": "hi"}]}
    bad = {k: v for k, v in change.items() if k != "api_key"}
    with pytest.raises(anthropic.APIStatusError) as refused:
        client(change.get("api_key", api.llm_api_key)).messages.create(**{**request, **bad})
    assert type(refused.value).__name__ == error and reason in str(refused.value)
    answer = client().messages.create(**request)  # as asked, it is answered
    assert answer.content[0].text == "You asked: hi"  # type: ignore[union-attr]


def test_opentelemetry_instrument_finds_it_by_entry_point() -> None:
    (entry,) = entry_points(group="opentelemetry_instrumentor", name="promptlayer")
    assert entry.load() is PromptLayerInstrumentor
    assert PromptLayerInstrumentor().instrumentation_dependencies() == (
        "promptlayer >= 1.4, < 1.6",)


def example_env(api: PromptLayerAPI, **extra: str) -> dict[str, str]:
    return {**QUIET_SIGNALS, "OTEL_TRACES_EXPORTER": "promptlayer_metadata",
            "PROMPTLAYER_API_KEY": API_KEY, "PROMPTLAYER_BASE_URL": api.base_url,
            "PROMPTLAYER_METADATA_MAX_TRACE_WAIT": "1",
            "OPENAI_API_KEY": api.llm_api_key, "OPENAI_BASE_URL": api.llm_base_url, **extra}


def test_zero_code_every_request_gets_its_metadata(api: PromptLayerAPI,
                                                   server: TrackMetadataServer) -> None:
    """The example under opentelemetry-instrument: no tracing code, no ID plumbing."""
    run_app(EXAMPLE, example_env(api))
    ana, ben = api.ids()[:3], api.ids()[3:]
    assert len(ben) == 3
    assert {rid: md.get("user_id") for rid, md in server.metadata.items()} == {
        **dict.fromkeys(ana, "ana"), **dict.fromkeys(ben, "ben")}


def test_zero_code_honours_disabled_instrumentations(api: PromptLayerAPI,
                                                     server: TrackMetadataServer) -> None:
    run_app(EXAMPLE, example_env(api, OTEL_PYTHON_DISABLED_INSTRUMENTATIONS="promptlayer"))
    assert len(api.ids()) == 6 and server.metadata == {}


def test_the_example_runs_on_its_own_local_fakes() -> None:
    done = run_app(EXAMPLE, {}, instrument=False)
    rows = [line.split(" ", 1) for line in done.stdout.splitlines()]
    assert [(int(rid), md) for rid, md in rows] == [
        (90_001 + i, "{'user_id': '%s'}" % ("ana" if i < 3 else "ben")) for i in range(6)]

