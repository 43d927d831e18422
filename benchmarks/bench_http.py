"""HTTP layer: client CPU per POST on keep-alive, for each layer the transport could stand on.

Every client posts the same track-metadata body `--n` times on one keep-alive connection to the
strict local server (`TrackMetadataServer`), which runs in its own process (`_server.py`), so
its CPU is not counted: the figure is `time.process_time()` of this process, which has only the
posting thread, divided by the POSTs. Each client gets a warm-up first (the connection is open and
every lazy import done), then `--reps` timed runs; the median is printed. Every answer must be 200.

Clients: `requests.Session.post` (the transport before issue 15), `urllib3` used directly
(`PoolManager.urlopen`, and the endpoint's `HTTPConnectionPool.urlopen`), `http.client` (the
floor of the libraries), and `otel_metadata.transport.Transport.post` itself, then the
transport's non-blocking `Connection`s, `--width` of them kept alive and driven at once by one
`selectors` loop (as delivery posts: each POST begun as soon as a connection is free; CPU per
POST over all of them). The `requests` and `Transport` rows are repeated with `--env-vars` extra
environment variables (a Kubernetes pod has hundreds: a service's host and port for every
service in the namespace), as `requests` scans the environment for proxy settings on every POST;
the last line prints that scan alone (`Session.merge_environment_settings`, which each
`Session.post` calls).
"""

from __future__ import annotations

import http.client
import json
import os
import selectors
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import requests
import urllib3
from _common import API_KEY, clean_environment, emit, local_server, machine, median, parser

from otel_metadata.transport import Transport

PATH = "/rest/track-metadata"
HEADERS = {"X-API-KEY": API_KEY, "Content-Type": "application/json",
           "User-Agent": "otel-metadata"}
METADATA = {"user_id": "user-42", "conversation_id": "c-0123456789", "step": "answer"}
BODY = json.dumps({"request_id": 1, "metadata": METADATA}).encode()
WARM_UP = 50
TIMEOUT_S = 5.0

# A client: built for an endpoint, it returns (post, close); post() makes one POST -> status.
Client = Callable[[str], tuple[Callable[[], int], Callable[[], None]]]


def requests_session(endpoint: str) -> tuple[Callable[[], int], Callable[[], None]]:
    session = requests.Session()
    session.headers.update(HEADERS)

    def post() -> int:
        with session.post(endpoint, data=BODY, timeout=TIMEOUT_S) as response:
            return response.status_code

    return post, session.close


def urllib3_pool_manager(endpoint: str) -> tuple[Callable[[], int], Callable[[], None]]:
    manager = urllib3.PoolManager(num_pools=1, maxsize=1, headers=HEADERS)
    timeout = urllib3.Timeout(TIMEOUT_S)

    def post() -> int:
        return manager.urlopen("POST", endpoint, body=BODY, timeout=timeout, retries=False,
                               redirect=False).status

    return post, manager.clear


def urllib3_connection_pool(endpoint: str) -> tuple[Callable[[], int], Callable[[], None]]:
    pool = urllib3.connection_from_url(endpoint, maxsize=1, headers=HEADERS)
    timeout = urllib3.Timeout(TIMEOUT_S)

    def post() -> int:
        return pool.urlopen("POST", PATH, body=BODY, timeout=timeout, retries=False,
                            redirect=False).status

    return post, pool.close


def plain_http_client(endpoint: str) -> tuple[Callable[[], int], Callable[[], None]]:
    parts = urlsplit(endpoint)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=TIMEOUT_S)

    def post() -> int:
        conn.request("POST", PATH, body=BODY, headers=HEADERS)
        response = conn.getresponse()
        response.read()
        return response.status

    return post, conn.close


def ours(endpoint: str) -> tuple[Callable[[], int], Callable[[], None]]:
    transport = Transport(endpoint, API_KEY, 1)

    def post() -> int:
        return transport.post(1, METADATA, TIMEOUT_S).status or 0

    return post, transport.close


@contextmanager
def extra_environment(n: int) -> Iterator[None]:
    """`n` more environment variables, named like the service links Kubernetes injects."""
    names = [f"SERVICE_{i:03d}_PORT_8080_TCP_ADDR" for i in range(n)]
    os.environ.update(dict.fromkeys(names, "10.0.0.1"))
    try:
        yield
    finally:
        for name in names:
            del os.environ[name]


def cpu_per_post(client: Client, endpoint: str, n: int, reps: int) -> float:
    """Median client CPU (µs) per POST over `reps` runs of `n` POSTs on one connection."""
    post, close = client(endpoint)
    try:
        for _ in range(WARM_UP):
            post()
        runs = []
        for _ in range(reps):
            statuses = set()
            t0 = time.process_time()
            for _ in range(n):
                statuses.add(post())
            runs.append((time.process_time() - t0) / n * 1e6)
            if statuses != {200}:
                raise RuntimeError(f"{client.__name__}: answers {sorted(statuses)}, not all 200")
        return median(runs)
    finally:
        close()


def loop_cpu_per_post(endpoint: str, n: int, reps: int, width: int) -> float:
    """Median client CPU (µs) per POST over `reps` runs of `n` POSTs, `width` in flight at a time
    on as many kept-alive `Connection`s, one `selectors` loop driving them all."""
    transport = Transport(endpoint, API_KEY, width)
    request = transport.request(1, METADATA)
    assert isinstance(request, bytes)
    free = [transport.connection() for _ in range(width)]

    def run(count: int, selector: selectors.BaseSelector) -> set[int | None]:
        statuses: set[int | None] = set()
        begun = ended = 0
        while ended < count:
            while free and begun < count:
                conn = free.pop()
                begun += 1
                outcome = conn.begin(request, TIMEOUT_S, selector)
                if outcome is not None:
                    statuses.add(outcome.status)
                    ended += 1
                    free.append(conn)
            ready = selector.select(TIMEOUT_S)
            if not ready:
                raise RuntimeError(f"no answer in {TIMEOUT_S} s")
            for key, _ in ready:
                outcome = key.data.advance()
                if outcome is not None:
                    statuses.add(outcome.status)
                    ended += 1
                    free.append(key.data)
        return statuses

    try:
        with selectors.DefaultSelector() as selector:
            run(WARM_UP * width, selector)  # every connection open
            runs = []
            for _ in range(reps):
                t0 = time.process_time()
                statuses = run(n, selector)
                runs.append((time.process_time() - t0) / n * 1e6)
                if statuses != {200}:
                    raise RuntimeError(f"Connection loop: answers {statuses}, not all 200")
        return median(runs)
    finally:
        for conn in free:
            conn.close()


def scan_cost(endpoint: str, n: int) -> float:
    """CPU (µs) of the proxy/CA environment lookup one `requests.Session.post` makes."""
    session = requests.Session()
    t0 = time.process_time()
    for _ in range(n):
        session.merge_environment_settings(endpoint, {}, None, None, None)
    return (time.process_time() - t0) / n * 1e6


CLIENTS: list[tuple[str, Client]] = [
    ("requests.Session.post (transport before issue 15)", requests_session),
    ("urllib3 PoolManager.urlopen", urllib3_pool_manager),
    ("urllib3 HTTPConnectionPool.urlopen", urllib3_connection_pool),
    ("http.client.HTTPConnection", plain_http_client),
    ("otel_metadata Transport (this tree)", ours),
]
WITH_ENV = ("requests.Session.post (transport before issue 15)",
            "otel_metadata Transport (this tree)")


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2000, help="POSTs per timed run")
    p.add_argument("--reps", type=int, default=3, help="timed runs per client (median)")
    p.add_argument("--env-vars", type=int, default=300, help="extra environment variables")
    p.add_argument("--width", type=int, default=64,
                   help="connections in flight at once for the selectors-loop row")
    args = p.parse_args(argv)
    clean_environment()
    m = machine()
    print(f"machine: {m['nproc']} CPUs, {m['cpu']}, {m['implementation']} {m['python']}; "
          f"urllib3 {urllib3.__version__}, requests {requests.__version__}")
    print(f"client CPU per POST (process_time of the client process; the server is another "
          f"process), {args.n} POSTs on keep-alive, median of {args.reps}, "
          f"{len(os.environ)} environment variables:")
    results: dict[str, Any] = {"n": args.n, "reps": args.reps, "env_vars": args.env_vars,
                               "machine": m, "cpu_us": {}}
    with local_server(api_key=API_KEY) as server:
        endpoint = server.base_url + PATH
        for name, client in CLIENTS:
            us = cpu_per_post(client, endpoint, args.n, args.reps)
            results["cpu_us"][name] = us
            print(f"  {name:<64} {us:8.1f} µs")
        label = f"otel_metadata Connection x{args.width}, one selectors loop"
        us = loop_cpu_per_post(endpoint, args.n, args.reps, args.width)
        results["cpu_us"][label] = us
        print(f"  {label:<64} {us:8.1f} µs")
        with extra_environment(args.env_vars):
            for name, client in CLIENTS:
                if name in WITH_ENV:
                    label = f"{name}, +{args.env_vars} env vars"
                    us = cpu_per_post(client, endpoint, args.n, args.reps)
                    results["cpu_us"][label] = us
                    print(f"  {label:<64} {us:8.1f} µs")
            scan_env = scan_cost(endpoint, args.n)
        scan = scan_cost(endpoint, args.n)
        results["requests_env_scan_us"] = {"plain": scan, "extra_env": scan_env}
        print(f"  requests' per-POST environment scan alone: {scan:.1f} µs; with "
              f"+{args.env_vars} env vars: {scan_env:.1f} µs")
        report = server.report()
        if set(report["statuses"]) != {"200"}:
            print(f"unexpected answers: {report['statuses']}")
            return 1
    emit(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
