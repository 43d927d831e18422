"""The retry policy: what is retried, how long to wait, and what Retry-After means."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from otel_metadata.retry import MAX_RETRY_AFTER_S, RetryPolicy, parse_retry_after


@pytest.mark.parametrize(("status", "retryable"), [
    (None, True), (408, True), (429, True), (500, True), (502, True), (503, True), (504, True),
    (400, False), (401, False), (403, False), (404, False), (422, False),
])
def test_what_is_retried(status: int | None, retryable: bool) -> None:
    assert RetryPolicy.is_retryable(status) is retryable


def test_backoff_grows_exponentially_up_to_the_cap_with_jitter_below() -> None:
    policy = RetryPolicy(initial_backoff=0.5, max_backoff=8.0, multiplier=2.0, jitter=0.5)
    no_jitter = [policy.backoff(n, rand=lambda: 0.0) for n in range(7)]
    assert no_jitter == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert [policy.backoff(n, rand=lambda: 1.0) for n in range(3)] == [0.25, 0.5, 1.0]


def test_backoff_survives_thousands_of_retries() -> None:
    assert RetryPolicy(max_backoff=8.0).backoff(100_000, rand=lambda: 0.0) == 8.0


def test_retry_after_is_a_floor_never_a_shortcut() -> None:
    policy = RetryPolicy(initial_backoff=0.5, max_backoff=8.0)
    assert policy.backoff(0, retry_after=3.0, rand=lambda: 0.0) == 3.0
    assert policy.backoff(4, retry_after=0.0, rand=lambda: 0.0) == 8.0  # "0" is no hammering


NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize(("header", "seconds"), [
    ("7", 7.0), (" 0 ", 0.0), (format_datetime(NOW + timedelta(seconds=30), usegmt=True), 30.0),
    (format_datetime(NOW - timedelta(seconds=30), usegmt=True), 0.0),
    ("999999999999", MAX_RETRY_AFTER_S), (None, None), ("", None), ("-5", None),
    ("soon", None), ("1.5", 1.5), ("0.25", 0.25), ("²", None), ("١", None), ("1e3", None),
    ("1.", None), (".5", None), ("1.5.2", None),
])
def test_parse_retry_after(header: str | None, seconds: float | None) -> None:
    assert parse_retry_after(header, now=NOW) == seconds


@given(st.text())
def test_parse_retry_after_never_raises(header: str) -> None:
    seconds = parse_retry_after(header, now=NOW)
    assert seconds is None or 0.0 <= seconds <= MAX_RETRY_AFTER_S
