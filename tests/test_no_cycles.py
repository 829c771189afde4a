"""A served request leaves no reference cycle behind.

Objects in a cycle are freed only by the garbage collector. A request that leaves one makes the
collector run more often, and every one of its full collections walks the whole heap, store
included: under load that is the long tail of latencies (BENCHMARKS.md). Each case here serves
one request in the middle of a running event loop and asks the collector how many unreachable
objects it found: none, as for the same request without the middleware.
"""

from __future__ import annotations

import asyncio
import gc
import io
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import pytest

from idem_middleware import IdempotencyConfig, IdempotencyMiddleware, IdempotencyWSGIMiddleware
from idem_middleware.persistence import InMemoryPersistenceLayer

Message = MutableMapping[str, Any]


def _make_app(status: int) -> Callable[..., Awaitable[None]]:
    async def app(scope: Message, receive: Any, send: Any) -> None:
        await receive()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"9")],
            }
        )
        await send({"type": "http.response.body", "body": b'{"id": 1}'})

    return app


async def _serve(app: Callable[..., Awaitable[None]], key: bytes) -> list[Message]:
    sent: list[Message] = []
    delivered = False

    async def receive() -> Message:
        nonlocal delivered
        if delivered:
            return {"type": "http.disconnect"}
        delivered = True
        return {"type": "http.request", "body": b'{"a":1}', "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/orders",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"idempotency-key", key)],
    }
    await app(scope, receive, send)
    return sent


def _unreachable_after(served: Callable[[], Awaitable[object]]) -> int:
    """Unreachable objects the collector finds after ``served`` ran, in a running event loop."""

    async def measure() -> int:
        await served()  # warm-up: imports, caches, the lease keeper's per-loop schedule
        gc.collect()
        await served()
        return gc.collect()

    enabled = gc.isenabled()
    gc.disable()
    try:
        return asyncio.run(measure())
    finally:
        if enabled:
            gc.enable()


@pytest.fixture(autouse=True)
def _no_debug_log(caplog: pytest.LogCaptureFixture) -> None:
    # Events are emitted only when something reads them: the default, as in production.
    caplog.set_level("WARNING", logger="idem_middleware")


def _middleware(status: int = 201, **config: Any) -> IdempotencyMiddleware:
    return IdempotencyMiddleware(
        _make_app(status),
        persistence_layer=InMemoryPersistenceLayer(),
        config=IdempotencyConfig(**config),
    )


def test_the_bare_app_leaves_no_cycle() -> None:
    """The measurement itself leaves nothing: what the cases below find is the middleware's."""
    app = _make_app(201)
    assert _unreachable_after(lambda: _serve(app, b"k")) == 0


def test_a_new_key_leaves_no_cycle() -> None:
    middleware = _middleware()
    keys = iter(range(10))
    assert _unreachable_after(lambda: _serve(middleware, f"k-{next(keys)}".encode())) == 0


@pytest.mark.parametrize("use_local_cache", [False, True])
def test_a_replay_leaves_no_cycle(use_local_cache: bool) -> None:
    middleware = _middleware(use_local_cache=use_local_cache)

    async def replay() -> None:
        await _serve(middleware, b"k")
        sent = await _serve(middleware, b"k")
        assert (b"idempotent-replayed", b"true") in sent[0]["headers"]

    assert _unreachable_after(replay) == 0


def test_a_released_key_leaves_no_cycle() -> None:
    middleware = _middleware(status=503)
    assert _unreachable_after(lambda: _serve(middleware, b"k")) == 0


def test_a_wsgi_new_key_and_replay_leave_no_cycle() -> None:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        environ["wsgi.input"].read()
        start_response("201 Created", [("Content-Type", "application/json")])
        return [b'{"id": 1}']

    middleware = IdempotencyWSGIMiddleware(app, persistence_layer=InMemoryPersistenceLayer())
    keys = iter(range(10))

    def call(key: str) -> None:
        environ = {
            "REQUEST_METHOD": "POST",
            "PATH_INFO": "/orders",
            "QUERY_STRING": "",
            "CONTENT_LENGTH": "7",
            "HTTP_IDEMPOTENCY_KEY": key,
            "wsgi.input": io.BytesIO(b'{"a":1}'),
        }

        def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
            return lambda data: None

        b"".join(middleware(environ, start_response))

    async def new_and_replay() -> None:
        key = f"k-{next(keys)}"
        call(key)
        call(key)

    assert _unreachable_after(new_and_replay) == 0
