"""The persistence backends the contract suite runs over, one entry each.

A backend is a name, the pytest marks it needs and a factory that builds a fresh, not yet
configured layer from the test's ``request``. Factories pull what they need (a DynamoDB table, a
temporary directory, a Redis URL) through ``request.getfixturevalue``, so a backend's services
start only when one of its tests runs, and each test gets an empty store. Adding a backend::

    Backend("sqlite", _sqlite),  # def _sqlite(request): return SQLitePersistenceLayer(...)
"""

from __future__ import annotations

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


def _sqlite(request: pytest.FixtureRequest) -> BasePersistenceLayer:
    from idem_middleware.persistence.sqlite import SQLitePersistenceLayer

    return SQLitePersistenceLayer(request.getfixturevalue("tmp_path") / "idempotency.sqlite3")


def _redis(request: pytest.FixtureRequest) -> BasePersistenceLayer:
    from idem_middleware.persistence.redis import RedisPersistenceLayer

    # One server for the session; a namespace per test keeps each test's store empty.
    namespace = f"test-{uuid.uuid4().hex}:"
    return RedisPersistenceLayer(request.getfixturevalue("redis_url"), key_namespace=namespace)


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


BACKENDS: tuple[Backend, ...] = (
    Backend("memory", _memory),
    Backend("dynamodb", _dynamodb, marks=(pytest.mark.dynamodb,)),
    Backend("sqlite", _sqlite),
    Backend("redis", _redis, marks=(pytest.mark.redis,)),
    Backend("postgres", _postgres, marks=(pytest.mark.postgres,)),
)


def backend_params() -> list[Any]:
    """``BACKENDS`` as pytest params, for ``@pytest.fixture(params=...)``."""
    return [backend.param() for backend in BACKENDS]
