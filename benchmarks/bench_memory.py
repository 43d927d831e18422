"""Memory: peak RSS with 10 000 traces held by the lineage join, per held trace.

Each measurement runs in a fresh subprocess: set up a provider, warm up, note the peak RSS
(`ru_maxrss`), make 10 000 traces, note the peak again. The same spans are made on a bare
provider (no processor) as the baseline, so what the spans themselves cost cancels out; the
difference divided by 10 000 is what our processor keeps per trace. Two cases, defaults
throughout (max_traces 10 000, max_trace_wait 5 s):

- held: the handler span (6 attributes, `user.id` among them) is still open and its LLM child
  (6 attributes + `promptlayer.request_id` + `promptlayer.metadata.step`) has ended, so the join
  holds the trace waiting for its root (all 10 000 open handler spans are kept alive in both
  processes alike); nothing is posted while we measure;
- remembered root: the handler span (with `user.id`) ended with no request span under it, the
  commonest trace; the join remembers the root for `max_trace_wait` in case a late request span
  of the trace arrives.

And, as a fixed cost rather than a per-trace one: plain traffic, 100 000 traces whose spans carry
nothing for us (handler without `user.id`, LLM child without a request ID), for the parent links
the join remembers of spans it does not hold (two generations of 50 000).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
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
)

TRACES = 10_000
PLAIN_TRACES = 100_000
CASES = {"held": TRACES, "remembered root": TRACES, "plain traffic": PLAIN_TRACES}
WARMUP = 200

HANDLER = {"http.request.method": "POST", "http.route": "/v1/chat", "url.path": "/v1/chat",
           "url.scheme": "https", "http.response.status_code": 200}
LLM = {"gen_ai.operation.name": "chat", "gen_ai.system": "openai",
       "gen_ai.request.model": "gpt-4o-mini", "gen_ai.usage.input_tokens": 412,
       "gen_ai.usage.output_tokens": 128}


def _peak_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def child(case: str, ours: bool, base_url: str) -> dict[str, Any]:
    """Runs in the fresh subprocess."""
    clean_environment()
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import SpanKind

    from otel_metadata import MetadataSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": "bench-app"}))
    processor = None
    if ours:
        processor = MetadataSpanProcessor(api_key=API_KEY, base_url=base_url)
        provider.add_span_processor(processor)
    tracer = provider.get_tracer("bench")
    kept: list[Any] = []

    def make(i: int, end_handler: bool) -> None:
        if case == "plain traffic":
            with tracer.start_as_current_span("POST /v1/chat", kind=SpanKind.SERVER,
                                              attributes={**HANDLER, "server.address": "a"}), \
                    tracer.start_as_current_span(
                        "chat gpt-4o-mini", kind=SpanKind.CLIENT,
                        attributes={**LLM, "gen_ai.response.id": f"chatcmpl-{i:08x}"}):
                return
        handler = tracer.start_span("POST /v1/chat", kind=SpanKind.SERVER,
                                    attributes={**HANDLER, "user.id": f"user-{i:06d}"})
        if case == "held":
            with trace.use_span(handler):
                llm = tracer.start_span(
                    "chat gpt-4o-mini", kind=SpanKind.CLIENT,
                    attributes={**LLM, "gen_ai.response.id": f"chatcmpl-{i:08x}",
                                "promptlayer.request_id": 10_000_000 + i,
                                "promptlayer.metadata.step": "answer"})
                llm.end()
        if end_handler:
            handler.end()
        else:
            kept.append(handler)

    # Warm up every path, delivery included (the senders' connections are open from here on).
    for i in range(WARMUP):
        make(-1 - i, end_handler=True)
    if processor is not None:
        assert processor.force_flush(30_000)
    before = _peak_kib()
    for i in range(CASES[case]):
        make(i, end_handler=case != "held")
    after = _peak_kib()
    counts = processor.stats() if processor is not None else {}
    return {"before_kib": before, "after_kib": after, "delta_bytes": (after - before) * 1024,
            "held_traces": counts.get("held_traces"), "queued": counts.get("queued")}


def _run_child(case: str, ours: bool, base_url: str) -> dict[str, Any]:
    argv = [sys.executable, str(HERE / "bench_memory.py"), "--child", case, "--base-url",
            base_url]
    if ours:
        argv.append("--ours")
    out = subprocess.run(argv, capture_output=True, text=True, env=clean_env_copy(),
                         check=True, timeout=120)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def measure(reps: int) -> dict[str, Any]:
    cases: dict[str, dict[str, Any]] = {}
    with local_server() as server:
        for case, traces in CASES.items():
            bare, ours = [], []
            for _ in range(reps):  # interleaved, fresh processes
                bare.append(_run_child(case, False, server.base_url))
                ours.append(_run_child(case, True, server.base_url))
            cases[case] = _summary(bare, ours, traces)
    return {"reps": reps, "cases": cases}


def _summary(bare: list[dict[str, Any]], ours: list[dict[str, Any]],
             traces: int) -> dict[str, Any]:
    per_rep = [(o["delta_bytes"] - b["delta_bytes"]) / traces for b, o in
               zip(bare, ours, strict=True)]
    return {
        "traces": traces,
        "bare_peak_mib": median([b["after_kib"] for b in bare]) / 1024,
        "ours_peak_mib": median([o["after_kib"] for o in ours]) / 1024,
        "bare_delta_mib": median([b["delta_bytes"] for b in bare]) / 2**20,
        "ours_delta_mib": median([o["delta_bytes"] for o in ours]) / 2**20,
        "bytes_per_trace": median(per_rep),
        "per_rep": per_rep,
        "held_traces": [o["held_traces"] for o in ours],
        "queued": [o["queued"] for o in ours],
    }


def report(res: dict[str, Any]) -> str:
    lines = [f"memory: peak RSS (ru_maxrss), fresh subprocess each, ours minus a bare provider "
             f"making the same spans; median of {res['reps']}"]
    for name, c in res["cases"].items():
        held = c["held_traces"][0]
        growth = (f"peak RSS {c['bare_peak_mib']:.1f} MiB bare -> {c['ours_peak_mib']:.1f} MiB "
                  f"ours; growth {c['bare_delta_mib']:.1f} -> {c['ours_delta_mib']:.1f} MiB")
        if name == "plain traffic":
            lines.append(f"  {name + ':':17s} {c['ours_delta_mib'] - c['bare_delta_mib']:7.1f} MiB"
                         f" in all after {c['traces']} traces ({growth}; held by the join: "
                         f"{held})")
            continue
        lines.append(
            f"  {name + ':':17s} {c['bytes_per_trace']:7.0f} bytes per trace, {c['traces']} "
            f"traces ({growth}; held by the join: {held}"
            f"{' (roots remembered aside)' if name == 'remembered root' else ''})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--child", choices=tuple(CASES), help=argparse.SUPPRESS)
    p.add_argument("--ours", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--base-url", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.ours, args.base_url)), flush=True)
        os._exit(0)  # measured: skip the exit-time flush of the traces still held
    res = measure(args.reps)
    res["machine"] = machine()
    print(report(res))
    emit(res, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
