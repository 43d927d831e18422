"""Hot path: CPU time a span processor adds to the application's own thread, per span.

Four tracer providers get the same spans in turn, in small interleaved blocks (the order rotates
every round) so machine drift falls on all of them alike. Each lives in its own process, driven in
lock-step by this one, so the garbage one provider keeps is not collected on another's time:

- bare: a `TracerProvider` with no processor (the cost of making the spans at all);
- BSP: the SDK's `BatchSpanProcessor` with an exporter that does nothing;
- floor: a span processor whose hooks do nothing at all: what any processor written in Python
  costs before it does anything (the SDK's calls into it), so the ratio a processor can reach;
- ours: `MetadataSpanProcessor` at default settings (lineage join on), with an API key and the
  base URL of a local server in another process, so it is active and really posts.

Measured with `time.thread_time()` on the app's thread, so work done by background threads (BSP's
worker, our senders and janitor) is not counted. "Added" is the provider's time minus bare's, per
span: outside garbage collection, the median over a repetition's rounds of the paired per-round
difference (so a block hit by an outside disturbance does not swing it), plus the provider's
garbage-collection time (timed by `gc.callbacks`; collections come in lumps, so all of it is
counted). One repetition = `rounds` rounds of one block per provider, after a warm-up to a
steady state; figures are medians over repetitions, and the ratio is the ratio of the medians.
The plain-mean estimate is printed too.

Two span shapes, each a trace of an HTTP handler span (SERVER) and one LLM child span (CLIENT),
6 attributes each, 1 LLM span in 50 a request span (it also carries `promptlayer.request_id`):

- A: the handler span carries `user.id`, as our README tells users to do, so half the spans
  carry something for us;
- B: the handler span carries `server.address` instead: only the request spans matter to us.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from _common import (
    API_KEY,
    Driven,
    clean_environment,
    emit,
    local_server,
    machine,
    median,
    parser,
)
from _common import verdict as _verdict
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind, Tracer

from otel_metadata import MetadataSpanProcessor

REQUEST_EVERY = 50  # one LLM child span in 50 carries a PromptLayer request ID
TARGET_RATIO = 0.35  # issue 10
WARMUP_BLOCKS = 10


class NoOpExporter(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


class FloorProcessor(SpanProcessor):
    """Hooks that do nothing: the cost of being called at all."""

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        pass


def shape(user_on_handler: bool) -> dict[str, Any]:
    """The span shape, described for the output and used to build the spans."""
    handler = ["http.request.method", "http.route", "url.path", "url.scheme",
               "http.response.status_code", "user.id" if user_on_handler else "server.address"]
    llm = ["gen_ai.operation.name", "gen_ai.system", "gen_ai.request.model",
           "gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens", "gen_ai.response.id"]
    return {
        "title": ("A, handler spans carry user.id (the documented pattern)" if user_on_handler
                  else "B, handler spans carry nothing for us"),
        "handler_span": f"SERVER 'POST /v1/chat', 6 attributes: {', '.join(handler)}",
        "llm_span": f"CLIENT 'chat gpt-4o-mini', child of the handler, 6 attributes: "
                    f"{', '.join(llm)}",
        "request_spans": f"1 LLM span in {REQUEST_EVERY} also carries promptlayer.request_id "
                         f"(a distinct int), making it a request span",
        "relevant_to_us": ("every handler span (user.id), and the request spans"
                           if user_on_handler else "only the request spans"),
    }


def _attribute_sets(n: int, user_on_handler: bool) -> tuple[list[dict[str, Any]],
                                                             list[dict[str, Any]]]:
    handlers, llms = [], []
    for i in range(n):
        handler: dict[str, Any] = {
            "http.request.method": "POST", "http.route": "/v1/chat", "url.path": "/v1/chat",
            "url.scheme": "https", "http.response.status_code": 200,
        }
        if user_on_handler:
            handler["user.id"] = f"user-{i % 997}"
        else:
            handler["server.address"] = "api.example.com"
        handlers.append(handler)
        llms.append({
            "gen_ai.operation.name": "chat", "gen_ai.system": "openai",
            "gen_ai.request.model": "gpt-4o-mini", "gen_ai.usage.input_tokens": 400 + i % 300,
            "gen_ai.usage.output_tokens": 100 + i % 200, "gen_ai.response.id": f"chatcmpl-{i:08x}",
        })
    return handlers, llms


class Workload:
    """Traces of one handler span with one LLM child; request IDs distinct over the whole run."""

    def __init__(self, user_on_handler: bool) -> None:
        self.handlers, self.llms = _attribute_sets(1000, user_on_handler)
        self.next_request_id = 1

    def run(self, tracer: Tracer, traces: int) -> float:
        """Make `traces` traces (2 spans each); return the app thread's CPU seconds."""
        handlers, llms = self.handlers, self.llms
        n = len(handlers)
        rid = self.next_request_id
        self.next_request_id += traces
        server, client = SpanKind.SERVER, SpanKind.CLIENT
        start = tracer.start_as_current_span
        t0 = time.thread_time()
        for i in range(traces):
            llm = llms[i % n]
            if i % REQUEST_EVERY == 0:
                llm = {**llm, "promptlayer.request_id": rid + i}
            with start("POST /v1/chat", kind=server, attributes=handlers[i % n]), \
                    start("chat gpt-4o-mini", kind=client, attributes=llm):
                pass
        return time.thread_time() - t0


def _provider(kind: str, base_url: str) -> tuple[TracerProvider, MetadataSpanProcessor | None]:
    provider = TracerProvider(resource=Resource.create({"service.name": "bench-app"}))
    ours = None
    if kind == "bsp":
        provider.add_span_processor(BatchSpanProcessor(NoOpExporter()))
    elif kind == "floor":
        provider.add_span_processor(FloorProcessor())
    elif kind == "ours":
        ours = MetadataSpanProcessor(api_key=API_KEY, base_url=base_url)
        provider.add_span_processor(ours)
    return provider, ours


def worker(kind: str, base_url: str, user_on_handler: bool) -> int:
    """One provider in its own process: ``run N`` makes N traces and prints CPU seconds and
    GC seconds on this thread; ``finish`` flushes, prints stats as JSON and exits."""
    clean_environment()
    provider, ours = _provider(kind, base_url)
    tracer = provider.get_tracer("bench")
    work = Workload(user_on_handler)
    gc_time = [0.0, 0.0]

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            gc_time[1] = time.thread_time()
        else:
            gc_time[0] += time.thread_time() - gc_time[1]

    gc.callbacks.append(on_gc)
    for line in sys.stdin:
        command, *args = line.split()
        if command == "run":
            gc_time[0] = 0.0
            cpu = work.run(tracer, int(args[0]))
            print(json.dumps([cpu, gc_time[0]]), flush=True)
        elif command == "cpu":  # this process's CPU seconds so far, every thread's
            print(json.dumps(time.process_time()), flush=True)
        elif command == "finish":
            result: dict[str, Any] = {}
            if ours is not None:
                result["flushed"] = ours.force_flush(30_000)
                result["stats"] = ours.stats()
            provider.shutdown()
            print(json.dumps(result), flush=True)
            break
    return 0


def _worker(kind: str, base_url: str, user_on_handler: bool) -> Driven:
    return Driven(__file__, "--worker", kind, "--base-url", base_url,
                  "--shape", "user" if user_on_handler else "plain")


def _repetition(workers: dict[str, Driven], names: tuple[str, ...], rounds: int,
                block: int) -> dict[str, float]:
    """One repetition: `rounds` rounds of one block per provider, the order rotating.

    A provider's added cost is estimated in two parts. Outside garbage collection: the median,
    over rounds, of its block's time minus bare's block time in the same round (paired, so slow
    drift cancels; the median, so a block hit by an outside disturbance does not swing it).
    Garbage collection: its total, timed by `gc.callbacks`, as collections come in lumps.
    """
    spans = 2 * block
    net: dict[str, list[float]] = {n: [] for n in names}  # µs per span, GC excluded
    gc_total = dict.fromkeys(names, 0.0)
    process_before = {n: workers[n].ask("cpu") for n in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            cpu, gc_s = workers[name].ask(f"run {block}")
            net[name].append((cpu - gc_s) / spans * 1e6)
            gc_total[name] += gc_s
    # Every thread's CPU over the whole repetition, background work done between blocks included.
    process_us = {n: (workers[n].ask("cpu") - process_before[n]) / (spans * rounds) * 1e6
                  for n in names}
    gc_us = {n: gc_total[n] / (spans * rounds) * 1e6 for n in names}
    out = {"bare_us": median(net["bare"]) + gc_us["bare"]}
    for name in names[1:]:
        paired = [x - b for x, b in zip(net[name], net["bare"], strict=True)]
        out[f"{name}_added_us"] = median(paired) + gc_us[name] - gc_us["bare"]
        out[f"{name}_gc_us"] = gc_us[name]
        out[f"{name}_added_mean_us"] = (sum(net[name]) - sum(net["bare"])) / rounds + \
            gc_us[name] - gc_us["bare"]
        out[f"{name}_process_added_us"] = process_us[name] - process_us["bare"]
    out["ratio"] = out["ours_added_us"] / out["bsp_added_us"]
    out["floor_ratio"] = out["floor_added_us"] / out["bsp_added_us"]
    return out


def measure(reps: int, rounds: int, block: int, user_on_handler: bool) -> dict[str, Any]:
    names = ("bare", "bsp", "floor", "ours")
    with local_server() as server:
        workers = {n: _worker(n, server.base_url, user_on_handler) for n in names}
        try:
            # Warm-up to a steady state: BSP's queue cycling, our join remembering max_traces
            # roots, the sender connections open.
            for _ in range(WARMUP_BLOCKS):
                for name in names:
                    workers[name].ask(f"run {block}")
            per_rep = [_repetition(workers, names, rounds, block) for _ in range(reps)]
            finished = workers["ours"].ask("finish")
            for name in ("bare", "bsp", "floor"):
                workers[name].ask("finish")
        finally:
            for w in workers.values():
                w.close()
        received = server.report()
    out: dict[str, Any] = {
        "shape": shape(user_on_handler),
        "reps": reps, "rounds": rounds, "block_traces": block,
        "spans_per_provider_per_rep": 2 * block * rounds,
    }
    for key in per_rep[0]:
        out[key] = median([r[key] for r in per_rep])
    # The ratio of the medians: steadier than the median of ratios of two small differences.
    out["ratio"] = out["ours_added_us"] / out["bsp_added_us"]
    out["floor_ratio"] = out["floor_added_us"] / out["bsp_added_us"]
    out.update({
        "per_rep": per_rep,
        "ours_flushed": finished.get("flushed"),
        "ours_stats": finished.get("stats"),
        "server_posts": received["posts"],
        "server_statuses": received["statuses"],
    })
    return out


SHAPES = {"user": True, "plain": False}  # shape name -> does the handler span carry user.id


def report(res: dict[str, Any]) -> str:
    ok = res["ratio"] <= TARGET_RATIO
    sh = res["shape"]
    lines = [
        f"hot path, {sh['title']}: CPU µs added to the app thread per span (time.thread_time), "
        f"median of {res['reps']} repetitions x {res['rounds']} interleaved rounds x "
        f"{res['block_traces']} traces per provider",
        f"  handler span: {sh['handler_span']}",
        f"  LLM span:     {sh['llm_span']}",
        f"  requests:     {sh['request_spans']}; relevant to us: {sh['relevant_to_us']}",
        "  each provider in its own process (so one's garbage is not collected on another's"
        " time), a local server in a fourth",
        f"  bare provider, per span (reference)      {res['bare_us']:7.2f} µs",
        f"  + BatchSpanProcessor(no-op exporter)    +{res['bsp_added_us']:7.2f} µs   (baseline;"
        f" of which GC {res['bsp_gc_us']:.2f})",
        f"  + a processor whose hooks do nothing    +{res['floor_added_us']:7.2f} µs   (the "
        f"floor of any Python processor: ratio {res['floor_ratio']:.2f})",
        f"  + MetadataSpanProcessor (defaults)      +{res['ours_added_us']:7.2f} µs   "
        f"(of which GC {res['ours_gc_us']:.2f})",
        f"  (with plain means instead of paired medians: BSP +{res['bsp_added_mean_us']:.2f}, "
        f"ours +{res['ours_added_mean_us']:.2f} µs)",
        f"  all threads of the process (process_time over each repetition, background work "
        f"included): BSP +{res['bsp_process_added_us']:.2f}, ours "
        f"+{res['ours_process_added_us']:.2f} µs per span",
        f"  ratio ours / BSP (of the medians)        {res['ratio']:7.2f}      "
        f"(target <= {TARGET_RATIO})  {_verdict(ok)}",
        "  ratio per repetition: "
        + ", ".join(f"{r['ratio']:.2f}" for r in res["per_rep"]),
        f"  ours posted {res['server_posts']} request IDs (server answers "
        f"{res['server_statuses']}), flush ok={res['ours_flushed']}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--block", type=int, default=200, help="traces per block")
    p.add_argument("--shape", choices=("both", *SHAPES), default="both",
                   help="user: handler spans carry user.id (the documented pattern); plain: "
                        "they carry server.address instead, nothing for us")
    p.add_argument("--worker", choices=("bare", "bsp", "floor", "ours"), help=argparse.SUPPRESS)
    p.add_argument("--base-url", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.base_url, SHAPES[args.shape])
    results: dict[str, Any] = {"machine": machine(), "shapes": {}}
    for name, user_on_handler in SHAPES.items():
        if args.shape in ("both", name):
            res = measure(args.reps, args.rounds, args.block, user_on_handler)
            results["shapes"][name] = res
            print(report(res), flush=True)
    emit(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
