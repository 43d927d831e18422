"""Configuration (SPEC §8): argument, then environment variable, then default; a bad value is a
warning naming the variable, then the default, never a crash."""

from __future__ import annotations

from typing import Any

import pytest

from otel_metadata import MetadataSpanProcessor
from otel_metadata.config import DEFAULT_BASE_URL, OPTIONS, resolve

# env var → (the setting it feeds, a good value, what that resolves to); defaults come from the
# settings' declarations (config.OPTIONS).
GOOD = {
    "OTEL_BSP_SCHEDULE_DELAY": ("schedule_delay_s", "250", 0.25),
    "OTEL_BSP_MAX_QUEUE_SIZE": ("max_queue_size", "4096", 4096),
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": ("max_export_batch_size", "64", 64),
    "OTEL_BSP_EXPORT_TIMEOUT": ("export_timeout_s", "1500", 1.5),
    "PROMPTLAYER_METADATA_MAX_CONCURRENCY": ("max_concurrency", "2", 2),
    "PROMPTLAYER_METADATA_MAX_TRACE_WAIT": ("max_trace_wait_s", "100", 0.1),
    "PROMPTLAYER_METADATA_MAX_TRACES": ("max_traces", "10", 10),
    "PROMPTLAYER_METADATA_MAX_VALUE_LENGTH": ("max_value_length", "64", 64),
}
NUMERIC = {env: (name, OPTIONS[name].default, good, value)
           for env, (name, good, value) in GOOD.items()}
GARBAGE = ["abc", "-5", "nan", "inf", "1e999", "0x10", "1,5", "1 2"]


@pytest.mark.parametrize("env", sorted(NUMERIC))
def test_numeric_env_vars_are_read(env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    setting, _, good, value = NUMERIC[env]
    monkeypatch.setenv(env, good)
    assert getattr(resolve(), setting) == value


@pytest.mark.parametrize("garbage", GARBAGE)
@pytest.mark.parametrize("env", sorted(NUMERIC))
def test_bad_numeric_env_vars_warn_by_name_and_use_the_default(
    env: str, garbage: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    setting, default, _, _ = NUMERIC[env]
    monkeypatch.setenv(env, garbage)
    assert getattr(resolve(), setting) == default
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and env in warnings[0]


def test_integer_settings_refuse_fractions(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "1.5")
    assert resolve().max_queue_size == OPTIONS["max_queue_size"].default
    assert "OTEL_BSP_MAX_QUEUE_SIZE" in caplog.text


@pytest.mark.parametrize("garbage", ["yes", "1", "on", "TRUEISH"])
def test_a_bad_disabled_flag_warns_and_stays_enabled(
    garbage: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", garbage)
    assert resolve().disabled is False
    assert "OTEL_SDK_DISABLED" in caplog.text


@pytest.mark.parametrize("garbage", ["api.promptlayer.com", "ftp://host", "http://", "http://[::1",
                                     "http://host:99999", "http://host:port", "https://a b.com"])
def test_a_bad_base_url_warns_and_uses_the_default(
    garbage: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("PROMPTLAYER_BASE_URL", garbage)
    assert resolve().base_url == DEFAULT_BASE_URL
    assert "PROMPTLAYER_BASE_URL" in caplog.text
    assert resolve(base_url=garbage).base_url == DEFAULT_BASE_URL


def test_arguments_beat_env_vars_which_beat_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "100")
    monkeypatch.setenv("PROMPTLAYER_BASE_URL", "http://127.0.0.1:1/")
    monkeypatch.setenv("PROMPTLAYER_API_KEY", "pl-env")
    assert (resolve().max_queue_size, resolve(max_queue_size=7).max_queue_size) == (100, 7)
    assert resolve().base_url == "http://127.0.0.1:1"
    assert resolve(base_url="https://x.example").base_url == "https://x.example"
    assert (resolve().api_key, resolve().api_key_source) == ("pl-env", "PROMPTLAYER_API_KEY")
    assert resolve(api_key="pl-arg").api_key_source == "the api_key argument"


@pytest.mark.parametrize(("argument", "bad"), [
    ("max_queue_size", "big"), ("max_queue_size", 0), ("export_timeout_millis", -1),
    ("export_timeout_millis", float("inf")), ("schedule_delay_millis", float("nan")),
    ("max_concurrency", 10_000), ("max_concurrency", 2.5), ("max_value_length", True),
    ("request_timeout_s", "soon"), ("request_timeout_s", 0), ("max_traces", 10**400),
    ("request_id_attributes", 5), ("request_id_attributes", [""]), ("extra_attributes", [1]),
    ("metadata", 3), ("api_key", 123), ("api_key", "  "), ("base_url", 42),
])
def test_bad_arguments_warn_by_name_and_never_raise(
    argument: str, bad: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    settings = resolve(**{argument: bad})
    assert settings == resolve()  # the default, every setting
    assert argument in caplog.text
    processor = MetadataSpanProcessor(**{argument: bad})  # the app starts all the same
    processor.shutdown()


def test_a_batch_larger_than_the_queue_is_clamped(caplog: pytest.LogCaptureFixture) -> None:
    settings = resolve(max_queue_size=10, max_export_batch_size=50)
    assert settings.max_export_batch_size == 10
    assert "OTEL_BSP_MAX_EXPORT_BATCH_SIZE" in caplog.text


def test_the_processor_takes_each_declared_setting_and_documents_it() -> None:
    """One declaration per setting (config.Settings): the explicit constructor signature and
    its docstring follow it, and so do the zero-code exporter's options."""
    import inspect

    from otel_metadata import autoconfig, config

    params = set(inspect.signature(MetadataSpanProcessor.__init__).parameters) - {"self"}
    objects = {"retry", "meter_provider"}  # arguments that are objects, not settings
    assert params == config.ARGUMENTS | objects
    assert autoconfig._OPTION_NAMES == params
    doc = MetadataSpanProcessor.__doc__ or ""
    assert all(f"        {name}:" in doc for name in params)
