"""Run `TrackMetadataServer` on 127.0.0.1 for the benchmarks, in its own process.

Prints its base URL, then serves until stdin says ``quit``; ``report`` prints (as one JSON line)
what it received since the last report and forgets it.
"""

from __future__ import annotations

import argparse
import json
import sys

from otel_metadata.testing.track_metadata import TrackMetadataServer


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--latency", type=float, default=0.0)
    p.add_argument("--api-key", required=True)
    args = p.parse_args()
    with TrackMetadataServer(api_key=args.api_key, latency_s=args.latency) as server:
        print(server.base_url, flush=True)
        for line in sys.stdin:
            command = line.strip()
            if command == "quit":
                break
            if command == "report":
                with server._lock:
                    posts, metadata = server.posts, server.metadata
                    server.posts, server.metadata = [], {}
                statuses: dict[int, int] = {}
                for post in posts:
                    statuses[post.status] = statuses.get(post.status, 0) + 1
                print(json.dumps({"posts": len(posts), "statuses": statuses,
                                  "metadata": [[k, v] for k, v in metadata.items()]}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
