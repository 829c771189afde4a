"""Persistence layers. Backends with optional dependencies are imported on first use."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from idem_middleware.persistence.base import BasePersistenceLayer
from idem_middleware.persistence.memory import InMemoryPersistenceLayer
from idem_middleware.persistence.record import DataRecord
from idem_middleware.persistence.url import from_url

if TYPE_CHECKING:
    from idem_middleware.persistence.dynamodb import DynamoDBPersistenceLayer
    from idem_middleware.persistence.postgres import PostgresPersistenceLayer
    from idem_middleware.persistence.redis import RedisPersistenceLayer
    from idem_middleware.persistence.sqlite import SQLitePersistenceLayer

__all__ = [
    "BasePersistenceLayer",
    "DataRecord",
    "DynamoDBPersistenceLayer",
    "InMemoryPersistenceLayer",
    "PostgresPersistenceLayer",
    "RedisPersistenceLayer",
    "SQLitePersistenceLayer",
    "from_url",
]

_LAZY = {
    "DynamoDBPersistenceLayer": "idem_middleware.persistence.dynamodb",
    "PostgresPersistenceLayer": "idem_middleware.persistence.postgres",
    "RedisPersistenceLayer": "idem_middleware.persistence.redis",
    "SQLitePersistenceLayer": "idem_middleware.persistence.sqlite",
}


def __getattr__(name: str) -> Any:
    # boto3, redis and psycopg are extras: importing this package must not need them.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
