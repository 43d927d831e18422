"""Run an app in a subprocess the way a user runs it, optionally under opentelemetry-instrument.

Shared by the zero-code and OpenAI-example tests. The child gets the developer's environment
minus every OTEL_*, PROMPTLAYER_* and OPENAI_* variable, plus what the test passes, so a
developer's shell cannot change what is tested.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
OPENTELEMETRY_INSTRUMENT = str(BIN / "opentelemetry-instrument")

# The SDK's defaults for an app under opentelemetry-instrument (opentelemetry-distro sets otlp
# for all three signals); no OTLP exporter is installed here, and there is no collector.
QUIET_SIGNALS = {"OTEL_METRICS_EXPORTER": "none", "OTEL_LOGS_EXPORTER": "none"}


def run_app(
    script: Path,
    env: Mapping[str, str],
    *,
    instrument: bool = True,
    expect_exit: int = 0,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """Run `script` with `env` added to a clean environment; assert how it exits."""
    child_env = {k: v for k, v in os.environ.items()
                 if not k.startswith(("OTEL_", "PROMPTLAYER_", "OPENAI_"))}
    child_env.update(env)
    command = [sys.executable, str(script)]
    if instrument:
        command.insert(0, OPENTELEMETRY_INSTRUMENT)
    done = subprocess.run(command, env=child_env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert done.returncode == expect_exit, (
        f"{command} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


def json_objects(text: str) -> list[Any]:
    """Every JSON object that starts a line of `text` (ConsoleSpanExporter prints indented JSON)."""
    decoder = json.JSONDecoder()
    found: list[Any] = []
    position = 0
    while (start := text.find("{", position)) != -1:
        if start > 0 and text[start - 1] != "\n":
            position = start + 1
            continue
        try:
            value, position = decoder.raw_decode(text, start)
        except ValueError:
            position = start + 1
            continue
        found.append(value)
    return found


def console_spans(stdout: str) -> list[dict[str, Any]]:
    """The spans ConsoleSpanExporter printed to `stdout`."""
    return [o for o in json_objects(stdout) if isinstance(o, dict) and "context" in o
            and "span_id" in o.get("context", {})]
