"""Sampling: app-thread CPU per span under `MetadataSampler` at 5 %, vs plain 5 % and always-on.

Three tracer providers, each as a user would run them: the SDK's `BatchSpanProcessor` with an
exporter that does nothing (the exporter beside us) and `MetadataSpanProcessor` at default
settings, posting to a local server in another process. Only the sampler differs:

- always-on: ``ParentBased(ALWAYS_ON)``, the SDK's default: every span recorded and exported;
- plain 5 %: ``ParentBased(TraceIdRatioBased(0.05))``: 95 % of traces are not recorded at all,
  so neither processor sees them, and their requests get no metadata;
- wrapped 5 %: ``MetadataSampler(ParentBased(TraceIdRatioBased(0.05)))``: every span recorded
  (so every request gets its metadata), 5 % exported.

The spans are bench_hotpath.py's (its `Workload`): a SERVER handler span and one CLIENT LLM
child, 6 attributes each, 1 LLM span in 50 a request span; shape A, the handler carries
``user.id`` (so requests have metadata to get), and shape B, it carries nothing for us.
Measured with `time.thread_time()` on the app's thread (background threads not counted), in
blocks interleaved round by round (the order rotating) in one process; garbage collections
during a block (timed by `gc.callbacks`) are counted in that block. Figures: per repetition the
median over rounds of each provider's µs per span, then the median over repetitions.
"""

from __future__ import annotations

import gc
import random
import sys
import time
import timeit
from typing import Any

from _common import API_KEY, clean_environment, emit, local_server, machine, median, parser
from bench_hotpath import REQUEST_EVERY, SHAPES, NoOpExporter, Workload, shape
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, Sampler, TraceIdRatioBased

from otel_metadata import MetadataSampler, MetadataSpanProcessor

RATIO = 0.05
WARMUP_BLOCKS = 10


def samplers() -> dict[str, Sampler]:
    return {
        "always_on": ParentBased(ALWAYS_ON),
        "plain_5": ParentBased(TraceIdRatioBased(RATIO)),
        "wrapped_5": MetadataSampler(ParentBased(TraceIdRatioBased(RATIO))),
    }


class _Gc:
    """Seconds of this thread spent in garbage collection since `reset`."""

    def __init__(self) -> None:
        self.total = 0.0
        self._began = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._began = time.thread_time()
        else:
            self.total += time.thread_time() - self._began


def sampler_call_ns(calls: int = 200_000) -> dict[str, float]:
    """ns per `should_sample` of a root span, plain 5 % vs wrapped, over one set of trace IDs
    (95 % of them dropped: where the wrapper does its work)."""
    ids = [random.getrandbits(128) | 1 for _ in range(1000)]
    attributes = {"http.route": "/v1/chat"}
    out = {}
    for name in ("plain_5", "wrapped_5"):
        call = samplers()[name].should_sample
        best = min(timeit.repeat(lambda c=call: [c(None, t, "s", None, attributes) for t in ids],
                                 number=calls // len(ids), repeat=5))
        out[name] = best / calls * 1e9
    return out


def measure(reps: int, rounds: int, block: int, user_on_handler: bool) -> dict[str, Any]:
    clean_environment()
    with local_server() as server:
        setups = {}
        for k, (name, sampler) in enumerate(samplers().items()):
            provider = TracerProvider(sampler=sampler,
                                      resource=Resource.create({"service.name": "bench-app"}))
            provider.add_span_processor(BatchSpanProcessor(NoOpExporter()))
            ours = MetadataSpanProcessor(api_key=API_KEY, base_url=server.base_url)
            provider.add_span_processor(ours)
            work = Workload(user_on_handler)
            work.next_request_id = 1 + k * 10**9  # request IDs distinct across providers
            setups[name] = (provider, ours, provider.get_tracer("bench"), work)
        names = tuple(setups)
        gc_time = _Gc()

        def run(name: str) -> float:
            """µs per span of one block, the block's garbage collections included."""
            _, _, tracer, work = setups[name]
            gc_time.total = 0.0
            cpu = work.run(tracer, block)
            return (cpu + gc_time.total) / (2 * block) * 1e6

        for _ in range(WARMUP_BLOCKS):
            for name in names:
                run(name)
        per_rep = []
        for _ in range(reps):
            samples: dict[str, list[float]] = {n: [] for n in names}
            for r in range(rounds):
                for name in names[r % 3:] + names[:r % 3]:
                    samples[name].append(run(name))
            per_rep.append({n: median(v) for n, v in samples.items()})
        finished = {}
        for name, (provider, ours, _, _) in setups.items():
            finished[name] = {"flushed": ours.force_flush(30_000), "stats": ours.stats()}
            provider.shutdown()
        received = server.report()
    out: dict[str, Any] = {
        "shape": shape(user_on_handler), "ratio": RATIO, "reps": reps, "rounds": rounds,
        "block_traces": block,
        **{f"{n}_us": median([r[n] for r in per_rep]) for n in names},
        "per_rep": per_rep, "finished": finished, "server_posts": received["posts"],
        # request spans each provider made, warm-up included
        "requests": (WARMUP_BLOCKS + reps * rounds) * len(range(0, block, REQUEST_EVERY)),
    }
    out["wrapper_over_plain_us"] = out["wrapped_5_us"] - out["plain_5_us"]
    out["always_on_over_wrapper_us"] = out["always_on_us"] - out["wrapped_5_us"]
    return out


def report(res: dict[str, Any]) -> str:
    delivered = {n: f["stats"].get("delivered", 0) for n, f in res["finished"].items()}
    return "\n".join([
        f"sampling at {res['ratio']:.0%}: app-thread CPU µs per span (time.thread_time, GC "
        f"included), median of {res['reps']} repetitions x {res['rounds']} interleaved rounds "
        f"x {res['block_traces']} traces per provider",
        f"  spans: {res['shape']['title']}; {res['shape']['request_spans']}",
        "  every provider: BatchSpanProcessor(no-op exporter) + MetadataSpanProcessor",
        f"  always-on (ParentBased(ALWAYS_ON))        {res['always_on_us']:7.2f} µs",
        f"  plain 5 % (ParentBased(TraceIdRatio))      {res['plain_5_us']:7.2f} µs   "
        f"(requests posted: {delivered['plain_5']} of {res['requests']})",
        f"  MetadataSampler over plain 5 %             {res['wrapped_5_us']:7.2f} µs   "
        f"(requests posted: {delivered['wrapped_5']} of {res['requests']})",
        f"  the wrapper costs +{res['wrapper_over_plain_us']:.2f} µs per span over plain 5 %, "
        f"and saves {res['always_on_over_wrapper_us']:.2f} µs per span against always-on",
        "  per repetition (always-on / plain / wrapped): " + ", ".join(
            f"{r['always_on']:.2f}/{r['plain_5']:.2f}/{r['wrapped_5']:.2f}"
            for r in res["per_rep"]),
        f"  posted {res['server_posts']} request IDs in all; flushed: "
        + ", ".join(f"{n}={f['flushed']}" for n, f in res["finished"].items()),
    ])


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--block", type=int, default=200, help="traces per block")
    p.add_argument("--shape", choices=("both", *SHAPES), default="both",
                   help="user: handler spans carry user.id; plain: nothing for us")
    args = p.parse_args(argv)
    results: dict[str, Any] = {"machine": machine(), "shapes": {}}
    for name, user_on_handler in SHAPES.items():
        if args.shape in ("both", name):
            res = measure(args.reps, args.rounds, args.block, user_on_handler)
            results["shapes"][name] = res
            print(report(res), flush=True)
    results["sampler_call_ns"] = calls = sampler_call_ns()
    print(f"should_sample of a root span (best of 5, the loop included): plain 5 % "
          f"{calls['plain_5']:.0f} ns, wrapped {calls['wrapped_5']:.0f} ns", flush=True)
    emit(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
