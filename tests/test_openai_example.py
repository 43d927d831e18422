"""examples/auto_instrumented_openai.py end to end: the official openai client, traced by
opentelemetry-instrumentation-openai-v2, against an OpenAI-compatible stub on 127.0.0.1; metadata
posted to the local track-metadata server. Run as plain `python` (the app calls OpenTelemetry's
programmatic auto-instrumentation) and under `opentelemetry-instrument`.

The console exporter runs beside ours, so the test sees the spans themselves: it fails when the
OpenAI instrumentation produced no span, which is how a broken set of versions shows (see the
pins in pyproject.toml).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from instrumented import QUIET_SIGNALS, console_spans, run_app

from otel_metadata.testing.openai_api import OpenAIStub
from otel_metadata.testing.track_metadata import TrackMetadataServer

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "auto_instrumented_openai.py"
QUESTIONS = ["What is OpenTelemetry?", "And what is PromptLayer?"]
ALICE = {"user_id": "alice", "conversation_id": "support-42", "environment": "test"}


@pytest.fixture
def openai_stub() -> Iterator[OpenAIStub]:
    with OpenAIStub() as stub:
        yield stub


def example_env(server: TrackMetadataServer, stub: OpenAIStub) -> dict[str, str]:
    return {
        **QUIET_SIGNALS,
        "OTEL_TRACES_EXPORTER": "console,promptlayer_metadata",
        # Longer than the app runs: the console exporter prints only at exit, so its JSON never
        # interleaves with the app's own output. The exit flush sends everything at once.
        "OTEL_BSP_SCHEDULE_DELAY": "30000",
        "OTEL_RESOURCE_ATTRIBUTES": "promptlayer.metadata.environment=test",
        "PROMPTLAYER_API_KEY": server.api_key,
        "PROMPTLAYER_BASE_URL": server.base_url,
        "OPENAI_API_KEY": stub.api_key,
        "OPENAI_BASE_URL": stub.base_url,
    }


def llm_spans_by_request(spans: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Each request span's request ID -> the openai-v2 span below it (asserting there is one)."""
    by_parent: dict[str, list[dict[str, Any]]] = {}
    for span in spans:
        if span["attributes"].get("gen_ai.operation.name") == "chat":
            by_parent.setdefault(span["parent_id"], []).append(span)
    found = {}
    for span in spans:
        request_id = span["attributes"].get("promptlayer.request_id")
        if request_id is not None:
            children = by_parent.get(span["context"]["span_id"], [])
            assert len(children) == 1, f"no OpenAI span under request {request_id}: {spans}"
            found[request_id] = children[0]
    return found


@pytest.mark.parametrize("instrument", [False, True], ids=["python", "opentelemetry-instrument"])
def test_example_traces_openai_calls_and_their_metadata_arrives(
    server: TrackMetadataServer, openai_stub: OpenAIStub, instrument: bool,
) -> None:
    done = run_app(EXAMPLE, example_env(server, openai_stub), instrument=instrument)

    # The app really called the (stub) API through the official client...
    assert [r["messages"][-1]["content"] for r in openai_stub.requests] == QUESTIONS
    # ...openai-v2 traced each call, under the span that carries the request ID...
    llm = llm_spans_by_request(console_spans(done.stdout))
    assert sorted(llm) == [9101, 9102]
    for span in llm.values():
        assert span["attributes"]["gen_ai.provider.name"] == "openai"
        assert span["attributes"]["gen_ai.request.model"] == "gpt-4o-mini"
        # Missing with openai 3.x even where httpx happens to be installed: the instrumentation
        # only half works with that client.
        assert span["attributes"]["server.address"] == "127.0.0.1"
    # ...and the user, said once around both calls, reached both PromptLayer requests, with
    # nothing from the LLM span (prompts, model, tokens) and one POST each.
    assert server.metadata == {9101: ALICE, 9102: ALICE}
    assert server.statuses() == {200: 2}


def test_example_says_so_when_the_openai_instrumentation_is_not_active(
    server: TrackMetadataServer, openai_stub: OpenAIStub,
) -> None:
    env = {**example_env(server, openai_stub), "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "openai"}
    done = run_app(EXAMPLE, env, expect_exit=1)

    assert "opentelemetry-instrumentation-openai-v2 is not active" in done.stderr
    assert openai_stub.requests == [] and server.posts == []
