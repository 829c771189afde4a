"""DynamoDBPersistenceLayer under the ASGI middleware, against DynamoDB Local: how many of its
store calls run at once in worker threads.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import anyio
import pytest

from idem_middleware import IdempotencyMiddleware
from idem_middleware.persistence.dynamodb import DynamoDBPersistenceLayer
from idem_middleware.persistence.record import DataRecord

pytestmark = [pytest.mark.dynamodb, pytest.mark.anyio]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def created(scope: Any, receive: Any, send: Any) -> None:
    await receive()
    await send({"type": "http.response.start", "status": 201, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


class Client:
    def __init__(self, key: str) -> None:
        self.scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "path": "/orders",
            "raw_path": b"/orders",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"idempotency-key", key.encode())],
        }
        self.status = 0

    async def receive(self) -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]


class CountingLayer(DynamoDBPersistenceLayer):
    """Counts the claims in flight at once; each takes a while, so they overlap if allowed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lock = threading.Lock()
        self.in_flight = self.most_in_flight = 0

    def _put_record(self, data_record: DataRecord) -> None:
        with self.lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            time.sleep(0.02)
            super()._put_record(data_record)
        finally:
            with self.lock:
                self.in_flight -= 1


async def run_requests(middleware: IdempotencyMiddleware, count: int) -> list[int]:
    clients = [Client(f"k-{n}") for n in range(count)]
    async with anyio.create_task_group() as tasks:
        for client in clients:
            tasks.start_soon(middleware, client.scope, client.receive, client.send)
    return [client.status for client in clients]


async def test_claims_run_in_as_many_threads_as_the_layer_says(
    dynamodb_table: str, dynamodb_client: Any
) -> None:
    # botocore's calls are CPU-bound Python: more threads than this only queue at the GIL,
    # and the event loop behind them (BENCHMARKS.md, section 4).
    layer = CountingLayer(dynamodb_table, boto3_client=dynamodb_client, async_client=False)
    middleware = IdempotencyMiddleware(created, persistence_layer=layer)
    assert middleware.store_threads() == DynamoDBPersistenceLayer.max_store_threads == 2
    assert await run_requests(middleware, 12) == [201] * 12
    assert layer.most_in_flight == 2


async def test_max_store_threads_set_on_the_middleware_wins(
    dynamodb_table: str, dynamodb_client: Any
) -> None:
    layer = CountingLayer(dynamodb_table, boto3_client=dynamodb_client, async_client=False)
    middleware = IdempotencyMiddleware(created, persistence_layer=layer)
    middleware.max_store_threads = 4
    assert await run_requests(middleware, 12) == [201] * 12
    assert layer.most_in_flight == 4


async def test_max_store_threads_given_to_the_layer_bounds_its_calls(
    dynamodb_table: str, dynamodb_client: Any
) -> None:
    layer = CountingLayer(
        dynamodb_table, boto3_client=dynamodb_client, async_client=False, max_store_threads=3
    )
    middleware = IdempotencyMiddleware(created, persistence_layer=layer)
    assert await run_requests(middleware, 12) == [201] * 12
    assert layer.most_in_flight == 3


@pytest.mark.parametrize(
    ("value", "error"), [(0, ValueError), (-1, ValueError), (2.5, TypeError), (True, TypeError)]
)
def test_a_bad_max_store_threads_is_refused_naming_the_field(
    value: Any, error: type[Exception], dynamodb_client: Any
) -> None:
    with pytest.raises(error, match="max_store_threads"):
        DynamoDBPersistenceLayer("t", boto3_client=dynamodb_client, max_store_threads=value)
