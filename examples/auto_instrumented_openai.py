"""An OpenAI app traced by OpenTelemetry's own OpenAI instrumentation, with PromptLayer metadata.

The app holds no tracing setup and no processor: OpenTelemetry's auto-configuration builds the
provider, ``opentelemetry-instrumentation-openai-v2`` traces every ``chat.completions.create``,
and ``OTEL_TRACES_EXPORTER=promptlayer_metadata`` adds this package's metadata processor. The app
only says who the user is, once, with ``metadata_context``, and which PromptLayer request an
answer is, with ``set_request_id``.

    pip install otel-metadata opentelemetry-distro openai==2.54.0 \\
        opentelemetry-instrumentation-openai-v2==2.4b0 opentelemetry-util-genai==1.1b0
    export OTEL_TRACES_EXPORTER=promptlayer_metadata   # or otlp,promptlayer_metadata
    export OTEL_METRICS_EXPORTER=none OTEL_LOGS_EXPORTER=none   # unless you run a collector
    export PROMPTLAYER_API_KEY=pl_... OPENAI_API_KEY=sk-...
    opentelemetry-instrument python examples/auto_instrumented_openai.py

It runs the same as plain ``python examples/auto_instrumented_openai.py``: it then asks for the
same auto-configuration itself (``auto_instrumentation.initialize()``, OpenTelemetry's
programmatic form of ``opentelemetry-instrument``). The tests point ``OPENAI_BASE_URL`` at an
OpenAI-compatible stub and ``PROMPTLAYER_BASE_URL`` at the local track-metadata server.

Keep the pinned versions: openai-v2 2.4b0 does not load with openai 3.x nor with
opentelemetry-util-genai >= 1.2b0, and then no LLM span appears and nothing says why. This app
says why, and stops, when the instrumentation is not active.
"""

from __future__ import annotations

import itertools
import sys

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

if not isinstance(trace.get_tracer_provider(), TracerProvider):  # no opentelemetry-instrument
    from opentelemetry.instrumentation import auto_instrumentation

    auto_instrumentation.initialize()

# Imported only now: an instrumentation may need to patch the library before the app imports it.
from openai import OpenAI  # noqa: E402
from opentelemetry.instrumentation.openai_v2 import OpenAIInstrumentor  # noqa: E402

from otel_metadata import metadata_context, set_request_id  # noqa: E402

MODEL = "gpt-4o-mini"
tracer = trace.get_tracer("auto-instrumented-openai-example")

# Where your app gets PromptLayer request IDs: the `request_id` that PromptLayer returns when
# the call is logged (`PromptLayer().log_request(...)`, or `return_pl_id=True`). This example
# runs without a PromptLayer account, so it numbers them.
_promptlayer_ids = itertools.count(9101)


def answer(client: OpenAI, question: str) -> int:
    """One request: the LLM call (traced by openai-v2) and its PromptLayer request ID."""
    with tracer.start_as_current_span("answer question"):
        completion = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": question}])
        request_id = next(_promptlayer_ids)  # e.g. PromptLayer().log_request(...)["request_id"]
        set_request_id(request_id)
        print(f"request {request_id}: {completion.choices[0].message.content}")
        return request_id


def tracing_problem() -> str | None:
    """Why LLM calls would not be traced, or None. Silence here would look like no calls."""
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        return ("OpenTelemetry is not configured (see the errors above; is OTEL_TRACES_EXPORTER "
                "set, and OTEL_METRICS_EXPORTER/OTEL_LOGS_EXPORTER=none without a collector?)")
    if not OpenAIInstrumentor().is_instrumented_by_opentelemetry:
        return ("opentelemetry-instrumentation-openai-v2 is not active (is 'openai' in "
                "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS?): no LLM span would be recorded")
    return None


def main() -> int:
    problem = tracing_problem()
    if problem:
        print(problem, file=sys.stderr)
        return 1
    client = OpenAI()  # OPENAI_API_KEY, OPENAI_BASE_URL
    with metadata_context(user_id="alice", conversation_id="support-42"):  # said once
        for question in ("What is OpenTelemetry?", "And what is PromptLayer?"):
            answer(client, question)
    return 0  # at exit, the provider flushes the metadata of both requests


if __name__ == "__main__":
    sys.exit(main())
