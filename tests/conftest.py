"""Session services and shared fixtures."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support import dynamodb_local

# Credentials for DynamoDB Local / moto; never real ones.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture(scope="session")
def dynamodb_server() -> Iterator[dynamodb_local.DynamoDBServer]:
    server = dynamodb_local.start()
    print(f"\nDynamoDB tests run against {server.implementation} at {server.endpoint_url}")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def dynamodb_endpoint(dynamodb_server: dynamodb_local.DynamoDBServer) -> str:
    return dynamodb_server.endpoint_url


@pytest.fixture(scope="session")
def dynamodb_client(dynamodb_endpoint: str) -> Any:
    import boto3

    return boto3.client("dynamodb", endpoint_url=dynamodb_endpoint, region_name="us-east-1")


@pytest.fixture
def dynamodb_table(dynamodb_client: Any) -> Iterator[str]:
    """A fresh idempotency table (Powertools' default schema: string hash key ``id``)."""
    from idem_middleware.persistence import DynamoDBPersistenceLayer

    name = f"idem-{uuid.uuid4().hex[:12]}"
    DynamoDBPersistenceLayer(name, boto3_client=dynamodb_client).create_table()
    yield name
    dynamodb_client.delete_table(TableName=name)
