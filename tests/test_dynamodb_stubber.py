"""DynamoDBPersistenceLayer's exact requests (botocore Stubber on a real boto3 client), and
store faults: throttling, throughput and connection errors, at the layer and through the engine.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any, cast

import boto3
import pytest
from botocore.awsrequest import AWSResponse
from botocore.config import Config
from botocore.exceptions import ClientError, EndpointConnectionError
from botocore.stub import Stubber

from idem_middleware.config import IdempotencyConfig, StoreErrorPolicy
from idem_middleware.engine import (
    IdempotencyEngine,
    IdempotencyEvent,
    PassThrough,
    Proceed,
    Respond,
)
from idem_middleware.exceptions import (
    IdempotencyItemAlreadyExistsError,
    IdempotencyItemNotFoundError,
    IdempotencyLeaseLostError,
    IdempotencyPersistenceLayerError,
)
from idem_middleware.persistence.dynamodb import DynamoDBPersistenceLayer
from idem_middleware.persistence.record import STATUS_COMPLETED, STATUS_INPROGRESS, DataRecord
from idem_middleware.request import Headers, IdempotencyRequest
from idem_middleware.responses import PROBLEM_CONTENT_TYPE, StoredResponse
from tests.support.backends import FakeClock

TABLE = "idempotency"
NOW = 1_700_000_000
HASH = "a" * 64
RESPONSE = StoredResponse(201, (("Content-Type", "application/json"),), b'{"id":1}')
CLAIM_CONDITION = (
    "attribute_not_exists(#id) OR #expiry < :now OR "
    "(#status = :inprogress AND attribute_exists(#in_progress_expiry) "
    "AND #in_progress_expiry < :now_in_millis)"
)
LEASE_CONDITION = "#status = :inprogress AND #in_progress_expiry = :lease AND #lease_id = :lease_id"
#: The lease id every claim draws in these tests (see ``fixed_lease_id``).
LEASE_ID = "1d" * 16
LEASE_NAMES = {
    "#status": "status",
    "#in_progress_expiry": "in_progress_expiration",
    "#lease_id": "lease_id",
}
LEASE_VALUES = {
    ":inprogress": {"S": "INPROGRESS"},
    ":lease": {"N": str((NOW + 60) * 1000)},
    ":lease_id": {"S": LEASE_ID},
}
STORE_FAULTS = ["ProvisionedThroughputExceededException", "ThrottlingException"]
# No retries, so an injected fault surfaces at once; generous timeouts, so a busy machine
# (DynamoDB Local shares it with everything else) is not mistaken for a fault.
NO_RETRIES = Config(retries={"total_max_attempts": 1}, connect_timeout=10, read_timeout=60)


@pytest.fixture(autouse=True)
def fixed_lease_id(monkeypatch: pytest.MonkeyPatch) -> None:
    """Claims draw a random lease id; the exact requests below need a known one."""
    monkeypatch.setattr("idem_middleware.persistence.base.new_lease_id", lambda: LEASE_ID)


@pytest.fixture
def client() -> Any:
    return boto3.client("dynamodb", region_name="us-east-1", config=NO_RETRIES)


@pytest.fixture
def stubber(client: Any) -> Iterator[Stubber]:
    with Stubber(client) as stub:
        yield stub
        stub.assert_no_pending_responses()


def configured(layer: DynamoDBPersistenceLayer, **options: Any) -> DynamoDBPersistenceLayer:
    layer.configure(
        IdempotencyConfig(expires_after_seconds=3600, in_progress_expires_after_seconds=60)
        if not options
        else IdempotencyConfig(**options)
    )
    layer.clock = FakeClock(float(NOW))
    # One attempt per write: each stub below answers one request. Retries have their own tests.
    layer.write_attempts = 1
    return layer


@pytest.fixture
def layer(client: Any) -> DynamoDBPersistenceLayer:
    return configured(DynamoDBPersistenceLayer(TABLE, boto3_client=client))


@pytest.fixture
def key(layer: DynamoDBPersistenceLayer) -> str:
    return layer.build_idempotency_key("header:order-1")


def lease_item(key: str, **overrides: Any) -> dict[str, Any]:
    item = {
        "id": {"S": key},
        "expiration": {"N": str(NOW + 3600)},
        "status": {"S": "INPROGRESS"},
        "in_progress_expiration": {"N": str((NOW + 60) * 1000)},
        "validation": {"S": HASH},
        "lease_id": {"S": LEASE_ID},
    }
    item.update(overrides)
    return item


def claim_params(key: str) -> dict[str, Any]:
    return {
        "TableName": TABLE,
        "Item": lease_item(key),
        "ConditionExpression": CLAIM_CONDITION,
        "ExpressionAttributeNames": {
            "#id": "id",
            "#expiry": "expiration",
            "#in_progress_expiry": "in_progress_expiration",
            "#status": "status",
        },
        "ExpressionAttributeValues": {
            ":now": {"N": str(NOW)},
            ":now_in_millis": {"N": str(NOW * 1000)},
            ":inprogress": {"S": "INPROGRESS"},
        },
        "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
    }


# Exact requests -----------------------------------------------------------------------------


def test_claim_is_one_conditional_put_returning_the_old_item(
    layer: DynamoDBPersistenceLayer, key: str, stubber: Stubber
) -> None:
    stubber.add_response("put_item", {}, claim_params(key))

    lease = layer.save_inprogress(key, HASH)

    assert lease.status == STATUS_INPROGRESS
    assert lease.in_progress_expiry_timestamp == (NOW + 60) * 1000


def test_collision_is_answered_from_the_old_item_of_the_same_call(
    layer: DynamoDBPersistenceLayer, key: str, stubber: Stubber
) -> None:
    old = lease_item(key, status={"S": "COMPLETED"}, data={"S": RESPONSE.encode()})
    stubber.add_client_error(
        "put_item",
        service_error_code="ConditionalCheckFailedException",
        service_message="The conditional request failed",
        expected_params=claim_params(key),
        modeled_fields={"Item": old},
    )

    with pytest.raises(IdempotencyItemAlreadyExistsError) as info:
        layer.save_inprogress(key, HASH)

    record = info.value.old_data_record
    assert record is not None
    assert record.idempotency_key == key
    assert record.status == STATUS_COMPLETED
    assert record.payload_hash == HASH
    assert record.response == RESPONSE


def test_collision_without_the_old_item_still_reports_the_collision(
    layer: DynamoDBPersistenceLayer, key: str, stubber: Stubber
) -> None:
    stubber.add_client_error("put_item", service_error_code="ConditionalCheckFailedException")

    with pytest.raises(IdempotencyItemAlreadyExistsError) as info:
        layer.save_inprogress(key, HASH)

    assert info.value.old_data_record is None


def test_get_is_a_consistent_read(
    layer: DynamoDBPersistenceLayer, key: str, stubber: Stubber
) -> None:
    expected = {"TableName": TABLE, "Key": {"id": {"S": key}}, "ConsistentRead": True}
    stubber.add_response("get_item", {"Item": lease_item(key)}, expected)
    stubber.add_response("get_item", {}, expected)

    assert layer.get_record(key).status == STATUS_INPROGRESS
    with pytest.raises(IdempotencyItemNotFoundError):
        layer.get_record(key)


def test_completion_is_an_update_fenced_on_the_lease(
    layer: DynamoDBPersistenceLayer, key: str, stubber: Stubber
) -> None:
    stubber.add_response("put_item", {}, claim_params(key))
    lease = layer.save_inprogress(key, HASH)
    assert isinstance(layer.clock, FakeClock)
    layer.clock.advance(7)
    stubber.add_response(
        "update_item",
        {},
        {
            "TableName": TABLE,
            "Key": {"id": {"S": key}},
            "UpdateExpression": (
                "SET #expiry = :expiry, #status = :status, #data = :data, #validation = :validation"
            ),
            "ConditionExpression": LEASE_CONDITION,
            "ExpressionAttributeNames": {
                **LEASE_NAMES,
                "#expiry": "expiration",
                "#data": "data",
                "#validation": "validation",
            },
            "ExpressionAttributeValues": {
                **LEASE_VALUES,
                ":expiry": {"N": str(NOW + 7 + 3600)},
                ":status": {"S": "COMPLETED"},
                ":data": {"S": RESPONSE.encode()},
                ":validation": {"S": HASH},
            },
        },
    )

    record = layer.save_success(lease, RESPONSE)

    assert record.status == STATUS_COMPLETED
    assert record.response == RESPONSE


def test_release_is_a_delete_fenced_on_the_lease(
    layer: DynamoDBPersistenceLayer, key: str, stubber: Stubber
) -> None:
    stubber.add_response("put_item", {}, claim_params(key))
    lease = layer.save_inprogress(key, HASH)
    stubber.add_response(
        "delete_item",
        {},
        {
            "TableName": TABLE,
            "Key": {"id": {"S": key}},
            "ConditionExpression": LEASE_CONDITION,
            "ExpressionAttributeNames": LEASE_NAMES,
            "ExpressionAttributeValues": LEASE_VALUES,
        },
    )

    layer.delete_record(lease)


@pytest.mark.parametrize("operation", ["update_item", "delete_item"])
def test_failed_lease_condition_is_lease_lost(
    layer: DynamoDBPersistenceLayer, key: str, stubber: Stubber, operation: str
) -> None:
    stubber.add_response("put_item", {}, claim_params(key))
    lease = layer.save_inprogress(key, HASH)
    stubber.add_client_error(operation, service_error_code="ConditionalCheckFailedException")
    if operation == "update_item":  # is it our own completion, resent? No: nothing is stored
        stubber.add_response(
            "get_item", {}, {"TableName": TABLE, "Key": {"id": {"S": key}}, "ConsistentRead": True}
        )

    finish: Callable[[], object] = {
        "update_item": lambda: layer.save_success(lease, RESPONSE),
        "delete_item": lambda: layer.delete_record(lease),
    }[operation]

    with pytest.raises(IdempotencyLeaseLostError):
        finish()


def test_composite_key_requests_name_partition_and_sort_key(client: Any, stubber: Stubber) -> None:
    layer = configured(
        DynamoDBPersistenceLayer(
            TABLE,
            key_attr="pk",
            sort_key_attr="sk",
            static_pk_value="orders-api",
            boto3_client=client,
        )
    )
    key = layer.build_idempotency_key("header:order-1")
    composite = {"pk": {"S": "orders-api"}, "sk": {"S": key}}
    params = claim_params(key)
    del params["Item"]["id"]
    params["Item"].update(composite)
    params["ExpressionAttributeNames"]["#id"] = "pk"
    stubber.add_response("put_item", {}, params)
    stubber.add_response(
        "get_item", {}, {"TableName": TABLE, "Key": composite, "ConsistentRead": True}
    )
    stubber.add_response(
        "delete_item",
        {},
        {
            "TableName": TABLE,
            "Key": composite,
            "ConditionExpression": LEASE_CONDITION,
            "ExpressionAttributeNames": LEASE_NAMES,
            "ExpressionAttributeValues": LEASE_VALUES,
        },
    )

    lease = layer.save_inprogress(key, HASH)
    with pytest.raises(IdempotencyItemNotFoundError):
        layer.get_record(key)
    layer.delete_record(lease)


# Faults at the layer ------------------------------------------------------------------------


def _call(layer: DynamoDBPersistenceLayer, key: str, operation: str) -> Callable[[], object]:
    """The public layer call that makes ``operation``'s request."""
    lease = DataRecord(
        idempotency_key=key,
        status=STATUS_INPROGRESS,
        expiry_timestamp=NOW + 3600,
        in_progress_expiry_timestamp=(NOW + 60) * 1000,
        payload_hash=HASH,
    )
    return {
        "put_item": lambda: layer.save_inprogress(key, HASH),
        "get_item": lambda: layer.get_record(key),
        "update_item": lambda: layer.save_success(lease, RESPONSE),
        "delete_item": lambda: layer.delete_record(lease),
    }[operation]


@pytest.mark.parametrize("code", [*STORE_FAULTS, "InternalServerError", "AccessDeniedException"])
@pytest.mark.parametrize("operation", ["put_item", "get_item", "update_item", "delete_item"])
def test_service_errors_are_store_errors_with_the_cause_chained(
    layer: DynamoDBPersistenceLayer, key: str, stubber: Stubber, operation: str, code: str
) -> None:
    stubber.add_client_error(operation, service_error_code=code, http_status_code=400)

    with pytest.raises(IdempotencyPersistenceLayerError, match=TABLE) as info:
        _call(layer, key, operation)()

    cause = info.value.__cause__
    assert isinstance(cause, ClientError)
    assert cause.response["Error"]["Code"] == code


@pytest.fixture
def unreachable_layer(closed_port: int) -> DynamoDBPersistenceLayer:
    """A layer whose endpoint refuses connections (nothing listens on the port)."""
    client = boto3.client(
        "dynamodb",
        region_name="us-east-1",
        endpoint_url=f"http://127.0.0.1:{closed_port}",
        config=NO_RETRIES,
    )
    return configured(DynamoDBPersistenceLayer(TABLE, boto3_client=client))


@pytest.mark.parametrize("operation", ["put_item", "get_item", "update_item", "delete_item"])
def test_connection_errors_are_store_errors_with_the_cause_chained(
    unreachable_layer: DynamoDBPersistenceLayer, operation: str
) -> None:
    key = unreachable_layer.build_idempotency_key("header:order-1")

    with pytest.raises(IdempotencyPersistenceLayerError) as info:
        _call(unreachable_layer, key, operation)()

    assert isinstance(info.value.__cause__, EndpointConnectionError)


# Faults against DynamoDB Local: nothing is left behind ---------------------------------------


class _Body:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self.data


def _fault(kind: str) -> Callable[..., Any]:
    """A ``before-send`` handler: DynamoDB answers with an error, or the connection fails;
    the request never reaches the table either way.
    """

    def handler(request: Any, **_: Any) -> AWSResponse:
        if kind == "EndpointConnectionError":
            raise EndpointConnectionError(endpoint_url=request.url)
        body = json.dumps(
            {"__type": f"com.amazonaws.dynamodb.v20120810#{kind}", "message": "injected"}
        ).encode()
        headers = {"content-type": "application/x-amz-json-1.0", "x-amzn-requestid": "fault"}
        return AWSResponse(request.url, 400, cast(Any, headers), _Body(body))

    return handler


@pytest.fixture
def local_client(dynamodb_endpoint: str) -> Any:
    return boto3.client(
        "dynamodb", endpoint_url=dynamodb_endpoint, region_name="us-east-1", config=NO_RETRIES
    )


FAULTS = [*STORE_FAULTS, "EndpointConnectionError"]


def local_layer(table: str, client: Any) -> DynamoDBPersistenceLayer:
    """:func:`configured`, on a clock near the real time: DynamoDB Local deletes items whose
    TTL attribute is past, at a moment of its own, and ``NOW`` (2023) is long past.
    """
    layer = configured(DynamoDBPersistenceLayer(table, boto3_client=client))
    layer.clock = FakeClock()
    return layer


@pytest.mark.dynamodb
@pytest.mark.parametrize("fault", FAULTS)
def test_failed_claim_leaves_no_record_behind(
    local_client: Any, dynamodb_table: str, fault: str
) -> None:
    layer = local_layer(dynamodb_table, local_client)
    key = layer.build_idempotency_key("header:order-1")
    handler = _fault(fault)
    local_client.meta.events.register("before-send.dynamodb.PutItem", handler)

    with pytest.raises(IdempotencyPersistenceLayerError) as info:
        layer.save_inprogress(key, HASH)

    assert info.value.__cause__ is not None
    if fault == "EndpointConnectionError":
        assert isinstance(info.value.__cause__, EndpointConnectionError)
    else:
        assert isinstance(info.value.__cause__, ClientError)
        assert info.value.__cause__.response["Error"]["Code"] == fault
    raw = local_client.get_item(TableName=dynamodb_table, Key={"id": {"S": key}})
    assert "Item" not in raw
    local_client.meta.events.unregister("before-send.dynamodb.PutItem", handler)
    assert layer.save_inprogress(key, HASH).status == STATUS_INPROGRESS


@pytest.mark.dynamodb
@pytest.mark.parametrize("fault", FAULTS)
def test_failed_completion_keeps_the_lease_and_the_owner_can_release_it(
    local_client: Any, dynamodb_table: str, fault: str
) -> None:
    layer = local_layer(dynamodb_table, local_client)
    key = layer.build_idempotency_key("header:order-1")
    lease = layer.save_inprogress(key, HASH)
    handler = _fault(fault)
    local_client.meta.events.register("before-send.dynamodb.UpdateItem", handler)

    with pytest.raises(IdempotencyPersistenceLayerError):
        layer.save_success(lease, RESPONSE)

    stored = layer.get_record(key)
    assert stored.status == STATUS_INPROGRESS
    assert stored.in_progress_expiry_timestamp == lease.in_progress_expiry_timestamp
    local_client.meta.events.unregister("before-send.dynamodb.UpdateItem", handler)
    layer.delete_record(lease)
    raw = local_client.get_item(TableName=dynamodb_table, Key={"id": {"S": key}})
    assert "Item" not in raw


# Faults through the engine ------------------------------------------------------------------


def _request() -> IdempotencyRequest:
    return IdempotencyRequest(
        method="POST",
        path="/orders",
        query_string="",
        headers=Headers([("Idempotency-Key", "order-1")]),
        body=b'{"sku":"ABC"}',
    )


def _engine(
    client: Any, on_store_error: StoreErrorPolicy, events: list[IdempotencyEvent]
) -> IdempotencyEngine:
    layer = DynamoDBPersistenceLayer(TABLE, boto3_client=client)
    return IdempotencyEngine(
        layer, IdempotencyConfig(on_store_error=on_store_error, on_event=events.append)
    )


@pytest.mark.parametrize("code", STORE_FAULTS)
def test_engine_rejects_with_503_when_the_store_fails(
    client: Any, stubber: Stubber, code: str
) -> None:
    events: list[IdempotencyEvent] = []
    engine = _engine(client, "reject", events)
    stubber.add_client_error("put_item", service_error_code=code)

    decision = engine.begin(_request())

    assert isinstance(decision, Respond)
    response = decision.response
    assert response.status == 503
    headers = dict(response.headers)
    assert headers["content-type"] == PROBLEM_CONTENT_TYPE
    assert headers["retry-after"] == "5"
    problem = json.loads(response.body)
    assert problem["code"] == "idempotency_store_unavailable"
    assert problem["status"] == 503
    assert [event.name for event in events] == ["store_error"]
    assert events[0].detail is not None
    assert code in events[0].detail


@pytest.mark.parametrize("code", STORE_FAULTS)
def test_engine_passes_through_when_configured_to(client: Any, stubber: Stubber, code: str) -> None:
    events: list[IdempotencyEvent] = []
    engine = _engine(client, "passthrough", events)
    stubber.add_client_error("put_item", service_error_code=code)

    assert isinstance(engine.begin(_request()), PassThrough)
    assert [event.name for event in events] == ["store_error"]


@pytest.mark.parametrize(
    ("on_store_error", "decision_type"), [("reject", Respond), ("passthrough", PassThrough)]
)
def test_engine_with_an_unreachable_store(
    unreachable_layer: DynamoDBPersistenceLayer,
    on_store_error: StoreErrorPolicy,
    decision_type: type,
) -> None:
    layer = DynamoDBPersistenceLayer(TABLE, boto3_client=unreachable_layer.client)
    engine = IdempotencyEngine(layer, IdempotencyConfig(on_store_error=on_store_error))

    decision = engine.begin(_request())

    assert isinstance(decision, decision_type)
    if isinstance(decision, Respond):
        assert decision.response.status == 503


@pytest.mark.parametrize("code", STORE_FAULTS)
def test_engine_survives_store_errors_after_the_handler_ran(
    client: Any, stubber: Stubber, code: str
) -> None:
    """Completion and release are retried with a short backoff, then reported: the event
    says that the client's retry will run the handler again once the lease runs out.
    """
    events: list[IdempotencyEvent] = []
    engine = _engine(client, "reject", events)
    waits: list[float] = []
    engine.persistence_layer.sleep = waits.append
    attempts = engine.persistence_layer.write_attempts
    assert attempts == 3
    stubber.add_response("put_item", {})
    stubber.add_response("put_item", {})
    first = engine.begin(_request())
    second = engine.begin(
        IdempotencyRequest("POST", "/orders", "", Headers([("Idempotency-Key", "o-2")]), b"{}")
    )
    assert isinstance(first, Proceed)
    assert isinstance(second, Proceed)
    for _ in range(attempts):
        stubber.add_client_error("update_item", service_error_code=code)
    for _ in range(attempts):
        stubber.add_client_error("delete_item", service_error_code=code)

    engine.complete(first, RESPONSE)  # must not raise: the response still goes out
    engine.release(second, 500)

    assert [event.name for event in events] == ["claimed", "claimed", "store_error", "store_error"]
    for event in events[2:]:
        assert event.detail is not None
        assert code in event.detail
        assert f"gave up after {attempts} attempts" in event.detail
        assert "a retry after the lease will run the handler again" in event.detail
    assert len(waits) == 2 * (attempts - 1)
    assert sum(waits) < 1.0, "the retries stay short"
