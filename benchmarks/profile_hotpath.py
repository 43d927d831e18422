"""The hot-path workload on one provider only, for a profiler (not run by `make bench`).

    .venv/bin/py-spy record -r 2000 -o hot.svg -- .venv/bin/python benchmarks/profile_hotpath.py
    .venv/bin/pyinstrument benchmarks/profile_hotpath.py --provider bsp
"""

from __future__ import annotations

import sys

from _common import API_KEY, clean_environment, local_server
from bench_hotpath import NoOpExporter, Workload
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from otel_metadata import MetadataSpanProcessor


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--provider", choices=("ours", "bsp", "bare"), default="ours")
    p.add_argument("--traces", type=int, default=200_000)
    p.add_argument("--shape", choices=("user", "plain"), default="user",
                   help="do handler spans carry user.id (see bench_hotpath.py)")
    args = p.parse_args(argv)
    clean_environment()
    with local_server() as server:
        provider = TracerProvider(resource=Resource.create({"service.name": "bench-app"}))
        if args.provider == "ours":
            provider.add_span_processor(MetadataSpanProcessor(api_key=API_KEY,
                                                              base_url=server.base_url))
        elif args.provider == "bsp":
            provider.add_span_processor(BatchSpanProcessor(NoOpExporter()))
        seconds = Workload(args.shape == "user").run(provider.get_tracer("bench"),
                                                            args.traces)
        print(f"{args.provider}: {seconds / (2 * args.traces) * 1e6:.2f} µs CPU per span "
              f"(app thread, including the spans themselves)")
        provider.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
