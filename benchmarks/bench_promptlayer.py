"""CPU that PromptLayerInstrumentor adds to a PromptLayer SDK call, against the bare SDK call.

Both make the same call to the same local PromptLayer (`otel_metadata.testing.promptlayer_api`,
with its model), in the same run, inside a handler span of a provider with the metadata
processor. Measured: the calling thread's CPU time of each call (``time.thread_time``, so the
local servers' threads are not counted), bare and instrumented calls alternating one by one so
drift hits both alike; the figure is the difference of the two medians. Target: ≤ 50 µs added.
A call costs milliseconds of CPU and a shared machine moves that by more than the target, so
the last line also times the wrapping alone (capture, scope, link, per request ID) around a
function that answers at once, which resolves microseconds.

    .venv/bin/python benchmarks/bench_promptlayer.py [--calls 300]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

from opentelemetry.sdk.trace import TracerProvider
from promptlayer import PromptLayer

from otel_metadata import MetadataSpanProcessor
from otel_metadata.promptlayer import _REQUEST_ID, PromptLayerInstrumentor, _begin, _invoke
from otel_metadata.testing.promptlayer_api import MODEL, PromptLayerAPI
from otel_metadata.testing.track_metadata import TrackMetadataServer

KEY = "pl-bench-key-0123456789"
MESSAGES = [{"role": "user", "content": "hi"}]
TEXT = [{"type": "text", "text": "hi"}]


def calls(pl: PromptLayer) -> dict[str, Callable[[], Any]]:
    openai = pl.openai.OpenAI()
    blueprint = {"type": "chat", "messages": [{"role": "user", "content": TEXT}]}
    return {
        "run": lambda: pl.run("greeting", input_variables={"name": "Ana"}),
        "run stream": lambda: list(pl.run("greeting", input_variables={"name": "Ana"},
                                          stream=True)),
        "log_request": lambda: pl.log_request(
            provider="openai", model=MODEL, input=blueprint, output=blueprint,
            request_start_time=time.time(), request_end_time=time.time()),
        "proxy": lambda: openai.chat.completions.create(model=MODEL, messages=MESSAGES),
    }


def cpu_of(call: Callable[[], Any]) -> float:
    start = time.thread_time()
    call()
    return time.thread_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300, help="of each kind, bare and wrapped")
    args = parser.parse_args()
    with TrackMetadataServer(KEY) as server, PromptLayerAPI(KEY, track_metadata=server) as api:
        os.environ.update(OPENAI_API_KEY=api.llm_api_key, OPENAI_BASE_URL=api.llm_base_url)
        provider = TracerProvider()
        provider.add_span_processor(MetadataSpanProcessor(api_key=KEY, base_url=api.base_url))
        tracer = provider.get_tracer("bench")
        pl = PromptLayer(api_key=KEY, base_url=api.base_url)
        instrumentor = PromptLayerInstrumentor()
        print(f"{'call':<12} {'bare µs':>9} {'wrapped µs':>11} {'added µs':>9}")
        for name, call in calls(pl).items():
            bare: list[float] = []
            wrapped: list[float] = []
            with tracer.start_as_current_span("POST /chat") as span:
                span.set_attribute("user.id", "ana")
                call()  # warm: connections, client caches
                for _ in range(args.calls):
                    bare.append(cpu_of(call))
                    instrumentor.instrument()
                    wrapped.append(cpu_of(call))
                    instrumentor.uninstrument()
            b, w = statistics.median(bare) * 1e6, statistics.median(wrapped) * 1e6
            print(f"{name:<12} {b:>9.0f} {w:>11.0f} {w - b:>9.1f}")
        answer = {"request_id": 1}
        with tracer.start_as_current_span("POST /chat"):
            start = time.thread_time()
            for _ in range(20_000):
                _invoke(_begin(), lambda: answer, (), {}, _REQUEST_ID)
            alone = (time.thread_time() - start) / 20_000 * 1e6
        print(f"{'wrap alone':<12} {'':>9} {'':>11} {alone:>9.1f}")
        provider.shutdown()


if __name__ == "__main__":
    main()
