"""DynamoDBPersistenceLayer against Amazon's DynamoDB Local: the stored item, table layouts,
compression and the 400 KB item limit, table management, read consistency, round trips.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from idem_middleware.config import IdempotencyConfig
from idem_middleware.engine import IdempotencyEngine, Proceed, Respond
from idem_middleware.exceptions import (
    IdempotencyItemAlreadyExistsError,
    IdempotencyItemNotFoundError,
    IdempotencyLeaseLostError,
    IdempotencyPersistenceLayerError,
)
from idem_middleware.persistence import dynamodb as dynamodb_module
from idem_middleware.persistence.dynamodb import DynamoDBPersistenceLayer
from idem_middleware.persistence.record import STATUS_COMPLETED, STATUS_INPROGRESS
from idem_middleware.request import Headers, IdempotencyRequest
from idem_middleware.responses import StoredResponse
from tests.support.backends import FakeClock

pytestmark = pytest.mark.dynamodb

HASH = "a" * 64
RESPONSE = StoredResponse(201, (("Content-Type", "application/json"),), b'{"id":1}')

MakeLayer = Callable[..., DynamoDBPersistenceLayer]


@pytest.fixture
def table_names(dynamodb_client: Any) -> Iterator[Callable[[], str]]:
    """Fresh table names; every table created under one is deleted after the test."""
    names: list[str] = []

    def new_name() -> str:
        names.append(f"idem-{uuid.uuid4().hex[:12]}")
        return names[-1]

    yield new_name
    for name in names:
        with contextlib.suppress(dynamodb_client.exceptions.ResourceNotFoundException):
            dynamodb_client.delete_table(TableName=name)


@pytest.fixture
def make_layer(dynamodb_client: Any) -> MakeLayer:
    """A configured layer on ``table`` (or the default fixture table) with a fake clock."""

    def make(
        table: str, *, config: IdempotencyConfig | None = None, **options: Any
    ) -> DynamoDBPersistenceLayer:
        options.setdefault("boto3_client", dynamodb_client)
        layer = DynamoDBPersistenceLayer(table, **options)
        layer.configure(config or IdempotencyConfig())
        layer.clock = FakeClock()
        return layer

    return make


def raw_item(client: Any, table: str, key: dict[str, Any]) -> dict[str, Any]:
    item: dict[str, Any] = client.get_item(TableName=table, Key=key, ConsistentRead=True)["Item"]
    return item


def count_calls(client: Any) -> Counter[str]:
    """Counts the API calls a client makes, by operation name."""
    calls: Counter[str] = Counter()

    def before_call(model: Any, **_: Any) -> None:
        calls[model.name] += 1

    client.meta.events.register("before-call.dynamodb", before_call)
    return calls


@pytest.fixture
def own_client(dynamodb_endpoint: str) -> Any:
    """A client of its own, for event hooks that must not leak into other tests."""
    return boto3.client(
        "dynamodb",
        endpoint_url=dynamodb_endpoint,
        region_name="us-east-1",
        config=Config(retries={"total_max_attempts": 1}),
    )


# The stored item ----------------------------------------------------------------------------


def test_item_uses_powertools_attribute_names_and_types(
    make_layer: MakeLayer, dynamodb_table: str, dynamodb_client: Any
) -> None:
    layer = make_layer(dynamodb_table)
    key = layer.build_idempotency_key("header:abc")
    now = layer.clock()

    lease = layer.save_inprogress(key, HASH)

    assert lease.lease_id is not None
    item = raw_item(dynamodb_client, dynamodb_table, {"id": {"S": key}})
    assert item == {
        "id": {"S": key},
        "expiration": {"N": str(int(now) + 86_400)},
        "in_progress_expiration": {"N": str(int((now + 10) * 1000))},
        "status": {"S": "INPROGRESS"},
        "validation": {"S": HASH},
        "lease_id": {"S": lease.lease_id},  # the one attribute Powertools' items lack
    }

    layer.clock = FakeClock(now + 3)
    layer.save_success(lease, RESPONSE)

    item = raw_item(dynamodb_client, dynamodb_table, {"id": {"S": key}})
    assert set(item) == {
        "id",
        "expiration",
        "in_progress_expiration",
        "status",
        "validation",
        "data",
        "lease_id",
    }
    assert item["status"] == {"S": "COMPLETED"}
    assert item["expiration"] == {"N": str(int(now) + 3 + 86_400)}
    assert item["in_progress_expiration"] == {"N": str(lease.in_progress_expiry_timestamp)}
    assert set(item["data"]) == {"S"}, "a small response is stored as readable text"
    assert json.loads(item["data"]["S"]) == {
        "status": 201,
        "headers": [["Content-Type", "application/json"]],
        "body": '{"id":1}',
    }


def test_reads_an_item_written_by_another_writer(
    make_layer: MakeLayer, dynamodb_table: str, dynamodb_client: Any
) -> None:
    """A COMPLETED item without a lease attribute (as other tools leave it) is readable."""
    layer = make_layer(dynamodb_table)
    key = layer.build_idempotency_key("header:foreign")
    dynamodb_client.put_item(
        TableName=dynamodb_table,
        Item={
            "id": {"S": key},
            "expiration": {"N": str(int(layer.clock()) + 100)},
            "status": {"S": "COMPLETED"},
            "data": {"S": RESPONSE.encode()},
        },
    )

    record = layer.get_record(key, HASH)

    assert record.status == STATUS_COMPLETED
    assert record.in_progress_expiry_timestamp is None
    assert record.payload_hash is None  # nothing to validate against: accepted
    assert record.response == RESPONSE


@pytest.mark.parametrize(
    "damage",
    [
        {"status": {"S": "WEIRD"}},
        {"data": {"B": b"not zlib"}},
        {"expiration": {"S": "soon"}},
    ],
    ids=["unknown-status", "corrupt-compressed-data", "wrong-type"],
)
def test_an_unreadable_item_is_a_store_error_not_a_crash(
    make_layer: MakeLayer, dynamodb_table: str, dynamodb_client: Any, damage: dict[str, Any]
) -> None:
    layer = make_layer(dynamodb_table)
    key = layer.build_idempotency_key("header:damaged")
    item = {
        "id": {"S": key},
        "expiration": {"N": str(int(layer.clock()) + 100)},
        "status": {"S": "COMPLETED"},
        "data": {"S": RESPONSE.encode()},
        **damage,
    }
    dynamodb_client.put_item(TableName=dynamodb_table, Item=item)

    with pytest.raises(IdempotencyPersistenceLayerError, match="unreadable"):
        layer.get_record(key)
    with pytest.raises(IdempotencyPersistenceLayerError, match="unreadable"):
        layer.save_inprogress(key, HASH)  # the collision path reads the old item too
    assert raw_item(dynamodb_client, dynamodb_table, {"id": {"S": key}}) == item


def test_custom_attribute_names(
    make_layer: MakeLayer, table_names: Callable[[], str], dynamodb_client: Any
) -> None:
    table = table_names()
    names = {
        "key_attr": "idempotency_key",
        "expiry_attr": "ttl",
        "in_progress_expiry_attr": "lease_until",
        "status_attr": "state",
        "data_attr": "response",
        "validation_key_attr": "fingerprint",
        "lease_id_attr": "lease",
    }
    layer = make_layer(table, **names)
    assert layer.create_table() is True
    ttl = dynamodb_client.describe_time_to_live(TableName=table)["TimeToLiveDescription"]
    assert ttl["AttributeName"] == "ttl"
    key = layer.build_idempotency_key("header:custom")

    stale = layer.save_inprogress(key, HASH)
    with pytest.raises(IdempotencyItemAlreadyExistsError) as info:
        layer.save_inprogress(key, HASH)
    assert info.value.old_data_record is not None
    assert info.value.old_data_record.status == STATUS_INPROGRESS
    layer.clock = FakeClock(layer.clock() + 61)
    current = layer.save_inprogress(key, HASH)
    with pytest.raises(IdempotencyLeaseLostError):
        layer.save_success(stale, RESPONSE)
    layer.save_success(current, RESPONSE)

    item = raw_item(dynamodb_client, table, {"idempotency_key": {"S": key}})
    assert set(item) == set(names.values())
    assert item["state"] == {"S": "COMPLETED"}
    assert "N" in item["ttl"]
    assert "N" in item["lease_until"]
    assert item["fingerprint"] == {"S": HASH}
    assert layer.get_record(key, HASH).response == RESPONSE


def test_composite_key_end_to_end(
    make_layer: MakeLayer, table_names: Callable[[], str], dynamodb_client: Any
) -> None:
    table = table_names()
    orders = make_layer(table, key_attr="pk", sort_key_attr="sk", static_pk_value="orders-api")
    assert orders.create_table() is True
    schema = dynamodb_client.describe_table(TableName=table)["Table"]["KeySchema"]
    assert schema == [
        {"AttributeName": "pk", "KeyType": "HASH"},
        {"AttributeName": "sk", "KeyType": "RANGE"},
    ]
    key = orders.build_idempotency_key("header:shared")

    stale = orders.save_inprogress(key, HASH)
    with pytest.raises(IdempotencyItemAlreadyExistsError) as info:
        orders.save_inprogress(key, HASH)
    assert info.value.old_data_record is not None
    assert info.value.old_data_record.idempotency_key == key
    orders.clock = FakeClock(orders.clock() + 61)
    current = orders.save_inprogress(key, HASH)
    with pytest.raises(IdempotencyLeaseLostError):
        orders.delete_record(stale)
    orders.save_success(current, RESPONSE)

    item = raw_item(dynamodb_client, table, {"pk": {"S": "orders-api"}, "sk": {"S": key}})
    assert item["status"] == {"S": "COMPLETED"}
    assert "id" not in item
    assert orders.get_record(key, HASH).response == RESPONSE

    # Another app on the same table, another partition: the same key is another record.
    billing = make_layer(table, key_attr="pk", sort_key_attr="sk", static_pk_value="billing-api")
    other = billing.save_inprogress(key, HASH)
    billing.delete_record(other)
    with pytest.raises(IdempotencyItemNotFoundError):
        billing.get_record(key)
    assert orders.get_record(key).status == STATUS_COMPLETED


def test_key_and_sort_key_must_differ(dynamodb_client: Any) -> None:
    with pytest.raises(ValueError, match="must differ"):
        DynamoDBPersistenceLayer(
            "t", key_attr="id", sort_key_attr="id", boto3_client=dynamodb_client
        )


# Compression and the item size limit --------------------------------------------------------


@pytest.mark.parametrize(
    ("body_bytes", "attribute_type"),
    [(200, "S"), (4 * 1024, "B"), (2 * 1024 * 1024, "B")],
    ids=["small-text", "compressible", "over-the-item-limit-uncompressed"],
)
def test_responses_are_compressed_when_that_helps(
    make_layer: MakeLayer,
    dynamodb_table: str,
    dynamodb_client: Any,
    body_bytes: int,
    attribute_type: str,
) -> None:
    writer = make_layer(dynamodb_table)
    key = writer.build_idempotency_key("header:big")
    row = b'{"sku":"ABC-123","quantity":1,"price":"9.99"},'
    body = b"[" + row * (body_bytes // len(row)) + b"{}]"
    response = StoredResponse(200, (("Content-Type", "application/json"),), body)

    writer.save_success(writer.save_inprogress(key, HASH), response)

    item = raw_item(dynamodb_client, dynamodb_table, {"id": {"S": key}})
    assert set(item["data"]) == {attribute_type}
    reader = make_layer(dynamodb_table)  # another process: decodes what was stored
    stored = reader.get_record(key, HASH).response
    assert stored is not None
    assert stored.body == body
    assert stored == response


def test_incompressible_response_too_big_for_an_item_is_stored_without_its_body(
    make_layer: MakeLayer, dynamodb_table: str, dynamodb_client: Any
) -> None:
    writer = make_layer(dynamodb_table, config=IdempotencyConfig(use_local_cache=True))
    key = writer.build_idempotency_key("header:video")
    headers = (("Content-Type", "application/octet-stream"), ("X-Checksum", "abc"))
    response = StoredResponse(200, headers, os.urandom(600 * 1024))

    completed = writer.save_success(writer.save_inprogress(key, HASH), response)

    expected = StoredResponse(200, headers, b"", body_omitted=True)
    item = raw_item(dynamodb_client, dynamodb_table, {"id": {"S": key}})
    assert item["status"] == {"S": "COMPLETED"}
    reader = make_layer(dynamodb_table)
    assert reader.get_record(key, HASH).response == expected
    # This process replays what every other process replays, not the body it could not store.
    assert completed.response == expected
    assert writer.get_record(key, HASH).response == expected


def test_body_is_dropped_when_dynamodb_rejects_an_item_the_estimate_let_through(
    make_layer: MakeLayer,
    dynamodb_table: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dynamodb_module, "MAX_ITEM_BYTES", 10 * 1024 * 1024)
    layer = make_layer(dynamodb_table)
    key = layer.build_idempotency_key("header:underestimated")
    response = StoredResponse(200, (("Content-Type", "image/png"),), os.urandom(500 * 1024))

    layer.save_success(layer.save_inprogress(key, HASH), response)

    assert make_layer(dynamodb_table).get_record(key).response == response.without_body()


def test_a_record_that_cannot_be_stored_at_all_is_a_store_error(
    make_layer: MakeLayer, dynamodb_table: str
) -> None:
    """Headers alone over the item limit: DynamoDB's refusal surfaces as a store error (which
    the engine logs and survives), never as a raw botocore exception.
    """
    layer = make_layer(dynamodb_table)
    key = layer.build_idempotency_key("header:huge-headers")
    lease = layer.save_inprogress(key, HASH)
    huge = base64.b64encode(os.urandom(450 * 1024)).decode("ascii")  # ~600 KB, incompressible
    response = StoredResponse(200, (("X-Huge", huge),), b"ok")

    with pytest.raises(IdempotencyPersistenceLayerError) as info:
        layer.save_success(lease, response)

    assert isinstance(info.value.__cause__, ClientError)
    assert layer.get_record(key).status == STATUS_INPROGRESS
    layer.delete_record(lease)  # the lease is still held: the owner can release it


# Table management ---------------------------------------------------------------------------


def test_create_table_is_idempotent_and_enables_ttl(
    table_names: Callable[[], str], dynamodb_client: Any
) -> None:
    table = table_names()
    layer = DynamoDBPersistenceLayer(table, boto3_client=dynamodb_client)

    assert layer.create_table() is True
    assert layer.create_table() is False

    description = dynamodb_client.describe_table(TableName=table)["Table"]
    assert description["TableStatus"] == "ACTIVE"
    assert description["KeySchema"] == [{"AttributeName": "id", "KeyType": "HASH"}]
    assert description["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"
    ttl = dynamodb_client.describe_time_to_live(TableName=table)["TimeToLiveDescription"]
    assert ttl == {"TimeToLiveStatus": "ENABLED", "AttributeName": "expiration"}


def test_create_table_enables_ttl_on_an_existing_table(
    table_names: Callable[[], str], dynamodb_client: Any
) -> None:
    table = table_names()
    dynamodb_client.create_table(
        TableName=table,
        KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    layer = DynamoDBPersistenceLayer(table, boto3_client=dynamodb_client)

    assert layer.create_table() is False

    ttl = dynamodb_client.describe_time_to_live(TableName=table)["TimeToLiveDescription"]
    assert ttl == {"TimeToLiveStatus": "ENABLED", "AttributeName": "expiration"}


def test_missing_table_is_a_store_error(make_layer: MakeLayer) -> None:
    layer = make_layer("idem-no-such-table")
    key = layer.build_idempotency_key("header:x")

    with pytest.raises(IdempotencyPersistenceLayerError, match="idem-no-such-table") as info:
        layer.save_inprogress(key, HASH)

    assert isinstance(info.value.__cause__, ClientError)
    assert info.value.__cause__.response["Error"]["Code"] == "ResourceNotFoundException"
    with pytest.raises(IdempotencyPersistenceLayerError):
        layer.get_record(key)


# Reads and round trips ----------------------------------------------------------------------


def test_reads_are_consistent(make_layer: MakeLayer, dynamodb_table: str, own_client: Any) -> None:
    layer = make_layer(dynamodb_table, boto3_client=own_client)
    reads: list[dict[str, Any]] = []
    own_client.meta.events.register(
        "provide-client-params.dynamodb.GetItem", lambda params, **_: reads.append(dict(params))
    )
    key = layer.build_idempotency_key("header:read")
    layer.save_inprogress(key, HASH)

    assert layer.get_record(key).status == STATUS_INPROGRESS

    assert len(reads) == 1
    assert reads[0]["ConsistentRead"] is True
    assert reads[0]["Key"] == {"id": {"S": key}}


def _request(key: str, body: bytes = b'{"amount":5}') -> IdempotencyRequest:
    return IdempotencyRequest(
        method="POST",
        path="/payments",
        query_string="",
        headers=Headers([("Idempotency-Key", key)]),
        body=body,
    )


@pytest.mark.parametrize("use_local_cache", [False, True], ids=["no-cache", "local-cache"])
def test_store_round_trips_per_request(
    dynamodb_table: str, own_client: Any, use_local_cache: bool
) -> None:
    """DESIGN.md: new key = 2 store calls, replay = 1 (0 from the local cache), conflict = 1."""
    layer = DynamoDBPersistenceLayer(dynamodb_table, boto3_client=own_client)
    engine = IdempotencyEngine(layer, IdempotencyConfig(use_local_cache=use_local_cache))
    calls = count_calls(own_client)

    decision = engine.begin(_request("k-1"))
    assert isinstance(decision, Proceed)
    engine.complete(decision, RESPONSE)
    assert calls == {"PutItem": 1, "UpdateItem": 1}

    calls.clear()
    replay = engine.begin(_request("k-1"))
    assert isinstance(replay, Respond)
    assert replay.response.body == RESPONSE.body
    assert ("Idempotent-Replayed", "true") in replay.response.headers
    assert calls == ({} if use_local_cache else {"PutItem": 1})

    calls.clear()
    in_flight = engine.begin(_request("k-2"))
    assert isinstance(in_flight, Proceed)
    conflict = engine.begin(_request("k-2"))
    assert isinstance(conflict, Respond)
    assert conflict.response.status == 409
    assert calls == {"PutItem": 2}
