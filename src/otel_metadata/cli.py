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
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run

        return run(sys.stdout)
    if args.command == "check":
        from .check import run as run_check

        return run_check(sys.stdout, args.timeout)
    return 2


if __name__ == "__main__":
    sys.exit(main())
