"""Redis on the event loop: the ASGI adapter awaits the layer's asyncio path (no worker thread
per store call), the engine's steps run unchanged over it, concurrent calls share pipelines,
and Redis Cluster clients work. Against a real redis-server and a real 3-node Redis Cluster.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest
import redis
import redis.asyncio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from idem_middleware import IdempotencyConfig, IdempotencyMiddleware
from idem_middleware.engine import (
    Conflict,
    IdempotencyEngine,
    PendingClaim,
    Proceed,
    Respond,
)
from idem_middleware.exceptions import IdempotencyPersistenceLayerError
from idem_middleware.persistence import RedisPersistenceLayer
from idem_middleware.persistence.record import STATUS_COMPLETED, DataRecord
from idem_middleware.persistence.steps import arun
from idem_middleware.request import Headers, IdempotencyRequest
from idem_middleware.responses import StoredResponse
from tests.support.backends import FakeClock

pytestmark = pytest.mark.redis

CREATED = StoredResponse(201, (("content-type", "application/json"),), b'{"id":1}')


def namespace() -> str:
    return f"test-{uuid.uuid4().hex}:"


@pytest.fixture(params=["redis", "redis-cluster"])
def make_layer(request: pytest.FixtureRequest) -> Iterator[Callable[..., RedisPersistenceLayer]]:
    """Layers on the single server or on the cluster, built from a URL (so with both clients)."""
    url = request.getfixturevalue("redis_url" if request.param == "redis" else "redis_cluster_url")
    layers: list[RedisPersistenceLayer] = []

    def make(**options: Any) -> RedisPersistenceLayer:
        layer = RedisPersistenceLayer(
            url, cluster=request.param == "redis-cluster", key_namespace=namespace(), **options
        )
        layers.append(layer)
        return layer

    yield make
    for layer in layers:
        layer.client.close()


def request_for(key: str, body: bytes = b'{"qty":1}') -> IdempotencyRequest:
    return IdempotencyRequest(
        method="POST",
        path="/orders",
        query_string="",
        headers=Headers.from_asgi([(b"idempotency-key", key.encode())]),
        body=body,
        raw={},
    )


def engine_for(layer: RedisPersistenceLayer, **options: Any) -> IdempotencyEngine:
    config = IdempotencyConfig(scope=lambda request: "tenant", **options)
    return IdempotencyEngine(layer, config)


def pending(engine: IdempotencyEngine, key: str, body: bytes = b'{"qty":1}') -> PendingClaim:
    step = engine.prepare(request_for(key, body))
    assert isinstance(step, PendingClaim)
    return step


def forbid_blocking_calls(monkeypatch: pytest.MonkeyPatch, layer: RedisPersistenceLayer) -> None:
    """Fail the test on any call of the blocking client's record primitives."""
    for name in ("_put_record", "_get_record", "_update_record", "_renew_record"):
        monkeypatch.setattr(layer, name, _forbidden(name))
    monkeypatch.setattr(layer, "_delete_record", _forbidden("_delete_record"))


def _forbidden(name: str) -> Callable[..., Any]:
    def call(*args: Any) -> Any:
        raise AssertionError(f"{name} (blocking) was called on the asyncio path")

    return call


# The engine's steps, awaited on the loop ------------------------------------------------------


def test_the_engines_steps_run_over_the_asyncio_client(
    make_layer: Callable[..., RedisPersistenceLayer], monkeypatch: pytest.MonkeyPatch
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
        assert ("Idempotent-Replayed", "true") in replay.response.headers
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
    assert stored.status == STATUS_COMPLETED  # what the asyncio client wrote, read back blocking


def test_a_stale_owner_is_fenced_out_on_the_asyncio_path(
    make_layer: Callable[..., RedisPersistenceLayer],
) -> None:
    layer = make_layer()
    clock = FakeClock()
    layer.clock = clock
    engine = engine_for(layer, in_progress_expires_after_seconds=10)
    engine.monotonic = clock

    async def scenario() -> None:
        crashed = await engine.claim.native(pending(engine, "order-1"))
        assert isinstance(crashed, Proceed)
        clock.advance(11)  # its lease ran out: a retry takes the key over
        retry = await engine.claim.native(pending(engine, "order-1"))
        assert isinstance(retry, Proceed)
        assert await engine.renew.native(crashed) is False
        await engine.complete.native(crashed, StoredResponse(200, (), b"late"))  # fenced out
        await engine.complete.native(retry, CREATED)
        replay = await engine.claim.native(pending(engine, "order-1"))
        assert isinstance(replay, Respond)
        assert replay.response.body == CREATED.body
        await layer.aclose()

    asyncio.run(scenario())


def test_a_failed_completion_is_retried_with_an_async_sleep(
    make_layer: Callable[..., RedisPersistenceLayer], monkeypatch: pytest.MonkeyPatch
) -> None:
    layer = make_layer()
    engine = engine_for(layer)
    slept: list[float] = []

    async def async_sleep(seconds: float) -> None:
        slept.append(seconds)

    def blocking_sleep(seconds: float) -> None:
        raise AssertionError("the asyncio path must not block the loop in time.sleep")

    layer.async_sleep = async_sleep
    layer.sleep = blocking_sleep
    complete = layer._aupdate_record
    failures = [IdempotencyPersistenceLayerError("injected: request lost")]

    async def flaky_complete(record: DataRecord) -> None:
        if failures:
            raise failures.pop()
        await complete(record)

    monkeypatch.setattr(layer, "_aupdate_record", flaky_complete)

    async def scenario() -> Any:
        attempt = await engine.claim.native(pending(engine, "order-1"))
        assert isinstance(attempt, Proceed)
        await engine.complete.native(attempt, CREATED)
        decision = await engine.claim.native(pending(engine, "order-1"))
        await layer.aclose()
        return decision

    replay = asyncio.run(scenario())
    assert len(slept) == 1
    assert isinstance(replay, Respond)
    assert replay.response.body == CREATED.body


def test_the_conflict_wait_polls_on_the_loop(
    make_layer: Callable[..., RedisPersistenceLayer], monkeypatch: pytest.MonkeyPatch
) -> None:
    from idem_middleware.lease import wait_for_answer_async

    layer = make_layer()
    engine = engine_for(layer, conflict_wait_seconds=5)
    forbid_blocking_calls(monkeypatch, layer)
    monkeypatch.setattr(anyio.to_thread, "run_sync", _no_thread)

    async def scenario() -> Any:
        first = await engine.claim.native(pending(engine, "order-1"))
        assert isinstance(first, Proceed)
        duplicate = await engine.claim.native(pending(engine, "order-1"))
        assert isinstance(duplicate, Conflict)

        async def finish() -> None:
            await asyncio.sleep(0.1)
            await engine.complete.native(first, CREATED)

        task = asyncio.create_task(finish())
        decision = await wait_for_answer_async(engine, duplicate)
        await task
        await layer.aclose()
        return decision

    decision = asyncio.run(scenario())
    assert isinstance(decision, Respond)
    assert decision.response.body == CREATED.body


async def _no_thread(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("a store call went to a worker thread")


# Batching: one pipeline per turn of the loop, each call with its own answer --------------------


def test_concurrent_claims_share_pipelines_and_keep_their_own_answers(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    layer = RedisPersistenceLayer(redis_url, key_namespace=namespace())
    engine = engine_for(layer)
    pipelines: list[int] = []

    async def scenario() -> list[Any]:
        client = layer.async_redis().client
        make_pipeline = client.pipeline

        def counted(*args: Any, **kwargs: Any) -> Any:
            pipeline = make_pipeline(*args, **kwargs)
            execute = pipeline.execute

            async def execute_counted(*args: Any, **kwargs: Any) -> Any:
                pipelines.append(len(pipeline.command_stack))
                return await execute(*args, **kwargs)

            pipeline.execute = execute_counted  # type: ignore[method-assign]
            return pipeline

        monkeypatch.setattr(client, "pipeline", counted)
        # A key holding a string, not a hash: its claim fails, the others must not.
        layer.client.set(layer.redis_key(pending(engine, "broken").idempotency_key), "x")
        keys = ["same"] * 20 + [f"distinct-{n}" for n in range(20)] + ["broken"]
        decisions = await asyncio.gather(
            *(engine.claim.native(pending(engine, key)) for key in keys)
        )
        await layer.aclose()
        return decisions

    decisions = asyncio.run(scenario())
    layer.client.close()
    same, distinct, broken = decisions[:20], decisions[20:40], decisions[40]
    assert sum(isinstance(d, Proceed) for d in same) == 1
    assert [d.response.status for d in same if isinstance(d, Respond)] == [409] * 19
    assert all(isinstance(d, Proceed) for d in distinct)
    assert isinstance(broken, Respond)
    assert broken.response.status == 503
    assert sum(pipelines) == len(decisions), pipelines
    assert len(pipelines) < len(decisions), "the claims of one turn must share a pipeline"


# The ASGI adapter --------------------------------------------------------------------------------


def asgi_app(layer: RedisPersistenceLayer, **options: Any) -> tuple[Starlette, list[int]]:
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
    return IdempotencyMiddleware(app, persistence_layer=layer, config=config), calls  # type: ignore[return-value]


def test_asgi_store_calls_run_on_the_event_loop_not_in_worker_threads(
    make_layer: Callable[..., RedisPersistenceLayer], monkeypatch: pytest.MonkeyPatch
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
    assert "idempotent-replayed" not in first.headers
    assert replay.status_code == 201
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.content == first.content
    assert (failed.status_code, failed_again.status_code) == (500, 500)
    assert slow.status_code == 201
    assert waiting.status_code == 201
    assert waiting.headers["idempotent-replayed"] == "true"
    assert len(calls) == 4  # order-1 once, order-2 twice (released), order-3 once


async def _after(delay: float, call: Any) -> Any:
    await asyncio.sleep(delay)
    return await call


def test_a_layer_given_only_a_blocking_client_keeps_the_thread_path(redis_url: str) -> None:
    layer = RedisPersistenceLayer(client=redis.Redis.from_url(redis_url), key_namespace=namespace())
    assert not layer.native_async
    app, _calls = asgi_app(layer)
    threads: list[str] = []
    run_sync = anyio.to_thread.run_sync

    async def counting(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        threads.append(getattr(function, "__name__", "?"))
        return await run_sync(function, *args, **kwargs)

    async def scenario() -> httpx.Response:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(anyio.to_thread, "run_sync", counting)
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://t"
            ) as client:
                return await client.post(
                    "/orders", json={"qty": 1}, headers={"Idempotency-Key": "order-1"}
                )

    response = asyncio.run(scenario())
    layer.client.close()
    assert response.status_code == 201
    assert threads == ["claim", "complete"]


# Clients ---------------------------------------------------------------------------------------


async def claim(layer: RedisPersistenceLayer, key: str) -> DataRecord:
    """The layer's claim, through its asyncio path."""
    return await arun(layer, layer.save_inprogress_steps(layer.build_idempotency_key(key), "h"))


def test_one_asyncio_client_per_event_loop(redis_url: str) -> None:
    layer = RedisPersistenceLayer(redis_url, key_namespace=namespace())

    async def client_twice() -> tuple[Any, Any]:
        first, second = layer.async_redis().client, layer.async_redis().client
        await layer.aclose()
        return first, second

    first_loop = asyncio.run(client_twice())
    second_loop = asyncio.run(client_twice())
    layer.client.close()
    assert first_loop[0] is first_loop[1]
    assert second_loop[0] is not first_loop[0]
    assert isinstance(first_loop[0], redis.asyncio.Redis)


def test_given_clients_are_used_as_they_are(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    async_client = redis.asyncio.Redis.from_url(redis_url)
    layer = RedisPersistenceLayer(client=client, async_client=async_client)
    layer.configure(IdempotencyConfig(), key_prefix=f"test-{uuid.uuid4().hex}")
    assert layer.native_async

    async def claim_one() -> DataRecord:
        assert layer.async_redis().client is async_client
        lease = await claim(layer, "order-1")
        await async_client.aclose()
        return lease

    lease = asyncio.run(claim_one())
    assert layer.get_record(lease.idempotency_key).lease_id == lease.lease_id
    client.close()


def test_cluster_clients_are_accepted_and_records_spread_over_nodes(
    redis_cluster_url: str,
) -> None:
    client = redis.RedisCluster.from_url(redis_cluster_url)
    async_client = redis.asyncio.RedisCluster.from_url(redis_cluster_url)
    layer = RedisPersistenceLayer(client=client, async_client=async_client)
    layer.configure(IdempotencyConfig(), key_prefix=f"test-{uuid.uuid4().hex}")

    async def claims() -> list[DataRecord]:
        leases = [await claim(layer, f"order-{n}") for n in range(30)]
        await async_client.aclose()
        return leases

    leases = asyncio.run(claims())
    for lease in leases[:15]:
        layer.save_success(lease, CREATED)
    nodes = {
        client.get_node_from_key(layer.redis_key(lease.idempotency_key)).name for lease in leases
    }
    assert len(nodes) == 3, "thirty keys land on every node of the cluster"
    assert [layer.get_record(lease.idempotency_key).status for lease in leases[:15]] == [
        STATUS_COMPLETED
    ] * 15
    client.close()


def test_the_first_concurrent_calls_of_a_fresh_cluster_client_all_succeed(
    redis_cluster_url: str,
) -> None:
    """A fresh asyncio cluster client whose scripts the nodes do not know: fifty requests at
    once each found a script missing and loaded it, and redis-py's cluster client lost
    connections under that race (``'NoneType' object has no attribute 'writelines'``).
    """
    blocking = redis.RedisCluster.from_url(redis_cluster_url)
    blocking.script_flush()
    blocking.close()
    layer = RedisPersistenceLayer(redis_cluster_url, cluster=True, key_namespace=namespace())
    engine = engine_for(layer)

    async def scenario() -> list[Any]:
        keys = ["same"] * 25 + [f"distinct-{n}" for n in range(25)]
        decisions = await asyncio.gather(
            *(engine.claim.native(pending(engine, key)) for key in keys)
        )
        await layer.aclose()
        return decisions

    decisions = asyncio.run(scenario())
    layer.client.close()
    statuses = [d.response.status if isinstance(d, Respond) else "proceed" for d in decisions]
    assert statuses[:25].count("proceed") == 1, statuses
    assert statuses[:25].count(409) == 24, statuses
    assert statuses[25:] == ["proceed"] * 25, statuses


def test_cluster_is_for_urls_only(redis_url: str) -> None:
    with pytest.raises(ValueError, match="cluster"):
        RedisPersistenceLayer(client=redis.Redis.from_url(redis_url), cluster=True)


# End to end: the FastAPI example on uvicorn with two worker processes, over Redis ---------------


@pytest.mark.e2e
def test_concurrent_retries_run_the_handler_once_on_two_uvicorn_workers(
    redis_url: str, tmp_path: Path
) -> None:
    from tests.test_e2e_servers import UVICORN_2_WORKERS_FASTAPI, app_env, exercise_exactly_once
    from tooling.servers import running

    # A database of its own: the example app's keys carry no per-test namespace.
    url = redis_url.rsplit("/", 1)[0] + "/7"
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    env = app_env(tmp_path, IDEM_STORE_URL=url)
    with running(UVICORN_2_WORKERS_FASTAPI.start(env, tmp_path)) as server:
        assert len(server.worker_pids) == 2
        exercise_exactly_once(server)


def test_a_completion_on_the_loop_is_not_cut_short_by_a_cancelled_request(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker thread's completion always finishes; awaited on the loop it must too, or a
    request cancelled at that moment (a timeout around the app, a server shutting down) leaves
    a handler that ran with its record in progress, and the retry runs it again.
    """
    layer = RedisPersistenceLayer(redis_url, key_namespace=namespace())
    app, calls = asgi_app(layer)
    complete = layer._aupdate_record

    completing = asyncio.Event()

    async def slow_complete(record: DataRecord) -> None:
        completing.set()
        await asyncio.sleep(0.3)  # the completion is in flight when the request is cancelled
        await complete(record)

    monkeypatch.setattr(layer, "_aupdate_record", slow_complete)

    async def scenario() -> httpx.Response:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as client:
            key = {"Idempotency-Key": "order-1"}
            # Cut short while the completion is in flight (once it began, not after a fixed
            # time: a loaded machine may not have got there yet).
            async with anyio.create_task_group() as request:

                async def cut_short() -> None:
                    await completing.wait()
                    request.cancel_scope.cancel()

                request.start_soon(cut_short)
                await client.post("/orders", json={"qty": 1}, headers=key)
            monkeypatch.setattr(layer, "_aupdate_record", complete)
            retry = await client.post("/orders", json={"qty": 1}, headers=key)
        await layer.aclose()
        return retry

    retry = asyncio.run(scenario())
    layer.client.close()
    assert len(calls) == 1
    assert retry.status_code == 201
    assert retry.headers["idempotent-replayed"] == "true"
