"""The persistence backends the contract suite runs over, one entry each.

A backend is a name, the pytest marks it needs and a factory that builds a fresh, not yet
configured layer from the test's ``request``. Factories pull what they need (a DynamoDB table, a
temporary directory, a Redis URL) through ``request.getfixturevalue``, so a backend's services
start only when one of its tests runs, and each test gets an empty store. Adding a backend::

    Backend("sqlite", _sqlite),  # def _sqlite(request): return SQLitePersistenceLayer(...)
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from idem_middleware.persistence.base import BasePersistenceLayer

LayerFactory = Callable[[pytest.FixtureRequest], BasePersistenceLayer]


@dataclass(frozen=True)
class Backend:
    name: str
    make: LayerFactory
    marks: tuple[Any, ...] = ()

    def param(self) -> Any:
        """This backend as a ``pytest.param`` whose id is its name."""
        return pytest.param(self, id=self.name, marks=self.marks)


class FakeClock:
    """A settable clock for ``layer.clock``: tests move time instead of sleeping.

    Starts at a whole second near the real time, so records written under it look like real
    ones to the store (DynamoDB's TTL, for one, compares ``expiration`` with the real time).
    """

    def __init__(self, start: float | None = None) -> None:
        self.now = float(int(time.time())) if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


def _memory(request: pytest.FixtureRequest) -> BasePersistenceLayer:
    from idem_middleware.persistence.memory import InMemoryPersistenceLayer

    return InMemoryPersistenceLayer()


def _dynamodb(request: pytest.FixtureRequest) -> BasePersistenceLayer:
    from idem_middleware.persistence.dynamodb import DynamoDBPersistenceLayer

    table = request.getfixturevalue("dynamodb_table")
    client = request.getfixturevalue("dynamodb_client")
    return DynamoDBPersistenceLayer(table, boto3_client=client)


def _dynamodb_async(request: pytest.FixtureRequest) -> BasePersistenceLayer:
    from idem_middleware.persistence.dynamodb import DynamoDBPersistenceLayer
    from tests.support.loop_driven import LoopDriven

    class AsyncDrivenDynamoDBLayer(LoopDriven, DynamoDBPersistenceLayer):
        """Every record primitive runs as its aiobotocore twin on ``loop_thread``."""

        def close(self) -> None:
            self.stop_loop()

    table = request.getfixturevalue("dynamodb_table")
    client = request.getfixturevalue("dynamodb_client")
    layer = AsyncDrivenDynamoDBLayer(table, boto3_client=client, async_client=True)
    request.addfinalizer(layer.close)
    return layer


def _aiobotocore_missing() -> bool:
    from idem_middleware.persistence.dynamodb_async import aiobotocore_installed

    return not aiobotocore_installed()


def _sqlite(request: pytest.FixtureRequest) -> BasePersistenceLayer:
    from idem_middleware.persistence.sqlite import SQLitePersistenceLayer

    return SQLitePersistenceLayer(request.getfixturevalue("tmp_path") / "idempotency.sqlite3")


def _redis(request: pytest.FixtureRequest) -> BasePersistenceLayer:
    from idem_middleware.persistence.redis import RedisPersistenceLayer

    # One server for the session; a namespace per test keeps each test's store empty.
    namespace = f"test-{uuid.uuid4().hex}:"
    return RedisPersistenceLayer(request.getfixturevalue("redis_url"), key_namespace=namespace)


def _redis_async(request: pytest.FixtureRequest) -> BasePersistenceLayer:
    from tests.support.async_redis import AsyncDrivenRedisLayer

    # The same server, every store call made by the asyncio client (what ASGI apps run).
    layer = AsyncDrivenRedisLayer(
        request.getfixturevalue("redis_url"), key_namespace=f"test-{uuid.uuid4().hex}:"
    )
    request.addfinalizer(layer.close)
    return layer


def _redis_cluster(request: pytest.FixtureRequest) -> BasePersistenceLayer:
    from idem_middleware.persistence.redis import RedisPersistenceLayer

    # A 3-node cluster for the session: the keys of one test spread over its slots and nodes.
    layer = RedisPersistenceLayer(
        request.getfixturevalue("redis_cluster_url"),
        cluster=True,
        key_namespace=f"test-{uuid.uuid4().hex}:",
    )
    request.addfinalizer(layer.client.close)
    return layer


def _redis_cluster_async(request: pytest.FixtureRequest) -> BasePersistenceLayer:
    from tests.support.async_redis import AsyncDrivenRedisLayer

    layer = AsyncDrivenRedisLayer(
        request.getfixturevalue("redis_cluster_url"),
        cluster=True,
        key_namespace=f"test-{uuid.uuid4().hex}:",
    )
    request.addfinalizer(layer.close)
    return layer


def _postgres(request: pytest.FixtureRequest) -> BasePersistenceLayer:
    from idem_middleware.persistence.postgres import PostgresPersistenceLayer

    # One database for the session; a table per test keeps each test's store empty.
    layer = PostgresPersistenceLayer(
        request.getfixturevalue("postgres_conninfo"),
        table_name=f"idem_{uuid.uuid4().hex[:12]}",
        max_pool_size=16,
    )
    layer.create_table()
    request.addfinalizer(layer.close)
    return layer


def _postgres_async(request: pytest.FixtureRequest) -> BasePersistenceLayer:
    from tests.support.async_postgres import AsyncDrivenPostgresLayer

    # The same database, every store call made on an asyncio connection (what ASGI apps run).
    layer = AsyncDrivenPostgresLayer(
        request.getfixturevalue("postgres_conninfo"),
        table_name=f"idem_{uuid.uuid4().hex[:12]}",
        max_pool_size=16,
    )
    layer.create_table()
    request.addfinalizer(layer.close)
    return layer


def is_postgres(layer: BasePersistenceLayer) -> bool:
    """Whether ``layer`` is a PostgresPersistenceLayer (psycopg is an optional extra)."""
    return any(cls.__name__ == "PostgresPersistenceLayer" for cls in type(layer).__mro__)


BACKENDS: tuple[Backend, ...] = (
    Backend("memory", _memory),
    Backend("dynamodb", _dynamodb, marks=(pytest.mark.dynamodb,)),
    Backend(
        "dynamodb-async",
        _dynamodb_async,
        marks=(
            pytest.mark.dynamodb,
            pytest.mark.skipif(
                _aiobotocore_missing(), reason="aiobotocore (the dynamodb-async extra)"
            ),
        ),
    ),
    Backend("sqlite", _sqlite),
    Backend("redis", _redis, marks=(pytest.mark.redis,)),
    Backend("redis-async", _redis_async, marks=(pytest.mark.redis,)),
    Backend("redis-cluster", _redis_cluster, marks=(pytest.mark.redis,)),
    Backend("redis-cluster-async", _redis_cluster_async, marks=(pytest.mark.redis,)),
    Backend("postgres", _postgres, marks=(pytest.mark.postgres,)),
    Backend("postgres-async", _postgres_async, marks=(pytest.mark.postgres,)),
)


def backend_params() -> list[Any]:
    """``BACKENDS`` as pytest params, for ``@pytest.fixture(params=...)``."""
    return [backend.param() for backend in BACKENDS]


# Records written straight into a store, as another version (or a corruption) left them ----------


def write_raw_record(
    layer: BasePersistenceLayer,
    key: str,
    *,
    status: str,
    expiration: int | str,
    in_progress_expiration: int | None = None,
    data: str | None = None,
    validation: str | None = None,
) -> None:
    """Store a record under ``key`` bypassing the layer, without a ``lease_id`` (as versions
    before lease ids wrote them). ``status`` need not be a known one and ``expiration`` may be
    text, to write corrupt records; the in-memory store keeps objects, so it takes only what a
    ``DataRecord`` can hold (any status, an int expiration).
    """
    from idem_middleware.persistence.dynamodb import DynamoDBPersistenceLayer
    from idem_middleware.persistence.memory import InMemoryPersistenceLayer
    from idem_middleware.persistence.record import STATUS_COMPLETED, DataRecord
    from idem_middleware.persistence.redis import RedisPersistenceLayer
    from idem_middleware.persistence.sqlite import SQLitePersistenceLayer

    if isinstance(layer, InMemoryPersistenceLayer):
        if not isinstance(expiration, int):
            raise TypeError("the in-memory store holds int expirations only")
        record = DataRecord(
            key, STATUS_COMPLETED, expiration, in_progress_expiration, data, validation
        )
        record.status = status  # as a corrupted or newer record would have it
        layer._records[key] = record
    elif isinstance(layer, SQLitePersistenceLayer):
        layer.check()  # creates the table, as the layer's first call would
        with contextlib.closing(sqlite3.connect(layer.path)) as connection, connection:
            connection.execute(
                f"INSERT OR REPLACE INTO {layer.table_name} "
                "(id, status, expiration, in_progress_expiration, data, validation) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (key, status, expiration, in_progress_expiration, data, validation),
            )
    elif isinstance(layer, RedisPersistenceLayer):
        fields: dict[str, str | int] = {"status": status, "expiration": expiration}
        if in_progress_expiration is not None:
            fields["in_progress_expiration"] = in_progress_expiration
        if data is not None:
            fields["data"] = data
        if validation is not None:
            fields["validation"] = validation
        redis_key = layer.redis_key(key)
        layer.client.hset(redis_key, mapping=fields)
        layer.client.expire(redis_key, 3600)
    elif isinstance(layer, DynamoDBPersistenceLayer):
        item: dict[str, Any] = dict(layer._key(key))
        item[layer.status_attr] = {"S": status}
        item[layer.expiry_attr] = (
            {"N": str(expiration)} if isinstance(expiration, int) else {"S": expiration}
        )
        if in_progress_expiration is not None:
            item[layer.in_progress_expiry_attr] = {"N": str(in_progress_expiration)}
        if data is not None:
            item[layer.data_attr] = {"S": data}
        if validation is not None:
            item[layer.validation_key_attr] = {"S": validation}
        layer.client.put_item(TableName=layer.table_name, Item=item)
    elif is_postgres(layer):
        if not isinstance(expiration, int):
            raise TypeError("PostgreSQL's expiration column is BIGINT: it holds numbers only")
        with layer._connection() as connection:
            connection.execute(
                f"INSERT INTO {layer.qualified_name} "
                "(id, status, expiration, in_progress_expiration, data, validation) "
                "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO UPDATE SET "
                "status = EXCLUDED.status, expiration = EXCLUDED.expiration, "
                "in_progress_expiration = EXCLUDED.in_progress_expiration, "
                "data = EXCLUDED.data, validation = EXCLUDED.validation, lease_id = NULL",
                (key, status, expiration, in_progress_expiration, data, validation),
            )
    else:
        raise TypeError(f"no raw writer for {type(layer).__name__}")
