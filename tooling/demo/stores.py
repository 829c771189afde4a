"""The idempotency store the demo's apps use, as the store URL they read (``IDEM_STORE_URL``).

DynamoDB's table is created and Redis is asked to answer before any server starts, so a store
that cannot be used is one line, not a server log.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

from idem_middleware.exceptions import IdempotencyPersistenceLayerError
from idem_middleware.persistence import from_url
from idem_middleware.persistence.url import redacted
from tooling.demo import DemoError

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
DEMO_TABLE = "idem-middleware-demo"
#: A region for DynamoDB Local when none is configured: it accepts any.
LOCAL_ENDPOINT_REGION = "us-east-1"
#: A payment request should not wait a minute on an unreachable store.
DYNAMODB_CLIENT = {"connect_timeout": "1", "read_timeout": "3", "max_attempts": "2"}


@dataclass(frozen=True)
class DemoStore:
    """A store for the demo: ``url(workdir, index)`` is the URL of deployment ``index``."""

    name: str  # memory, sqlite, dynamodb or redis
    description: str
    url: Callable[[Path, int], str]

    @property
    def shared_by_processes(self) -> bool:
        """The memory store lives in one process: a server using it must have one worker."""
        return self.name != "memory"


def memory() -> DemoStore:
    return DemoStore(
        "memory", "memory (one process: each server runs one worker)", lambda _, __: "memory://"
    )


def sqlite() -> DemoStore:
    return DemoStore(
        "sqlite",
        "SQLite, a file in a temporary directory, shared by workers",
        lambda work, index: f"sqlite:///{work}/idempotency-{index}.sqlite3",
    )


def redis(url: str | None) -> DemoStore:
    url = url or DEFAULT_REDIS_URL
    shown = redacted(url)
    try:
        from_url(url).check()
    except (ValueError, ImportError) as exc:
        raise DemoError(str(exc)) from None
    except IdempotencyPersistenceLayerError as exc:
        raise DemoError(f"cannot use Redis at {shown}: {_cause(exc)}") from None
    return DemoStore("redis", f"Redis at {shown}", lambda _, __: url)


def dynamodb(table: str, endpoint_url: str | None, region: str | None) -> DemoStore:
    region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region is None and endpoint_url:
        region = LOCAL_ENDPOINT_REGION
    query = {**({"region": region} if region else {}), **DYNAMODB_CLIENT}
    if endpoint_url:
        query["endpoint_url"] = endpoint_url
    url = f"dynamodb://{table}?{urlencode(query)}"
    from idem_middleware.persistence.dynamodb import DynamoDBPersistenceLayer

    where = f"at {endpoint_url}" if endpoint_url else f"in {region or 'the default region'}"
    try:
        layer = from_url(url)
        assert isinstance(layer, DynamoDBPersistenceLayer)
        created = layer.create_table()
    except (ValueError, ImportError) as exc:
        raise DemoError(str(exc)) from None
    except IdempotencyPersistenceLayerError as exc:
        raise DemoError(f"cannot use DynamoDB {where}: {_cause(exc)}") from None
    state = "created for the demo" if created else "existing"
    return DemoStore("dynamodb", f"DynamoDB table {table!r} ({state}, {where})", lambda _, __: url)


def _cause(exc: BaseException) -> str:
    text = str(exc.__cause__ or exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def dynamodb_local(stack: contextlib.ExitStack) -> DemoStore:
    """DynamoDB Local (or moto's server where Java is missing), started for the demo."""
    from tooling import dynamodb_local as service

    # DynamoDB Local accepts any credentials; the demo never needs real ones.
    for name, value in (("AWS_ACCESS_KEY_ID", "demo"), ("AWS_SECRET_ACCESS_KEY", "demo")):
        os.environ.setdefault(name, value)
    try:
        server = service.start()
    except (ImportError, RuntimeError, OSError) as exc:
        raise DemoError(f"cannot start DynamoDB Local: {exc}") from None
    stack.callback(server.stop)
    return dynamodb(DEMO_TABLE, server.endpoint_url, LOCAL_ENDPOINT_REGION)


def redis_local(stack: contextlib.ExitStack) -> DemoStore:
    """A private redis-server, started for the demo."""
    from tooling import redis_server as service

    try:
        server = service.start()
    except (ImportError, RuntimeError, OSError) as exc:
        raise DemoError(f"cannot start redis-server: {exc}") from None
    stack.callback(server.stop)
    if not server.private:
        raise DemoError("redis-server is not installed (Debian: apt-get install redis-server)")
    return redis(server.url)
