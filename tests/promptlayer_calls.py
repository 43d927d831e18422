"""Every way an app calls the real `promptlayer` SDK, for tests/test_promptlayer.py.

Each call style makes exactly one request that PromptLayer logs, consumes what it returns as an
app would, and returns that (a stream as its type and the items it yielded), so a test can
compare what the app got with and without the instrumentor.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import openai
from opentelemetry.sdk.trace import Tracer
from opentelemetry.trace import Span
from promptlayer import AsyncPromptLayer, PromptLayer

from otel_metadata.testing.promptlayer_api import ANTHROPIC_MODEL, MODEL, PromptLayerAPI

PROMPT, VARIABLES = "greeting", {"name": "Ana"}
MESSAGES = [{"role": "user", "content": "What is OpenTelemetry?"}]
_TEXT = [{"type": "text", "text": "hi"}]
LOGGED = {
    "provider": "openai", "model": MODEL,
    "input": {"type": "chat", "messages": [{"role": "user", "content": _TEXT}]},
    "output": {"type": "chat", "messages": [{"role": "assistant", "content": _TEXT}]},
}


@dataclass
class Clients:
    """The app's PromptLayer clients, sync and async, and the event loop its async code runs on."""

    api: PromptLayerAPI
    sync: PromptLayer
    aio: AsyncPromptLayer
    loop: asyncio.AbstractEventLoop

    def wait(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Await `coro` as the app's code would, in the current context (its span, its values)."""
        return self.loop.run_until_complete(coro)

    def wait_for(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """`wait`, as a reader of LATER."""
        return self.wait(coro)


@contextmanager
def handler(tracer: Tracer, user: str = "ana") -> Iterator[Span]:
    """A web handler's span, the user set once on it."""
    with tracer.start_as_current_span("POST /chat") as span:
        span.set_attribute("user.id", user)
        yield span


def stream_of(stream: Iterable[Any]) -> tuple[str, list[Any]]:
    return type(stream).__name__, list(stream)


async def astream_of(stream: Any) -> tuple[str, list[Any]]:
    return type(stream).__name__, [item async for item in stream]


def failing(call: Callable[[], Any], api: PromptLayerAPI) -> str:
    """Make the model refuse one request; the SDK logs it as an error, then raises."""
    api.fail_llm = 1
    try:
        call()
    except openai.BadRequestError as error:
        return type(error).__name__
    raise AssertionError("the SDK did not raise")


def log_args() -> dict[str, Any]:
    now = time.time()
    return {**LOGGED, "request_start_time": now, "request_end_time": now}


async def _run_stream_async(c: Clients) -> Any:
    return await astream_of(await c.aio.run(PROMPT, input_variables=VARIABLES, stream=True))


# A proxy's call, by provider (sync or async), taking the proxy's own keyword arguments.
Call = Callable[..., Any]


def _openai(c: Clients, **kwargs: Any) -> Any:
    return c.sync.openai.OpenAI().chat.completions.create(model=MODEL, messages=MESSAGES,
                                                            **kwargs)


def _openai_async(c: Clients, **kwargs: Any) -> Any:
    return c.aio.openai.AsyncOpenAI().chat.completions.create(model=MODEL, messages=MESSAGES,
                                                              **kwargs)


def _anthropic(c: Clients, **kwargs: Any) -> Any:
    return c.sync.anthropic.Anthropic().messages.create(model=ANTHROPIC_MODEL, max_tokens=256,
                                                        messages=MESSAGES, **kwargs)


def _anthropic_async(c: Clients, **kwargs: Any) -> Any:
    return c.aio.anthropic.AsyncAnthropic().messages.create(
        model=ANTHROPIC_MODEL, max_tokens=256, messages=MESSAGES, **kwargs)


def _proxy(call: Call, c: Clients, **kwargs: Any) -> Any:
    answer = call(c, **kwargs)
    return stream_of(answer) if kwargs.get("stream") else answer


async def _proxy_async(call: Call, c: Clients, **kwargs: Any) -> Any:
    answer = await call(c, **kwargs)
    return await astream_of(answer) if kwargs.get("stream") else answer


_WAYS: dict[str, dict[str, bool]] = {
    "": {}, "_pl_id": {"return_pl_id": True}, "_stream": {"stream": True},
    "_stream_pl_id": {"stream": True, "return_pl_id": True}}


def _proxy_styles(name: str, call: Call, acall: Call) -> dict[str, Callable[[Clients], Any]]:
    """One provider's proxy every way an app calls it: sync (each of `_WAYS`) and async
    (streamed or not, with or without ``return_pl_id``, not both)."""
    styles: dict[str, Callable[[Clients], Any]] = {
        name + way: functools.partial(_proxy, call, **kw) for way, kw in _WAYS.items()}
    for way in ("", "_pl_id", "_stream"):
        styles[f"{name}_async{way}"] = functools.partial(_wait_proxy, acall, **_WAYS[way])
    return styles


def _wait_proxy(acall: Call, c: Clients, **kwargs: Any) -> Any:
    return c.wait(_proxy_async(acall, c, **kwargs))


STYLES: dict[str, Callable[[Clients], Any]] = {
    "run": lambda c: c.sync.run(PROMPT, input_variables=VARIABLES),
    "run_stream": lambda c: stream_of(c.sync.run(PROMPT, input_variables=VARIABLES, stream=True)),
    "run_async": lambda c: c.wait(c.aio.run(PROMPT, input_variables=VARIABLES)),
    "run_async_stream": lambda c: c.wait(_run_stream_async(c)),
    "run_error": lambda c: failing(lambda: c.sync.run(PROMPT, input_variables=VARIABLES), c.api),
    "run_async_error": lambda c: failing(
        lambda: c.wait(c.aio.run(PROMPT, input_variables=VARIABLES)), c.api),
    "log_request": lambda c: c.sync.log_request(**log_args()),
    "log_request_async": lambda c: c.wait(c.aio.log_request(**log_args())),
    **_proxy_styles("proxy", _openai, _openai_async),
    **_proxy_styles("anthropic", _anthropic, _anthropic_async),
}


# Calls whose answer is read (a stream) or awaited (a coroutine) after the call returned:
# name -> (make the call, read the answer).
LATER: dict[str, tuple[Callable[[Clients], Any], Callable[[Clients, Any], Any]]] = {
    "run_stream": (lambda c: c.sync.run(PROMPT, input_variables=VARIABLES, stream=True),
                   lambda c, s: stream_of(s)),
    "run_async": (lambda c: c.aio.run(PROMPT, input_variables=VARIABLES), Clients.wait_for),
    "run_async_stream": (
        lambda c: c.wait(c.aio.run(PROMPT, input_variables=VARIABLES, stream=True)),
        lambda c, s: c.wait(astream_of(s))),
    "log_request_async": (lambda c: c.aio.log_request(**log_args()), Clients.wait_for),
    "proxy_stream": (lambda c: _openai(c, stream=True), lambda c, s: stream_of(s)),
    "proxy_async": (_openai_async, Clients.wait_for),
    "proxy_async_stream": (lambda c: c.wait(_openai_async(c, stream=True)),
                           lambda c, s: c.wait(astream_of(s))),
    "anthropic_stream": (lambda c: _anthropic(c, stream=True), lambda c, s: stream_of(s)),
    "anthropic_async": (_anthropic_async, Clients.wait_for),
    "anthropic_async_stream": (lambda c: c.wait(_anthropic_async(c, stream=True)),
                               lambda c, s: c.wait(astream_of(s))),
}
