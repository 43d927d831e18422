"""Helpers shared by the benchmark scripts: machine info, medians, a local server subprocess,
worker processes driven one command line at a time.

The track-metadata server runs in its own process (`_server.py`), so its request handling does
not share the GIL with the process being measured, as a real remote API would not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
API_KEY = "pl-bench-key-0123456789"

# Configuration that would change what is measured; every benchmark runs without it.
_SCRUB_PREFIXES = ("OTEL_", "PROMPTLAYER_")


def clean_environment() -> None:
    """Drop OTEL_*/PROMPTLAYER_* variables so every figure is at default settings."""
    for name in list(os.environ):
        if name.startswith(_SCRUB_PREFIXES):
            del os.environ[name]


def clean_env_copy() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(_SCRUB_PREFIXES)}


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def machine() -> dict[str, Any]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or "?"
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
    }


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    return p


def emit(result: dict[str, Any], path: str | None) -> None:
    if path:
        Path(path).write_text(json.dumps(result, indent=2))


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


class LocalServer:
    """The benchmarks' track-metadata server (`_server.py`: one asyncio loop, validating as the
    tests' server does) in a subprocess; `report()` returns and resets what it received."""

    def __init__(self, proc: subprocess.Popen[str], base_url: str) -> None:
        self._proc = proc
        self.base_url = base_url

    def report(self) -> dict[str, Any]:
        """{"posts": n, "statuses": {code: n}, "metadata": [[request_id, {k: v}], ...]}."""
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write("report\n")
        self._proc.stdin.flush()
        data: dict[str, Any] = json.loads(self._proc.stdout.readline())
        return data


@contextmanager
def local_server(latency_s: float = 0.0, api_key: str = API_KEY) -> Iterator[LocalServer]:
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "_server.py"), "--latency", str(latency_s), "--api-key",
         api_key],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=clean_env_copy(),
    )
    try:
        assert proc.stdout is not None
        base_url = proc.stdout.readline().strip()
        if not base_url.startswith("http://127.0.0.1:"):
            raise RuntimeError(f"local server did not start (said {base_url!r})")
        yield LocalServer(proc, base_url)
    finally:
        if proc.stdin is not None:
            try:
                proc.stdin.write("quit\n")
                proc.stdin.flush()
            except OSError:
                pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Driven:
    """A benchmark's worker process (this script again, with `args`), driven in lock-step: each
    `ask` writes one command line and reads one JSON answer. Every worker gets one hash seed, so
    none gets luckier dict and set layouts."""

    def __init__(self, script: str, *args: str) -> None:
        self.name = " ".join(args)
        self.proc = subprocess.Popen([sys.executable, script, *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True,
                                     env={**clean_env_copy(), "PYTHONHASHSEED": "0"})

    def ask(self, command: str) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise RuntimeError(f"benchmark worker {self.name} died (exit {self.proc.wait()})")
        return json.loads(answer)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
