"""Zero-code setup (SPEC §8): an app with no processor code, configured only from outside.

The apps run in subprocesses under the real opentelemetry-instrument, and post to the strict
local server started here. Each run ends with the provider's exit hook flushing the processor,
so everything the app recorded has arrived when the subprocess returns.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from instrumented import QUIET_SIGNALS, console_spans, json_objects, run_app
from opentelemetry.sdk.trace import TracerProvider

from otel_metadata import MetadataSpanProcessor, RetryPolicy
from otel_metadata.autoconfig import _processor_options, install, installed_processor
from otel_metadata.testing.track_metadata import TrackMetadataServer

API_KEY = "pl-zero-code-key-0123456789"
APP = Path(__file__).parent / "apps" / "zero_code_app.py"

# What tests/apps/zero_code_app.py records: the user on the handler span, the conversation and
# plan from metadata_context, a step on each request span.
ANA = {"user_id": "ana", "conversation_id": "conv-1", "plan": "pro"}
BEN = {"user_id": "ben", "conversation_id": "conv-2", "plan": "pro"}


# An OTEL_CONFIG_FILE: YAML keys under `promptlayer_metadata` become the exporter's arguments.
EXPORTER_KEYS = """
          promptlayer_metadata:
            base_url: ${TEST_TRACK_METADATA_URL}
            schedule_delay_millis: 20
            metadata:
              team: search"""
CONFIG_FILE = """
file_format: "1.0"
resource:
  attributes:
    - name: promptlayer.metadata.environment
      value: staging
tracer_provider:
  processors:
    - batch:
        exporter:{exporter}"""


def expected(**common: str) -> dict[int, dict[str, str]]:
    return {
        7001: {**ANA, "step": "step-7001", **common},
        7002: {**ANA, "step": "step-7002", **common},
        7003: {**BEN, "step": "step-7003", **common},
    }


def env_for(server: TrackMetadataServer, **extra: str) -> dict[str, str]:
    return {
        **QUIET_SIGNALS,
        "PROMPTLAYER_API_KEY": server.api_key,
        "PROMPTLAYER_BASE_URL": server.base_url,
        "OTEL_BSP_SCHEDULE_DELAY": "20",
        # The OpenAI instrumentation is tested in test_openai_example.py; importing openai here
        # would only add a second to every run. requests/urllib3 stay instrumented.
        "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "openai",
        **extra,
    }


def processors_installed(stdout: str) -> int:
    probe = [o for o in json_objects(stdout) if "metadata_processors" in o]
    assert len(probe) == 1, stdout
    return int(probe[0]["metadata_processors"])


def test_exporter_alone_gives_mapping_lineage_context_and_resource(
    server: TrackMetadataServer,
) -> None:
    done = run_app(APP, env_for(
        server, OTEL_TRACES_EXPORTER="promptlayer_metadata",
        OTEL_RESOURCE_ATTRIBUTES="service.name=chat,promptlayer.metadata.environment=prod"))

    assert server.metadata == expected(environment="prod")
    assert server.statuses() == {200: 3}  # one POST per request ID: no span processed twice
    assert processors_installed(done.stdout) == 1


def test_beside_another_exporter_which_keeps_working(server: TrackMetadataServer) -> None:
    # A schedule delay longer than the app runs: the console exporter prints only at exit, so
    # its JSON never interleaves with the app's output. The exit flush sends everything at once.
    done = run_app(APP, env_for(server, OTEL_TRACES_EXPORTER="console,promptlayer_metadata",
                                OTEL_BSP_SCHEDULE_DELAY="30000"))

    assert server.metadata == expected()
    assert server.statuses() == {200: 3}
    assert processors_installed(done.stdout) == 1
    # The console exporter got every app span, and none of our own POSTs (requests and urllib3
    # are instrumented in this process, but the processor's HTTP calls are never traced).
    names = sorted(span["name"] for span in console_spans(done.stdout))
    assert names == ["POST /chat", "POST /chat", "llm call", "llm call", "llm call"]


def test_config_file_passes_yaml_keys_and_installs_one_processor(
    server: TrackMetadataServer, tmp_path: Path,
) -> None:
    # Two span processors naming the exporter: still one metadata processor, one POST per ID.
    config = tmp_path / "otel.yaml"
    config.write_text(CONFIG_FILE.format(exporter=EXPORTER_KEYS) + f"""
    - simple:
        exporter:{EXPORTER_KEYS}""")
    done = run_app(APP, {
        **env_for(server), "OTEL_CONFIG_FILE": str(config),
        # The file's base_url beats the environment's.
        "TEST_TRACK_METADATA_URL": server.base_url, "PROMPTLAYER_BASE_URL": "http://127.0.0.1:9",
    })

    assert server.metadata == expected(environment="staging", team="search")
    assert server.statuses() == {200: 3}
    assert processors_installed(done.stdout) == 1


def test_config_file_applied_in_code_then_install_pending(
    server: TrackMetadataServer, tmp_path: Path,
) -> None:
    # Without opentelemetry-instrument, whoever applies the file calls install_pending() next.
    config = tmp_path / "otel.yaml"
    config.write_text(CONFIG_FILE.format(exporter=EXPORTER_KEYS))
    app = tmp_path / "app.py"
    app.write_text(f"""
import sys
sys.path.insert(0, {str(APP.parent)!r})
from opentelemetry.configuration import configure_sdk, load_config_file
from otel_metadata.autoconfig import install_pending
from zero_code_app import handle_chat

configure_sdk(load_config_file({str(config)!r}))
install_pending()
handle_chat("ana", "conv-1", [7001, 7002])
handle_chat("ben", "conv-2", [7003])
""")
    run_app(app, {**env_for(server), "TEST_TRACK_METADATA_URL": server.base_url},
            instrument=False)

    assert server.metadata == expected(environment="staging", team="search")
    assert server.statuses() == {200: 3}


def test_sdk_disabled_sends_nothing_and_the_app_runs(server: TrackMetadataServer) -> None:
    done = run_app(APP, env_for(server, OTEL_TRACES_EXPORTER="promptlayer_metadata",
                                OTEL_SDK_DISABLED="true"))

    assert server.posts == []
    assert processors_installed(done.stdout) == 1


def test_without_a_key_the_app_runs_and_says_why_nothing_is_sent(
    server: TrackMetadataServer,
) -> None:
    env = env_for(server, OTEL_TRACES_EXPORTER="promptlayer_metadata")
    del env["PROMPTLAYER_API_KEY"]
    done = run_app(APP, env)

    assert server.posts == []
    assert "no PromptLayer API key" in done.stderr and "PROMPTLAYER_API_KEY" in done.stderr


# -- install(): at most one processor per provider, in process --


def test_install_twice_reuses_the_processor(caplog: pytest.LogCaptureFixture) -> None:
    provider = TracerProvider()
    first = install(provider, api_key=API_KEY, base_url="http://127.0.0.1:9")
    again = install(provider, api_key=API_KEY, base_url="http://127.0.0.1:9")
    with caplog.at_level(logging.WARNING, logger="otel_metadata"):
        other = install(provider, api_key=API_KEY, base_url="http://127.0.0.1:10")

    assert first is again is other is installed_processor(provider)
    assert sum(isinstance(p, MetadataSpanProcessor)
               for p in provider._active_span_processor._span_processors) == 1
    assert "other values for base_url" in caplog.text and API_KEY not in caplog.text
    provider.shutdown()


def test_install_reuses_a_processor_the_app_added_itself() -> None:
    provider = TracerProvider()
    own = MetadataSpanProcessor(api_key=API_KEY, base_url="http://127.0.0.1:9")
    provider.add_span_processor(own)

    assert install(provider) is own
    assert provider._active_span_processor._span_processors == (own,)
    provider.shutdown()


def test_unknown_options_are_dropped_with_a_warning_and_retry_may_be_a_mapping(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # What a configuration file hands the exporter: plain YAML values, perhaps a typo.
    with caplog.at_level(logging.WARNING, logger="otel_metadata"):
        options = _processor_options({"max_concurrency": 2, "colour": "blue",
                                      "retry": {"initial_backoff": 0.01, "max_backoff": 0.1}})

    assert options == {"max_concurrency": 2,
                       "retry": RetryPolicy(initial_backoff=0.01, max_backoff=0.1)}
    assert "unknown promptlayer_metadata option(s) colour" in caplog.text


def test_a_bad_retry_mapping_falls_back_to_the_default_policy(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="otel_metadata"):
        assert _processor_options({"retry": {"backoff": 1}}) == {}
        assert _processor_options({"retry": [0.1, 2]}) == {}
    assert caplog.text.count("ignoring promptlayer_metadata option retry") == 2
