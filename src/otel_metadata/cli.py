"""The `otel-metadata` command (SPEC §9)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="otel-metadata", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="run a traced app against an embedded local server "
                                     "and show which metadata reached which request")
    check = commands.add_parser(
        "check", help="show the effective configuration (from the environment) and test the "
                      "key against the API without recording anything; exit 0 only when a "
                      "metadata POST would be accepted")
    check.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                       help="how long to wait for the API (default: the request timeout, 10)")
    check.add_argument("--serve", action="store_true",
                       help="also check the ports of an `otel-metadata serve` set-up (a "
                            "running serve answers; otherwise each port must be free)")
    serve = commands.add_parser(
        "serve", help="receive OTLP traces (from the OpenTelemetry Collector) and send the "
                      "metadata of their PromptLayer requests; settings from the environment "
                      "as for the processor; SIGTERM flushes and exits 0")
    drain = commands.add_parser(
        "drain", help="deliver what dead processes left in a spool directory, then exit: 0 "
                      "when all of it was delivered, 1 when some is left (it stays there), 2 "
                      "when it cannot start; settings from the environment")
    drain.add_argument("--spool-dir", required=True, metavar="DIR",
                       help="the spool directory (PROMPTLAYER_METADATA_SPOOL_DIR of the apps)")
    drain.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                       help="give up after this long (default: 60)")
    for command in (serve, check):
        command.add_argument("--http", default="localhost:4318", type=_address,
                             metavar="HOST:PORT", help="OTLP/HTTP listen address, with GET "
                             "/health (default: localhost:4318; 'none' turns it off)")
        command.add_argument("--grpc", default="localhost:4317", type=_address,
                             metavar="HOST:PORT", help="OTLP/gRPC listen address (default: "
                             "localhost:4317; 'none' turns it off)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run

        return run(sys.stdout)
    if args.command == "check":
        from .check import run as run_check

        return run_check(sys.stdout, args.timeout,
                         (args.http, args.grpc) if args.serve else None)
    if args.command == "drain":
        from .drain import run as run_drain

        return run_drain(sys.stdout, args.spool_dir, args.timeout)
    if args.command == "serve":
        try:
            from .serve import run as run_serve
        except ImportError as exc:
            print(f"otel-metadata serve needs the serve extra: pip install "
                  f"'otel-metadata[serve]' ({exc})", file=sys.stderr)
            return 2
        return run_serve(sys.stdout, args.http, args.grpc)
    return 2


def _address(value: str) -> tuple[str, int] | None:
    """HOST:PORT or 'none' (argparse turns the ValueError into a usage error)."""
    host, sep, port = value.strip().rpartition(":")
    if value.strip().lower() == "none":
        return None
    if not sep or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT or 'none', got {value!r}")
    return host.removeprefix("[").removesuffix("]") or "localhost", int(port)


if __name__ == "__main__":
    sys.exit(main())
