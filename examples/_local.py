"""Where the examples send metadata: PromptLayer when PROMPTLAYER_API_KEY is set, else the
embedded demo server on 127.0.0.1 (no key, no network)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from otel_metadata.testing.track_metadata import TrackMetadataServer


@contextmanager
def promptlayer_or_local() -> Iterator[TrackMetadataServer | None]:
    """Yield None for the real API, or a started local server with the env pointed at it."""
    if os.environ.get("PROMPTLAYER_API_KEY"):
        yield None
        return
    with TrackMetadataServer() as server:
        os.environ["PROMPTLAYER_API_KEY"] = server.api_key
        os.environ["PROMPTLAYER_BASE_URL"] = server.base_url
        try:
            yield server
        finally:
            del os.environ["PROMPTLAYER_API_KEY"], os.environ["PROMPTLAYER_BASE_URL"]
