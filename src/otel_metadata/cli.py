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
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run

        return run(sys.stdout)
    return 2


if __name__ == "__main__":
    sys.exit(main())
