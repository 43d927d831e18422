"""Fleet mode: spans per second one `otel-metadata serve` instance decodes and joins.

A client process makes traces with the real SDK (a handler span with `user.id` and HTTP
attributes, two internal spans, an LLM span with `promptlayer.request_id` and gen_ai
attributes), then sends them with the SDK's real OTLP exporter (`--protocol`: http or grpc) in
batches of 512 (the batch span processor's default), timing its own encode-and-send. This process
runs the receiver (`serve.Serve` over the pipeline, as `otel-metadata serve` does), posting to the
local track-metadata server in its own process; it measures its own CPU time (every thread: the
server's, the lineage worker's, the senders') from the first request until every request ID was
delivered, split by thread (Linux /proc): the lineage worker (join), the senders (delivery: one
POST per request ID, so its cost follows requests, not spans), and the rest (receiving and
decoding, feeding the intake). Decode + join per CPU-second is the rate one instance sustains on
one core (the GIL keeps its Python work on one core at a time); the target is 20 000 spans/s.
The exporter's rate beside it is what one SDK process encodes and sends in the same run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from _common import (
    API_KEY,
    HERE,
    clean_env_copy,
    clean_environment,
    emit,
    local_server,
    machine,
    median,
    parser,
    verdict,
)

TARGET = 20_000
SPANS_PER_TRACE = 4
BATCH = 512


def client(protocol: str, endpoint: str, traces: int) -> dict[str, Any]:
    """Make the traces, then send them; the exporter's wall and CPU time per span."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind

    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "bench-chat",
                                                        "deployment.environment.name": "prod"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("bench")
    for i in range(traces):
        with tracer.start_as_current_span("POST /v1/chat", kind=SpanKind.SERVER, attributes={
                "user.id": f"user-{i % 97}", "http.request.method": "POST",
                "http.route": "/v1/chat", "url.path": "/v1/chat", "server.address": "chat",
                "http.response.status_code": 200}):
            with tracer.start_as_current_span("retrieve", attributes={"db.system": "pg",
                                                                       "db.operation": "SELECT"}):
                pass
            with tracer.start_as_current_span("answer", attributes={"step": "answer"}):
                with tracer.start_as_current_span("chat gpt-4o-mini", kind=SpanKind.CLIENT,
                                                  attributes={
                        "promptlayer.request_id": 5_000_000 + i, "gen_ai.system": "openai",
                        "gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o-mini",
                        "gen_ai.usage.input_tokens": 812, "gen_ai.usage.output_tokens": 96,
                        "gen_ai.response.finish_reasons": ("stop",),
                        "server.address": "api.openai.com"}):
                    pass
    spans = memory.get_finished_spans()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        exporter: Any = OTLPSpanExporter(endpoint=endpoint, insecure=True)
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )
        exporter = HttpExporter(endpoint=endpoint)
    exporter.export(spans[:1])  # connect before timing (this span is sent twice: harmless)
    wall, cpu = time.perf_counter(), time.process_time()
    ok = all(exporter.export(spans[i:i + BATCH]).name == "SUCCESS"
             for i in range(0, len(spans), BATCH))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    exporter.shutdown()
    return {"spans": len(spans), "ok": ok, "wall_s": wall, "cpu_s": cpu}


def thread_cpu(prefix: str) -> float:
    """CPU seconds of this process's live threads whose name starts with `prefix` (Linux)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for thread in threading.enumerate():
        if thread.name.startswith(prefix) and thread.native_id is not None:
            stat = Path(f"/proc/self/task/{thread.native_id}/stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()  # after the name: field 3 on
            total += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return total


_JOIN, _DELIVERY = "otel-metadata-lineage", "otel-metadata-sender"


def run_once(protocol: str, traces: int, base_url: str) -> dict[str, Any]:
    from otel_metadata import config
    from otel_metadata.pipeline import Pipeline
    from otel_metadata.serve import Serve

    # The record queue holds every request of the run: the senders (one POST per request ID)
    # are slower than the join, and the figure is about decoding and joining, not dropping.
    pipeline = Pipeline(config.resolve(api_key=API_KEY, base_url=base_url,
                                       max_queue_size=2 * traces))
    serve = Serve(pipeline, ("127.0.0.1", 0) if protocol == "http" else None,
                  ("127.0.0.1", 0) if protocol == "grpc" else None)
    serve.start()
    endpoint = (f"http://127.0.0.1:{serve.http_port}/v1/traces" if protocol == "http"
                else f"127.0.0.1:{serve.grpc_port}")
    proc = subprocess.Popen([sys.executable, str(HERE / "bench_serve.py"), "--client", protocol,
                             endpoint, str(traces)], stdout=subprocess.PIPE, text=True,
                            env=clean_env_copy())
    # The client makes its spans first (this process is idle meanwhile), then sends.
    wall, cpu = time.perf_counter(), time.process_time()
    join, delivery = thread_cpu(_JOIN), thread_cpu(_DELIVERY)
    out, _ = proc.communicate(timeout=600)
    flushed = pipeline.force_flush(120_000)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    join, delivery = thread_cpu(_JOIN) - join, thread_cpu(_DELIVERY) - delivery
    stats = pipeline.stats()
    serve.stop(5.0)
    return {"client": json.loads(out), "receiver_cpu_s": cpu, "receiver_wall_s": wall,
            "join_cpu_s": join, "delivery_cpu_s": delivery,
            "receive_cpu_s": cpu - join - delivery, "flushed": flushed,
            "accepted_spans": serve.receiver.counts()["accepted_spans"],
            "delivered": stats.get("delivered", 0)}


def measure(protocol: str, traces: int, reps: int) -> dict[str, Any]:
    clean_environment()
    runs = []
    with local_server() as server:
        for _ in range(reps):
            runs.append(run_once(protocol, traces, server.base_url))
            got = server.report()
            runs[-1]["correct"] = got["statuses"] == {"200": traces} and all(
                md["user_id"] == f"user-{(rid - 5_000_000) % 97}" for rid, md in got["metadata"])
    spans = traces * SPANS_PER_TRACE

    def us_per_span(key: str) -> float:
        return median([r[key] / spans * 1e6 for r in runs])

    return {
        "protocol": protocol, "traces": traces, "spans": spans, "reps": reps,
        "decode_join_spans_per_cpu_s": median([
            spans / (r["receive_cpu_s"] + r["join_cpu_s"]) for r in runs]),
        "receive_us_per_span": us_per_span("receive_cpu_s"),
        "join_us_per_span": us_per_span("join_cpu_s"),
        "delivery_us_per_request": us_per_span("delivery_cpu_s") * SPANS_PER_TRACE,
        "receiver_spans_per_cpu_s": median([spans / r["receiver_cpu_s"] for r in runs]),
        "receiver_cpu_us_per_span": us_per_span("receiver_cpu_s"),
        "exporter_spans_per_s": median([spans / r["client"]["wall_s"] for r in runs]),
        "exporter_cpu_us_per_span": median([r["client"]["cpu_s"] / spans * 1e6 for r in runs]),
        "all_delivered": all(r["correct"] and r["flushed"] and r["client"]["ok"] for r in runs),
        "runs": runs, "machine": machine(),
    }


def report(res: dict[str, Any]) -> str:
    return "\n".join([
        f"serve over OTLP/{res['protocol']}: {res['traces']} traces, {res['spans']} spans in "
        f"batches of {BATCH}; median of {res['reps']} repetitions",
        f"  receiver, decode + join       {res['decode_join_spans_per_cpu_s']:9.0f} spans per "
        f"CPU-second (receive+decode {res['receive_us_per_span']:.1f} + join "
        f"{res['join_us_per_span']:.1f} µs per span)   target >= {TARGET}  "
        f"{verdict(res['decode_join_spans_per_cpu_s'] >= TARGET)}",
        f"  delivery (one POST per request ID)  {res['delivery_us_per_request']:9.0f} µs CPU per "
        f"request; with it, at 1 request per {SPANS_PER_TRACE} spans: "
        f"{res['receiver_spans_per_cpu_s']:.0f} spans per CPU-second "
        f"({res['receiver_cpu_us_per_span']:.1f} µs per span)",
        f"  SDK OTLP exporter, encode + send    {res['exporter_spans_per_s']:9.0f} spans/s "
        f"({res['exporter_cpu_us_per_span']:.1f} µs CPU per span)   (beside it)",
        f"  every request delivered with its handler's user: {res['all_delivered']}",
    ])


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--client"]:
        print(json.dumps(client(args[1], args[2], int(args[3]))))
        return 0
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--protocol", choices=["http", "grpc", "both"], default="both")
    p.add_argument("--traces", type=int, default=5000)
    p.add_argument("--reps", type=int, default=3)
    opts = p.parse_args(args)
    results = {}
    for protocol in (["http", "grpc"] if opts.protocol == "both" else [opts.protocol]):
        results[protocol] = measure(protocol, opts.traces, opts.reps)
        print(report(results[protocol]), flush=True)
    emit({"results": results}, opts.json)
    ok = all(r["decode_join_spans_per_cpu_s"] >= TARGET and r["all_delivered"]
             for r in results.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
