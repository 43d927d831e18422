"""The examples run as a user runs them, against the embedded local server."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str) -> str:
    done = subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True,
                          text=True, timeout=60, check=True)
    return done.stdout


def test_add_to_existing_provider() -> None:
    out = run_example("add_to_existing_provider.py")
    assert out.strip() == ("metadata received for request 123456: "
                           "{'user_id': 'user-42', 'feature': 'summarize'}")


def test_web_handler_sets_the_user_once_for_every_llm_call() -> None:
    rows = [line.split(" ", 1) for line in run_example("web_handler.py").splitlines()]
    received = {int(rid): ast.literal_eval(md) for rid, md in rows}
    ana = {"user_id": "ana", "conversation_id": "c1", "tenant": "acme"}
    ben = {"user_id": "ben", "conversation_id": "c2", "tenant": "globex"}
    assert received == {5000: ana, 5001: ana, 5002: ben, 5003: ben, 5004: ana, 5005: ana}


def test_make_demo_shows_every_request_with_its_metadata_both_ways() -> None:
    """`otel-metadata demo` (what `make demo` runs): the processor path and the PromptLayer SDK
    path, each request in the table with the metadata that reached it, nothing missing."""
    done = subprocess.run([str(Path(sys.executable).parent / "otel-metadata"), "demo"],
                          capture_output=True, text=True, timeout=60, check=True)
    out = done.stdout
    assert "6 of 6 requests got metadata; 6 POSTs; flush delivered everything." in out
    assert "6 of 6 requests PromptLayer logged got metadata." in out
    sdk_rows = out.split("no request-ID plumbing:", 1)[1].splitlines()
    users = [row.split()[1] for row in sdk_rows if row[:1].isdigit() and " of " not in row]
    assert users == ["carol"] * 3 + ["dave"] * 3
    assert "(nothing received)" not in out and done.stderr == ""
