"""Session services and shared fixtures."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from idem_middleware import IdempotencyConfig
from idem_middleware.persistence import InMemoryPersistenceLayer
from idem_middleware.persistence.base import BasePersistenceLayer
from tests.support.backends import backend_params
from tests.support.harness import Harness
from tests.support.ports import refusing_port
from tooling import dynamodb_local, postgres_server, redis_server

# Credentials for DynamoDB Local / moto; never real ones.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

#: Which implementation each session service ran on, for the summary at the end of the run.
SERVICES_USED: dict[str, str] = {}


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for service, description in SERVICES_USED.items():
        terminalreporter.write_line(f"{service} tests ran against {description}")


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections for the whole test, and that no other process
    (another test session's server) can take meanwhile: an unreachable store's address.
    """
    with refusing_port() as port:
        yield port


@pytest.fixture(scope="session")
def dynamodb_server() -> Iterator[dynamodb_local.DynamoDBServer]:
    server = dynamodb_local.start()
    SERVICES_USED["DynamoDB"] = f"{server.implementation} at {server.endpoint_url}"
    yield server
    server.stop()


@pytest.fixture(scope="session")
def dynamodb_endpoint(dynamodb_server: dynamodb_local.DynamoDBServer) -> str:
    return dynamodb_server.endpoint_url


@pytest.fixture(scope="session")
def dynamodb_client(dynamodb_endpoint: str) -> Any:
    import boto3
    from botocore.config import Config

    # A pool as large as the widest thread race in the tests, so no connection is discarded.
    return boto3.client(
        "dynamodb",
        endpoint_url=dynamodb_endpoint,
        region_name="us-east-1",
        config=Config(max_pool_connections=64),
    )


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A private redis-server for the session (or IDEM_TEST_REDIS_URL where none is installed)."""
    server = redis_server.start()
    try:
        if not server.is_serving():
            raise RuntimeError(f"no Redis server: {server.implementation} does not answer PING")
        SERVICES_USED["Redis"] = f"{server.implementation} at {server.url}"
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_cluster_url() -> Iterator[str]:
    """A private 3-node Redis Cluster for the session, started with redis-server and redis-cli
    (the tests that need it skip where those are not installed).
    """
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("a Redis Cluster needs redis-server and redis-cli")
    cluster = redis_server.start_cluster()
    try:
        SERVICES_USED["Redis Cluster"] = cluster.implementation
        yield cluster.url
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def postgres_conninfo() -> Iterator[str]:
    """A database of the session's own, dropped at the end, on the PostgreSQL server at
    IDEM_TEST_POSTGRES_DSN (default 127.0.0.1:5432) or, where none answers, a private one.
    """
    server = postgres_server.start()
    try:
        name, conninfo = server.create_database()
        SERVICES_USED["PostgreSQL"] = f"{server.implementation} (database {name})"
        try:
            yield conninfo
        finally:
            server.drop_database(name)
    finally:
        server.stop()


@pytest.fixture
def dynamodb_table(dynamodb_client: Any) -> Iterator[str]:
    """A fresh idempotency table (Powertools' default schema: string hash key ``id``)."""
    from idem_middleware.persistence import DynamoDBPersistenceLayer

    name = f"idem-{uuid.uuid4().hex[:12]}"
    DynamoDBPersistenceLayer(name, boto3_client=dynamodb_client).create_table()
    yield name
    dynamodb_client.delete_table(TableName=name)


@pytest.fixture(params=backend_params())
def persistence_layer(request: pytest.FixtureRequest) -> BasePersistenceLayer:
    """A fresh, not yet configured layer on an empty store, once per backend in
    ``tests.support.backends.BACKENDS`` (test ids are the backend names).
    """
    return request.param.make(request)  # type: ignore[no-any-return]


@pytest.fixture(params=["asgi", "wsgi"])
def make(request: pytest.FixtureRequest) -> Callable[..., Harness]:
    """Builds the harness app behind the middleware, once over ASGI and once over WSGI:
    ``make(layer=None, **config)``.
    """

    def factory(layer: BasePersistenceLayer | None = None, **config: object) -> Harness:
        return Harness(
            request.param,
            layer if layer is not None else InMemoryPersistenceLayer(),
            IdempotencyConfig(**config),  # type: ignore[arg-type]
        )

    return factory
