"""DynamoDBPersistenceLayer's aiobotocore path (the ``dynamodb-async`` extra) against DynamoDB
Local: the client it builds from the boto3 client, its calls in flight, its store calls per
request, and every fault mapped to the same typed errors as the blocking path.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, EndpointConnectionError

from idem_middleware import IdempotencyConfig, IdempotencyMiddleware
from idem_middleware.exceptions import (
    IdempotencyItemAlreadyExistsError,
    IdempotencyItemNotFoundError,
    IdempotencyLeaseLostError,
    IdempotencyPersistenceLayerError,
    StoreNotFoundError,
    StoreRequestRejectedError,
    StoreUnreachableError,
)
from idem_middleware.persistence import dynamodb as dynamodb_module
from idem_middleware.persistence.dynamodb import DynamoDBPersistenceLayer
from idem_middleware.persistence.record import STATUS_COMPLETED, STATUS_INPROGRESS, DataRecord
from idem_middleware.responses import StoredResponse
from tests.test_dynamodb_asgi import Client, created

pytest.importorskip("aiobotocore", reason="the dynamodb-async extra")
pytestmark = [pytest.mark.dynamodb, pytest.mark.anyio]

HASH = "a" * 64
NO_RETRIES = Config(retries={"total_max_attempts": 1}, connect_timeout=2, read_timeout=10)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def layer(dynamodb_table: str, dynamodb_client: Any) -> AsyncIterator[Any]:
    made = DynamoDBPersistenceLayer(dynamodb_table, boto3_client=dynamodb_client)
    made.configure(IdempotencyConfig())
    yield made
    await made.aclose()


def claim(layer: DynamoDBPersistenceLayer, key: str) -> DataRecord:
    now = int(time.time())
    return DataRecord(
        key,
        STATUS_INPROGRESS,
        now + 3600,
        (now + 60) * 1000,
        payload_hash=HASH,
        lease_id=uuid.uuid4().hex,
    )


def completed(lease: DataRecord, response: StoredResponse) -> DataRecord:
    return DataRecord(
        lease.idempotency_key,
        STATUS_COMPLETED,
        lease.expiry_timestamp,
        lease.in_progress_expiry_timestamp,
        response.encode(),
        lease.payload_hash,
        lease_id=lease.lease_id,
    )


async def test_installed_aiobotocore_puts_the_store_calls_on_the_event_loop(
    layer: DynamoDBPersistenceLayer,
) -> None:
    assert layer.native_async
    key = f"idempotency#k-{uuid.uuid4().hex}"
    lease = claim(layer, key)
    await layer._aput_record(lease)
    with pytest.raises(IdempotencyItemAlreadyExistsError) as info:
        await layer._aput_record(claim(layer, key))
    assert info.value.old_data_record is not None
    assert info.value.old_data_record.lease_id == lease.lease_id

    response = StoredResponse(201, (("Content-Type", "application/json"),), b'{"id":1}')
    await layer._aupdate_record(completed(lease, response))
    # The blocking client reads what the asyncio client wrote: same table, same database.
    stored = layer._get_record(key)
    assert stored.status == STATUS_COMPLETED
    assert StoredResponse.decode(stored.response_data or "") == response
    assert (await layer._aget_record(key)).response_data == stored.response_data


async def test_the_asyncio_client_signs_with_the_boto3_clients_credentials(
    dynamodb_endpoint: str, dynamodb_table: str, dynamodb_client: Any
) -> None:
    """DynamoDB Local keeps one database per access key: a table created under the fixture's
    key exists for an asyncio client only if it signs with that same key.
    """
    other_key = boto3.client(
        "dynamodb",
        endpoint_url=dynamodb_endpoint,
        region_name="us-east-1",
        aws_access_key_id="someoneElse",
        aws_secret_access_key="secret",
        config=NO_RETRIES,
    )
    for client, found in ((dynamodb_client, True), (other_key, False)):
        layer = DynamoDBPersistenceLayer(dynamodb_table, boto3_client=client)
        try:
            if found:
                with pytest.raises(IdempotencyItemNotFoundError):
                    await layer._aget_record("absent")
            else:
                with pytest.raises(StoreNotFoundError, match=dynamodb_table):
                    await layer._aget_record("absent")
        finally:
            await layer.aclose()


async def test_fenced_writes_with_a_lost_lease_are_lease_lost(
    layer: DynamoDBPersistenceLayer,
) -> None:
    key = f"idempotency#k-{uuid.uuid4().hex}"
    lease = claim(layer, key)
    await layer._aput_record(lease)
    stale = claim(layer, key)  # another lease id: not the one holding the record
    response = StoredResponse(200, (), b"ok")
    with pytest.raises(IdempotencyLeaseLostError):
        await layer._aupdate_record(completed(stale, response))
    with pytest.raises(IdempotencyLeaseLostError):
        await layer._arenew_record(stale, stale)
    with pytest.raises(IdempotencyLeaseLostError):
        await layer._adelete_record(stale)
    await layer._arenew_record(lease, lease)
    await layer._adelete_record(lease)
    with pytest.raises(IdempotencyItemNotFoundError):
        await layer._aget_record(key)


async def test_body_is_dropped_when_dynamodb_rejects_an_item_the_estimate_let_through(
    layer: DynamoDBPersistenceLayer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dynamodb_module, "MAX_ITEM_BYTES", 10 * 1024 * 1024)
    key = f"idempotency#k-{uuid.uuid4().hex}"
    lease = claim(layer, key)
    await layer._aput_record(lease)
    response = StoredResponse(200, (("Content-Type", "image/png"),), os.urandom(500 * 1024))
    record = completed(lease, response)

    await layer._aupdate_record(record)

    assert record.response_data == response.without_body().encode()
    assert layer._get_record(key).response_data == record.response_data


async def test_a_record_too_large_even_without_its_body_is_a_store_error(
    layer: DynamoDBPersistenceLayer,
) -> None:
    key = f"idempotency#k-{uuid.uuid4().hex}"
    lease = claim(layer, key)
    await layer._aput_record(lease)
    huge = os.urandom(450 * 1024).hex()  # ~900 KB of headers, over the item limit compressed
    response = StoredResponse(200, (("X-Huge", huge),), b"ok")

    with pytest.raises(StoreRequestRejectedError, match=layer.table_name) as info:
        await layer._aupdate_record(completed(lease, response))

    assert isinstance(info.value.__cause__, ClientError)
    assert layer._get_record(key).status == STATUS_INPROGRESS


async def test_a_missing_table_is_store_not_found(dynamodb_client: Any) -> None:
    layer = DynamoDBPersistenceLayer(
        f"missing-{uuid.uuid4().hex[:8]}", boto3_client=dynamodb_client
    )
    lease = claim(layer, "idempotency#k")
    calls: list[Callable[[], Any]] = [
        lambda: layer._aput_record(lease),
        lambda: layer._aget_record("idempotency#k"),
        lambda: layer._aupdate_record(completed(lease, StoredResponse(200, (), b""))),
        lambda: layer._arenew_record(lease, lease),
        lambda: layer._adelete_record(lease),
    ]
    try:
        for call in calls:
            with pytest.raises(StoreNotFoundError, match="create the table"):
                await call()
    finally:
        await layer.aclose()


async def test_an_unreachable_endpoint_is_store_unreachable(closed_port: int) -> None:
    client = boto3.client(
        "dynamodb",
        region_name="us-east-1",
        endpoint_url=f"http://127.0.0.1:{closed_port}",
        config=NO_RETRIES,
    )
    layer = DynamoDBPersistenceLayer("idempotency", boto3_client=client)
    lease = claim(layer, "idempotency#k")
    calls: list[Callable[[], Any]] = [
        lambda: layer._aput_record(lease),
        lambda: layer._aget_record("idempotency#k"),
        lambda: layer._aupdate_record(completed(lease, StoredResponse(200, (), b""))),
        lambda: layer._arenew_record(lease, lease),
        lambda: layer._adelete_record(lease),
    ]
    try:
        for call in calls:
            with pytest.raises(StoreUnreachableError, match="endpoint") as info:
                await call()
            assert isinstance(info.value.__cause__, EndpointConnectionError)
    finally:
        await layer.aclose()


async def test_concurrent_first_calls_share_one_client(layer: DynamoDBPersistenceLayer) -> None:
    assert layer._async is not None
    async with anyio.create_task_group() as tasks:
        for n in range(8):
            tasks.start_soon(layer._aput_record, claim(layer, f"idempotency#k-{n}"))
    assert len(layer._async._by_loop) == 1


LANES = {"put_item": "claim", "get_item": "claim", "update_item": "finish", "delete_item": "finish"}


class CountingCalls:
    """Wraps the running loop's aiobotocore client: its calls, and the most in flight at once
    per lane.
    """

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.in_flight: Counter[str] = Counter()
        self.most_in_flight: Counter[str] = Counter()

    @classmethod
    async def attach(cls, layer: DynamoDBPersistenceLayer) -> CountingCalls:
        assert layer._async is not None
        client = (await layer._async.client()).client
        counting = cls()
        for operation, lane in LANES.items():
            setattr(client, operation, counting.counted(lane, getattr(client, operation)))
        return counting

    def counted(self, lane: str, call: Callable[..., Any]) -> Callable[..., Any]:
        async def counted(**request: Any) -> Any:
            self.calls[call.__name__] += 1
            self.in_flight[lane] += 1
            self.most_in_flight[lane] = max(self.most_in_flight[lane], self.in_flight[lane])
            try:
                await asyncio.sleep(0.01)  # long enough for the other requests to pile up
                return await call(**request)
            finally:
                self.in_flight[lane] -= 1

        return counted


async def test_middleware_calls_the_store_on_the_loop_two_calls_per_lane_at_most(
    layer: DynamoDBPersistenceLayer,
) -> None:
    counting = await CountingCalls.attach(layer)
    middleware = IdempotencyMiddleware(created, persistence_layer=layer)
    clients = [Client(f"k-{n}") for n in range(12)]
    async with anyio.create_task_group() as tasks:
        for client in clients:
            tasks.start_soon(middleware, client.scope, client.receive, client.send)
    assert [client.status for client in clients] == [201] * 12
    assert counting.most_in_flight == Counter({"claim": 2, "finish": 2})


@pytest.mark.parametrize(
    ("use_local_cache", "replay_calls"), [(False, 1), (True, 0)], ids=["replay", "local-cache"]
)
async def test_store_calls_per_request_are_two_then_one_or_none(
    dynamodb_table: str, dynamodb_client: Any, use_local_cache: bool, replay_calls: int
) -> None:
    layer = DynamoDBPersistenceLayer(dynamodb_table, boto3_client=dynamodb_client)
    counting = await CountingCalls.attach(layer)
    config = IdempotencyConfig(use_local_cache=use_local_cache)
    middleware = IdempotencyMiddleware(created, persistence_layer=layer, config=config)
    try:
        first = Client("k-1")
        await middleware(first.scope, first.receive, first.send)
        assert (first.status, sum(counting.calls.values())) == (201, 2)
        assert counting.calls == Counter({"put_item": 1, "update_item": 1})
        counting.calls.clear()
        replay = Client("k-1")
        await middleware(replay.scope, replay.receive, replay.send)
        assert (replay.status, sum(counting.calls.values())) == (201, replay_calls)
    finally:
        await layer.aclose()


def test_async_client_false_keeps_the_calls_in_threads(dynamodb_client: Any) -> None:
    layer = DynamoDBPersistenceLayer(
        "idempotency", boto3_client=dynamodb_client, async_client=False
    )
    assert not layer.native_async
    assert layer.blocking_io


def test_async_client_true_without_aiobotocore_fails_at_construction(
    dynamodb_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dynamodb_module, "aiobotocore_installed", lambda: False)
    with pytest.raises(ValueError, match=r"async_client=True needs aiobotocore"):
        DynamoDBPersistenceLayer("idempotency", boto3_client=dynamodb_client, async_client=True)
    assert not DynamoDBPersistenceLayer("idempotency", boto3_client=dynamodb_client).native_async


async def test_a_record_unreadable_by_this_version_is_a_store_fault(
    layer: DynamoDBPersistenceLayer, dynamodb_client: Any
) -> None:
    key = f"idempotency#k-{uuid.uuid4().hex}"
    dynamodb_client.put_item(
        TableName=layer.table_name,
        Item={"id": {"S": key}, "status": {"S": "NEW-STATUS"}, "expiration": {"N": "1"}},
    )
    with pytest.raises(IdempotencyPersistenceLayerError, match="unreadable"):
        await layer._aget_record(key)


async def test_aclose_after_a_cancelled_client_build_closes_quietly(dynamodb_client: Any) -> None:
    layer = DynamoDBPersistenceLayer("t", boto3_client=dynamodb_client, async_client=True)
    assert layer._async is not None
    loop = asyncio.get_running_loop()
    cancelled: asyncio.Future[Any] = loop.create_future()
    cancelled.cancel()  # a request that started the build was cancelled with it
    layer._async._by_loop[loop] = cancelled
    await layer.aclose()
    assert loop not in layer._async._by_loop
