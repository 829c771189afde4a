"""PostgreSQL on the event loop: the ASGI adapter awaits the layer's asyncio path (psycopg
``AsyncConnection`` objects from one ``AsyncConnectionPool`` per event loop, no worker thread per
store call), the engine's steps run unchanged over it, a connection that dies mid-claim is a 503,
and concurrent duplicates on a real uvicorn server run the handler once. Against a real
PostgreSQL; the whole persistence contract runs over this path too (backend ``postgres-async``).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx
import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool, ConnectionPool
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from idem_middleware import IdempotencyConfig, IdempotencyMiddleware
from idem_middleware.engine import IdempotencyEngine, PendingClaim, Proceed, Respond
from idem_middleware.exceptions import StoreUnreachableError
from idem_middleware.persistence import PostgresPersistenceLayer, from_url
from idem_middleware.persistence.record import STATUS_COMPLETED, STATUS_INPROGRESS, DataRecord
from idem_middleware.persistence.steps import arun
from idem_middleware.request import Headers, IdempotencyRequest
from idem_middleware.responses import StoredResponse

pytestmark = pytest.mark.postgres

CREATED = StoredResponse(201, (("content-type", "application/json"),), b'{"id":1}')


@pytest.fixture
def make_layer(postgres_conninfo: str) -> Iterator[Callable[..., PostgresPersistenceLayer]]:
    """Layers built from the session database's conninfo (so with both pools), a table each."""
    layers: list[PostgresPersistenceLayer] = []

    def make(**options: Any) -> PostgresPersistenceLayer:
        options.setdefault("table_name", f"idem_{uuid.uuid4().hex[:12]}")
        layer = PostgresPersistenceLayer(postgres_conninfo, **options)
        layer.create_table()
        layers.append(layer)
        return layer

    yield make
    for layer in layers:
        layer.close()


def request_for(key: str, body: bytes = b'{"qty":1}') -> IdempotencyRequest:
    return IdempotencyRequest(
        method="POST",
        path="/orders",
        query_string="",
        headers=Headers.from_asgi([(b"idempotency-key", key.encode())]),
        body=body,
        raw={},
    )


def engine_for(layer: PostgresPersistenceLayer, **options: Any) -> IdempotencyEngine:
    return IdempotencyEngine(layer, IdempotencyConfig(scope=lambda request: "tenant", **options))


def pending(engine: IdempotencyEngine, key: str, body: bytes = b'{"qty":1}') -> PendingClaim:
    step = engine.prepare(request_for(key, body))
    assert isinstance(step, PendingClaim)
    return step


def forbid_blocking_calls(monkeypatch: pytest.MonkeyPatch, layer: PostgresPersistenceLayer) -> None:
    """Fail the test on any call of the blocking pool's record primitives."""
    for name in ("_put_record", "_get_record", "_update_record", "_renew_record", "_delete_record"):
        monkeypatch.setattr(layer, name, _forbidden(name))


def _forbidden(name: str) -> Callable[..., Any]:
    def call(*args: Any) -> Any:
        raise AssertionError(f"{name} (blocking) was called on the asyncio path")

    return call


async def _no_thread(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("a store call went to a worker thread")


# The engine's steps, awaited on the loop ------------------------------------------------------


def test_the_engines_steps_run_over_asyncio_connections(
    make_layer: Callable[..., PostgresPersistenceLayer], monkeypatch: pytest.MonkeyPatch
) -> None:
    layer = make_layer()
    engine = engine_for(layer)
    assert engine.store_async
    forbid_blocking_calls(monkeypatch, layer)

    async def scenario() -> None:
        first = await engine.claim.native(pending(engine, "order-1"))
        assert isinstance(first, Proceed)
        in_flight = await engine.claim.native(pending(engine, "order-1"))
        assert isinstance(in_flight, Respond)
        assert in_flight.response.status == 409
        assert await engine.renew.native(first) is True
        await engine.complete.native(first, CREATED)
        replay = await engine.claim.native(pending(engine, "order-1"))
        assert isinstance(replay, Respond)
        assert (replay.response.status, replay.response.body) == (201, CREATED.body)
        reused = await engine.claim.native(pending(engine, "order-1", b'{"qty":2}'))
        assert isinstance(reused, Respond)
        assert reused.response.status == 422

        failed = await engine.claim.native(pending(engine, "order-2"))
        assert isinstance(failed, Proceed)
        await engine.release.native(failed, 500)
        again = await engine.claim.native(pending(engine, "order-2"))
        assert isinstance(again, Proceed), "a released key runs again"
        await layer.aclose()

    asyncio.run(scenario())
    monkeypatch.undo()
    stored = layer.get_record(pending(engine, "order-1").idempotency_key)
    assert stored.status == STATUS_COMPLETED  # what the asyncio path wrote, read back blocking


def test_concurrent_claims_of_one_key_on_the_loop_make_one_lease(
    make_layer: Callable[..., PostgresPersistenceLayer],
) -> None:
    layer = make_layer(max_pool_size=8)
    engine = engine_for(layer)

    async def scenario() -> list[Any]:
        keys = ["same"] * 30 + [f"distinct-{n}" for n in range(10)]
        decisions = await asyncio.gather(
            *(engine.claim.native(pending(engine, key)) for key in keys)
        )
        await layer.aclose()
        return decisions

    decisions = asyncio.run(scenario())
    same, distinct = decisions[:30], decisions[30:]
    assert sum(isinstance(d, Proceed) for d in same) == 1
    assert [d.response.status for d in same if isinstance(d, Respond)] == [409] * 29
    assert all(isinstance(d, Proceed) for d in distinct)


# Pools: one per event loop, opened on it, closed with it ---------------------------------------


async def claim(layer: PostgresPersistenceLayer, key: str) -> DataRecord:
    """The layer's claim, through its asyncio path."""
    return await arun(layer, layer.save_inprogress_steps(layer.build_idempotency_key(key), "h"))


def test_one_asyncio_pool_per_event_loop_closed_when_its_loop_shuts_down(
    make_layer: Callable[..., PostgresPersistenceLayer],
) -> None:
    layer = make_layer()
    layer.configure(IdempotencyConfig())

    async def pool_of_this_loop() -> tuple[Any, Any]:
        first = await layer._async_pool()
        await claim(layer, f"order-{uuid.uuid4().hex}")
        return first, await layer._async_pool()

    # No aclose(): asyncio.run cancels what is left at its end, as uvicorn's shutdown does.
    first_loop = asyncio.run(pool_of_this_loop())
    second_loop = asyncio.run(pool_of_this_loop())
    assert first_loop[0] is first_loop[1]
    assert second_loop[0] is not first_loop[0]
    assert isinstance(first_loop[0], AsyncConnectionPool)
    assert first_loop[0].closed, "the pool is closed with its event loop"
    assert second_loop[0].closed


def test_the_loops_end_is_not_held_up_by_a_pool_that_is_still_connecting(
    make_layer: Callable[..., PostgresPersistenceLayer],
) -> None:
    """psycopg_pool's workers survive the cancellation of a connection they are opening: a pool
    left open on a loop that ends at that moment made ``asyncio.run`` (and a server's shutdown)
    wait forever.
    """
    layer = make_layer(min_pool_size=4, max_pool_size=4)

    async def open_and_leave() -> None:
        await layer._async_pool()  # four connections now being opened in the background

    started = time.monotonic()
    for _ in range(3):
        asyncio.run(asyncio.wait_for(open_and_leave(), 10))
    assert time.monotonic() - started < 60  # bounded by the pool's close timeout, not forever


def test_given_pools_are_used_as_they_are(postgres_conninfo: str) -> None:
    table = f"idem_{uuid.uuid4().hex[:12]}"
    with ConnectionPool(postgres_conninfo, kwargs={"autocommit": True}, open=True) as pool:
        assert not PostgresPersistenceLayer(pool=pool, table_name=table).native_async

        async def scenario() -> DataRecord:
            async with AsyncConnectionPool(
                postgres_conninfo, kwargs={"autocommit": True}, open=False
            ) as async_pool:
                layer = PostgresPersistenceLayer(pool=pool, async_pool=async_pool, table_name=table)
                layer.create_table()
                layer.configure(IdempotencyConfig())
                assert layer.native_async
                assert await layer._async_pool() is async_pool
                lease = await claim(layer, "order-1")
                await layer.aclose()  # not the layer's to close
                assert not async_pool.closed
                return lease

        lease = asyncio.run(scenario())
        layer = PostgresPersistenceLayer(pool=pool, table_name=table)
        layer.configure(IdempotencyConfig())
        assert layer.get_record(lease.idempotency_key).lease_id == lease.lease_id


def test_an_async_pool_needs_a_blocking_pool_beside_it(postgres_conninfo: str) -> None:
    async_pool = AsyncConnectionPool(postgres_conninfo, open=False)
    with pytest.raises(ValueError, match="async_pool"):
        PostgresPersistenceLayer(postgres_conninfo, async_pool=async_pool)
    with (
        ConnectionPool(postgres_conninfo, open=False) as pool,
        pytest.raises(TypeError, match="async_pool"),
    ):
        PostgresPersistenceLayer(pool=pool, async_pool=object())  # type: ignore[arg-type]


def test_from_url_builds_a_layer_with_the_asyncio_path(postgres_conninfo: str) -> None:
    layer = from_url(postgres_url(postgres_conninfo))
    assert isinstance(layer, PostgresPersistenceLayer)
    assert layer.native_async
    assert not layer.missing_async_primitives()


# The ASGI adapter --------------------------------------------------------------------------------


def asgi_app(layer: PostgresPersistenceLayer, **options: Any) -> tuple[Any, list[int]]:
    calls: list[int] = []

    async def orders(request: Request) -> Response:
        calls.append(1)
        if request.query_params.get("fail"):
            return JSONResponse({"error": "boom"}, status_code=500)
        if request.query_params.get("slow"):
            await asyncio.sleep(float(request.query_params["slow"]))
        return JSONResponse({"order": len(calls)}, status_code=201)

    app = Starlette(routes=[Route("/orders", orders, methods=["POST"])])
    config = IdempotencyConfig(scope=lambda request: "tenant", **options)
    return IdempotencyMiddleware(app, persistence_layer=layer, config=config), calls


async def _after(delay: float, call: Any) -> Any:
    await asyncio.sleep(delay)
    return await call


def test_asgi_store_calls_run_on_the_event_loop_not_in_worker_threads(
    make_layer: Callable[..., PostgresPersistenceLayer], monkeypatch: pytest.MonkeyPatch
) -> None:
    layer = make_layer()
    # A lease short enough that the keeper renews it while the slow request runs.
    app, calls = asgi_app(layer, in_progress_expires_after_seconds=1, conflict_wait_seconds=3)
    monkeypatch.setattr(anyio.to_thread, "run_sync", _no_thread)
    forbid_blocking_calls(monkeypatch, layer)

    async def scenario() -> list[httpx.Response]:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as client:
            key = {"Idempotency-Key": "order-1"}
            first = await client.post("/orders", json={"qty": 1}, headers=key)
            replay = await client.post("/orders", json={"qty": 1}, headers=key)
            failed = await client.post(
                "/orders?fail=1", json={"qty": 1}, headers={"Idempotency-Key": "order-2"}
            )
            failed_again = await client.post(
                "/orders?fail=1", json={"qty": 1}, headers={"Idempotency-Key": "order-2"}
            )
            slow_key = {"Idempotency-Key": "order-3"}
            slow, waiting = await asyncio.gather(
                client.post("/orders?slow=0.8", json={"qty": 1}, headers=slow_key),
                _after(0.2, client.post("/orders?slow=0.8", json={"qty": 1}, headers=slow_key)),
            )
        await layer.aclose()
        return [first, replay, failed, failed_again, slow, waiting]

    first, replay, failed, failed_again, slow, waiting = asyncio.run(scenario())
    assert first.status_code == 201
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.content == first.content
    assert (failed.status_code, failed_again.status_code) == (500, 500)
    assert slow.status_code == 201
    assert waiting.status_code == 201
    assert waiting.headers["idempotent-replayed"] == "true"
    assert len(calls) == 4  # order-1 once, order-2 twice (released), order-3 once


# Faults ------------------------------------------------------------------------------------------


def test_a_connection_that_dies_mid_claim_is_a_503_and_leaves_the_record_intact(
    make_layer: Callable[..., PostgresPersistenceLayer], postgres_conninfo: str
) -> None:
    """The claim waits on a row another session holds; that session's operator then terminates
    the claim's backend (``pg_terminate_backend``, as a failover or an admin would): the request
    gets the store's 503 problem, the record is the one that was there, the pool replaces the
    dead connection and the retry runs the handler once.
    """
    layer = make_layer()
    app, calls = asgi_app(layer)
    key = pending(app.engine, "order-1").idempotency_key
    table = sql.Identifier(layer.table_name)
    expired = int(time.time()) - 10  # a dead record: the claim takes it over, under a row lock
    with psycopg.connect(postgres_conninfo, autocommit=True) as admin:
        admin.execute(
            sql.SQL(
                "INSERT INTO {} (id, status, expiration, in_progress_expiration, lease_id)"
                " VALUES (%s, %s, %s, %s, 'old-lease')"
            ).format(table),
            (key, STATUS_INPROGRESS, expired, expired * 1000),
        )
        locker = psycopg.connect(postgres_conninfo)
        locker.execute(sql.SQL("SELECT 1 FROM {} WHERE id = %s FOR UPDATE").format(table), (key,))

        def terminate_the_waiting_claim() -> int:
            for _ in range(200):
                row = admin.execute(
                    "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND datname = current_database() AND query LIKE %s",
                    (f"%{layer.table_name}%",),
                ).fetchone()
                if row is not None:
                    admin.execute("SELECT pg_terminate_backend(%s)", (row[0],))
                    return int(row[0])
                time.sleep(0.02)
            raise AssertionError("the claim never waited on the row lock")

        def stored() -> tuple[Any, ...] | None:
            return admin.execute(
                sql.SQL("SELECT status, lease_id FROM {} WHERE id = %s").format(table), (key,)
            ).fetchone()

        async def scenario() -> tuple[httpx.Response, Any, httpx.Response]:
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://t"
            ) as client:
                headers = {"Idempotency-Key": "order-1"}
                request = asyncio.create_task(client.post("/orders", json={}, headers=headers))
                await anyio.to_thread.run_sync(terminate_the_waiting_claim)
                failed = await request
                locker.rollback()
                after_fault = await anyio.to_thread.run_sync(stored)
                retry = await client.post("/orders", json={}, headers=headers)
            await layer.aclose()
            return failed, after_fault, retry

        failed, after_fault, retry = asyncio.run(scenario())
        locker.close()
        assert failed.status_code == 503
        assert failed.headers["content-type"] == "application/problem+json"
        assert failed.json()["code"] == "idempotency_store_unavailable"
        assert retry.status_code == 201
        assert calls == [1], "the handler ran for the retry only"
        assert after_fault == (STATUS_INPROGRESS, "old-lease"), "the claim was all or nothing"
        status, lease_id = stored() or (None, None)
        assert status == STATUS_COMPLETED
        assert lease_id not in (None, "old-lease")


def test_a_terminated_connection_is_a_store_unreachable_error(
    make_layer: Callable[..., PostgresPersistenceLayer], postgres_conninfo: str
) -> None:
    layer = make_layer(min_pool_size=1, max_pool_size=1)
    layer.configure(IdempotencyConfig())

    async def scenario() -> None:
        await claim(layer, "warm")  # the one pooled connection is open and idle
        pool = await layer._async_pool()
        async with pool.connection() as connection:
            pid = connection.info.backend_pid
        with psycopg.connect(postgres_conninfo, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(StoreUnreachableError, match="PostgreSQL claim"):
            await claim(layer, "order-1")
        lease = await claim(layer, "order-1")  # the pool has replaced the dead connection
        assert lease.status == STATUS_INPROGRESS
        await layer.aclose()

    asyncio.run(scenario())


# End to end: the FastAPI example on uvicorn with two worker processes, over PostgreSQL ----------


def postgres_url(conninfo: str) -> str:
    params = conninfo_to_dict(conninfo)
    return (
        f"postgresql://{params.get('user', 'postgres')}@{params.get('host', '127.0.0.1')}"
        f":{params.get('port', '5432')}/{params['dbname']}"
    )


@pytest.mark.e2e
def test_concurrent_retries_run_the_handler_once_on_two_uvicorn_workers(
    postgres_conninfo: str, tmp_path: Path
) -> None:
    from tests.test_e2e_servers import UVICORN_2_WORKERS_FASTAPI, app_env, exercise_exactly_once
    from tooling.servers import running

    url = postgres_url(postgres_conninfo)
    owner = from_url(url)
    assert isinstance(owner, PostgresPersistenceLayer)
    owner.create_table()  # the example app's default table, in the session's database
    owner.close()
    env = app_env(tmp_path, IDEM_STORE_URL=url)
    with running(UVICORN_2_WORKERS_FASTAPI.start(env, tmp_path)) as server:
        assert len(server.worker_pids) == 2
        exercise_exactly_once(server)
