"""At lifespan shutdown the middleware closes what its store opened on the server's event loop
(asyncio clients and pools), so a server stops without "Unclosed client session" warnings or
connections left to the garbage collector.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from idem_middleware import IdempotencyMiddleware
from idem_middleware.persistence.memory import InMemoryPersistenceLayer


class ClosingLayer(InMemoryPersistenceLayer):
    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.closed_on: list[asyncio.AbstractEventLoop] = []
        self.fail = fail

    async def aclose(self) -> None:
        self.closed_on.append(asyncio.get_running_loop())
        if self.fail:
            raise ConnectionError("the server went away first")


def test_the_store_is_closed_once_at_shutdown_on_the_server_loop() -> None:
    layer = ClosingLayer()
    app = IdempotencyMiddleware(Starlette(), persistence_layer=layer)
    with TestClient(app):
        assert layer.closed_on == []
    assert len(layer.closed_on) == 1


def test_a_store_that_fails_to_close_is_logged_and_shutdown_completes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    layer = ClosingLayer(fail=True)
    app = IdempotencyMiddleware(Starlette(), persistence_layer=layer)
    with caplog.at_level(logging.WARNING, logger="idem_middleware"), TestClient(app):
        pass
    assert len(layer.closed_on) == 1
    assert "the server went away first" in caplog.text


def test_every_layer_can_be_closed_on_a_loop_where_it_opened_nothing() -> None:
    asyncio.run(InMemoryPersistenceLayer().aclose())


def test_the_redis_client_of_the_server_loop_is_closed_at_shutdown(redis_url: str) -> None:
    from idem_middleware.persistence.redis import RedisPersistenceLayer

    layer = RedisPersistenceLayer(redis_url)

    app = IdempotencyMiddleware(Starlette(), persistence_layer=layer)
    with TestClient(app) as client:
        client.post("/orders", json={"n": 1}, headers={"Idempotency-Key": "k-1"})
        assert len(layer._async_by_loop) == 1
        (opened,) = layer._async_by_loop.values()
    assert len(layer._async_by_loop) == 0
    pool = opened.client.connection_pool
    assert all(not c.is_connected for c in pool._get_free_connections())  # closed, not leaked


class FailingCheckLayer(ClosingLayer):
    def check(self) -> None:
        raise ConnectionError("no such table")


@pytest.mark.anyio
async def test_a_store_that_fails_its_startup_check_is_closed_too() -> None:
    from tests.test_hardening_adapters import LifespanServer, lifespan_app

    layer = FailingCheckLayer()
    server = LifespanServer()
    await server.run(IdempotencyMiddleware(lifespan_app([]), persistence_layer=layer))
    assert [m["type"] for m in server.sent] == ["lifespan.startup.failed"]
    assert len(layer.closed_on) == 1
