"""The retry policy, as one small value (SPEC §7): what to retry, and how long to wait."""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

# delta-seconds (RFC 9110), and the decimals some servers send ("1.5").
_DELTA_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?", re.ASCII)
# A server asking for more than a day is taken to mean a day (a sleep must fit the platform).
MAX_RETRY_AFTER_S = 86_400.0


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, honouring ``Retry-After``.

    The wait before retry ``n`` (0-based) is ``min(max_backoff, initial * multiplier**n)`` scaled
    by a random factor in ``[1 - jitter, 1]``, so a fleet of clients does not retry in step. A
    server's ``Retry-After`` is a floor: we never retry sooner than it asks, and never hammer a
    server that says ``Retry-After: 0``. The caller stops at its deadline (the export timeout):
    a ``Retry-After`` beyond it means giving up now rather than sleeping in vain.
    """

    initial_backoff: float = 0.5
    max_backoff: float = 8.0
    multiplier: float = 2.0
    jitter: float = 0.5

    @staticmethod
    def is_retryable(status: int | None) -> bool:
        """None (timeout, reset, refused) and 408/429/5xx may succeed later; other codes won't."""
        return status is None or status in (408, 429) or 500 <= status <= 599

    def backoff(
        self,
        retry: int,
        retry_after: float | None = None,
        rand: Callable[[], float] = random.random,
    ) -> float:
        """Seconds to wait before retry number `retry` (0 for the first retry)."""
        try:
            base = min(self.max_backoff, self.initial_backoff * self.multiplier ** retry)
        except OverflowError:  # thousands of retries in a long export timeout
            base = self.max_backoff
        ours = base * (1 - self.jitter * rand())
        return ours if retry_after is None else max(retry_after, ours)


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds (decimals too) or an HTTP date; None
    if absent or not understood (then our own backoff applies)."""
    if not value:
        return None
    value = value.strip()
    if _DELTA_SECONDS.fullmatch(value):  # ASCII digits only: "²".isdigit() is True
        return min(float(value), MAX_RETRY_AFTER_S)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    seconds = (when - (now or datetime.now(timezone.utc))).total_seconds()
    return min(max(0.0, seconds), MAX_RETRY_AFTER_S)
