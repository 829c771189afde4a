"""Store faults (issue 8): what happens when a store misbehaves, over every backend where it is
part of the contract (fixture ``persistence_layer``) and with injected faults where it is not.

* completion and release are retried with a bounded backoff; a lost lease never is;
* a claim resent by botocore or redis-py after a lost reply recognises its own record;
* every claim draws its own lease id, so two claims never hold the same lease;
* records written before lease ids existed are read, completed and fenced;
* a record with an unknown status or unreadable data is a store error (503 / pass-through);
* SQLite purges expired records in bounded batches; the memory store is bounded;
* ``check()`` names what is wrong with a store: unreachable, not authorised, not found.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from idem_middleware.config import IdempotencyConfig
from idem_middleware.engine import (
    IdempotencyEngine,
    IdempotencyEvent,
    PassThrough,
    PendingClaim,
    Proceed,
    Respond,
)
from idem_middleware.exceptions import (
    IdempotencyItemAlreadyExistsError,
    IdempotencyItemNotFoundError,
    IdempotencyLeaseLostError,
    IdempotencyPersistenceLayerError,
    StoreFullError,
    StoreNotAuthorisedError,
    StoreNotFoundError,
    StoreRecordUnreadableError,
    StoreUnreachableError,
)
from idem_middleware.persistence.base import BasePersistenceLayer
from idem_middleware.persistence.memory import InMemoryPersistenceLayer
from idem_middleware.persistence.record import STATUS_COMPLETED, STATUS_INPROGRESS, DataRecord
from idem_middleware.request import Headers, IdempotencyRequest
from idem_middleware.responses import StoredResponse
from tests.support.backends import FakeClock, is_postgres, write_raw_record

EXPIRES = 3600
LEASE = 60
HASH = "a" * 64
OTHER_HASH = "b" * 64
RESPONSE = StoredResponse(201, (("Content-Type", "application/json"),), b'{"id":1}')
OTHER_RESPONSE = StoredResponse(201, (("Content-Type", "application/json"),), b'{"id":2}')


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def layer(persistence_layer: BasePersistenceLayer, clock: FakeClock) -> BasePersistenceLayer:
    persistence_layer.configure(
        IdempotencyConfig(expires_after_seconds=EXPIRES, in_progress_expires_after_seconds=LEASE)
    )
    persistence_layer.clock = clock
    persistence_layer.sleep = lambda seconds: None  # retries wait without sleeping
    return persistence_layer


@pytest.fixture
def key(layer: BasePersistenceLayer) -> str:
    return layer.build_idempotency_key("header:order-1")


def request(key: str = "order-1") -> IdempotencyRequest:
    return IdempotencyRequest(
        "POST", "/orders", "", Headers([("Idempotency-Key", key)]), b'{"sku":"ABC"}'
    )


class Faults:
    """Wraps one primitive of a layer (on the instance) to fail on chosen calls.

    ``before`` fails a call without touching the store (the request never arrived); ``after``
    performs the write and then fails (the reply was lost): both are what a short partition
    does to a store call.
    """

    def __init__(
        self, layer: BasePersistenceLayer, name: str, *, before: int = 0, after: int = 0
    ) -> None:
        self.calls = 0
        self.before = before
        self.after = after
        primitive = getattr(layer, name)

        def faulty(record: DataRecord) -> None:
            self.calls += 1
            if self.before:
                self.before -= 1
                raise IdempotencyPersistenceLayerError("injected: request lost")
            primitive(record)
            if self.after:
                self.after -= 1
                raise IdempotencyPersistenceLayerError("injected: reply lost")

        setattr(layer, name, faulty)


# 1. Completion and release are retried; a lost lease is not -----------------------------------


@pytest.mark.parametrize("where", ["before", "after"])
def test_a_failed_completion_is_retried_until_it_lands(
    layer: BasePersistenceLayer, key: str, where: str
) -> None:
    lease = layer.save_inprogress(key, HASH)
    faults = Faults(layer, "_update_record", **{where: 2})

    layer.save_success(lease, RESPONSE)

    # Lost before: two failures, then the write. Lost after: the second attempt finds the
    # completion already stored and takes it for its own.
    assert faults.calls == (3 if where == "before" else 2)
    stored = layer.get_record(key)
    assert stored.status == STATUS_COMPLETED
    assert stored.response == RESPONSE


@pytest.mark.parametrize("where", ["before", "after"])
def test_a_failed_release_is_retried_until_it_lands(
    layer: BasePersistenceLayer, key: str, where: str
) -> None:
    lease = layer.save_inprogress(key, HASH)
    faults = Faults(layer, "_delete_record", **{where: 1})

    layer.delete_record(lease)

    assert faults.calls == 2
    with pytest.raises(IdempotencyItemNotFoundError):
        layer.get_record(key)
    layer.save_inprogress(key, OTHER_HASH)  # the key is free again


def test_retries_are_bounded_in_number_and_time(layer: BasePersistenceLayer, key: str) -> None:
    lease = layer.save_inprogress(key, HASH)
    faults = Faults(layer, "_update_record", before=100)
    waits: list[float] = []
    layer.sleep = waits.append

    with pytest.raises(IdempotencyPersistenceLayerError, match="gave up after 3 attempts"):
        layer.save_success(lease, RESPONSE)

    assert faults.calls == layer.write_attempts == 3
    assert len(waits) == 2
    assert sum(waits) <= LEASE / 4
    assert layer.get_record(key).status == STATUS_INPROGRESS


def test_a_lost_lease_is_never_retried(
    layer: BasePersistenceLayer, key: str, clock: FakeClock
) -> None:
    stale = layer.save_inprogress(key, HASH)
    clock.advance(LEASE + 1)
    layer.save_inprogress(key, OTHER_HASH)
    update = Faults(layer, "_update_record")
    delete = Faults(layer, "_delete_record")

    with pytest.raises(IdempotencyLeaseLostError):
        layer.save_success(stale, RESPONSE)
    with pytest.raises(IdempotencyLeaseLostError):
        layer.delete_record(stale)

    assert (update.calls, delete.calls) == (1, 1)


class FlakyStore(InMemoryPersistenceLayer):
    """Completion and release fail with a store error ``failures`` times each."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = {"update": failures, "delete": failures}
        self.sleep = lambda seconds: None

    def _fail(self, operation: str) -> None:
        if self.failures[operation]:
            self.failures[operation] -= 1
            raise IdempotencyPersistenceLayerError(f"injected {operation} fault")

    def _update_record(self, data_record: DataRecord) -> None:
        self._fail("update")
        super()._update_record(data_record)

    def _delete_record(self, data_record: DataRecord) -> None:
        self._fail("delete")
        super()._delete_record(data_record)


def test_engine_completes_through_a_short_fault() -> None:
    events: list[IdempotencyEvent] = []
    engine = IdempotencyEngine(FlakyStore(failures=1), IdempotencyConfig(on_event=events.append))
    first = engine.begin(request())
    assert isinstance(first, Proceed)

    engine.complete(first, RESPONSE)

    assert [event.name for event in events] == ["claimed", "completed"]
    replay = engine.begin(request())
    assert isinstance(replay, Respond)
    assert replay.response.body == RESPONSE.body


def test_engine_event_says_a_retry_after_the_lease_runs_the_handler_again() -> None:
    events: list[IdempotencyEvent] = []
    engine = IdempotencyEngine(FlakyStore(failures=99), IdempotencyConfig(on_event=events.append))
    first = engine.begin(request("a"))
    second = engine.begin(request("b"))
    assert isinstance(first, Proceed)
    assert isinstance(second, Proceed)

    engine.complete(first, RESPONSE)
    engine.release(second, 500)

    assert [event.name for event in events] == ["claimed", "claimed", "store_error", "store_error"]
    for event in events[2:]:
        assert event.detail is not None
        assert "gave up after 3 attempts" in event.detail
        assert "a retry after the lease will run the handler again" in event.detail


def test_a_locked_sqlite_file_delays_completion_instead_of_failing_it(tmp_path: Path) -> None:
    from idem_middleware.persistence.sqlite import SQLitePersistenceLayer

    path = tmp_path / "idempotency.sqlite3"
    layer = SQLitePersistenceLayer(path, busy_timeout_seconds=0.05)
    layer.configure(IdempotencyConfig())
    key = layer.build_idempotency_key("header:locked")
    lease = layer.save_inprogress(key, HASH)
    blocker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")  # another worker holds the write lock...
    unlock = threading.Timer(0.1, lambda: blocker.execute("COMMIT"))  # ...for a moment
    unlock.start()
    try:
        layer.save_success(lease, RESPONSE)
    finally:
        unlock.join()
        blocker.close()

    assert layer.get_record(key).response == RESPONSE
    layer.close()


# 2. A resent claim recognises its own record; two claims never share a lease ---------------


def test_a_claim_resent_after_a_lost_reply_proceeds(layer: BasePersistenceLayer, key: str) -> None:
    """The client library wrote the record, lost the reply and resent the write: the resend
    fails its condition on the request's own record.
    """
    put = layer._put_record

    def resent(record: DataRecord) -> None:
        put(record)
        put(record)

    layer._put_record = resent  # type: ignore[method-assign]

    lease = layer.save_inprogress(key, HASH)

    assert layer.get_record(key).lease_id == lease.lease_id
    layer.save_success(lease, RESPONSE)
    assert layer.get_record(key).response == RESPONSE


def test_another_claims_record_is_never_taken_for_ones_own(
    layer: BasePersistenceLayer, key: str
) -> None:
    first = layer.save_inprogress(key, HASH)

    with pytest.raises(IdempotencyItemAlreadyExistsError) as info:
        layer.save_inprogress(key, HASH)  # same key, same payload, same millisecond

    assert info.value.old_data_record is not None
    assert info.value.old_data_record.lease_id == first.lease_id


def test_claims_in_the_same_millisecond_hold_different_leases(
    layer: BasePersistenceLayer, key: str
) -> None:
    """An operator clears a stuck key and a new claim lands in the same millisecond: the old
    holder must neither complete nor release the new holder's record.
    """
    stuck = layer.save_inprogress(key, HASH)
    assert layer.remove_record(key)
    newer = layer.save_inprogress(key, OTHER_HASH)  # the clock has not moved
    assert newer.in_progress_expiry_timestamp == stuck.in_progress_expiry_timestamp
    assert newer.lease_id != stuck.lease_id

    with pytest.raises(IdempotencyLeaseLostError):
        layer.save_success(stuck, OTHER_RESPONSE)
    with pytest.raises(IdempotencyLeaseLostError):
        layer.delete_record(stuck)

    current = layer.get_record(key)
    assert current.status == STATUS_INPROGRESS
    assert current.payload_hash == OTHER_HASH
    layer.save_success(newer, RESPONSE)
    assert layer.get_record(key).response == RESPONSE


@pytest.mark.dynamodb
def test_dynamodb_claim_resent_by_botocore_proceeds(
    dynamodb_endpoint: str, dynamodb_table: str
) -> None:
    """botocore resends a PutItem whose connection dropped after DynamoDB applied it."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ConnectionClosedError

    from idem_middleware.persistence.dynamodb import DynamoDBPersistenceLayer

    client = boto3.client(
        "dynamodb",
        endpoint_url=dynamodb_endpoint,
        region_name="us-east-1",
        config=Config(retries={"mode": "standard", "max_attempts": 3}),
    )
    sent: list[str] = []

    def lose_first_reply(request: Any, **_: Any) -> None:
        sent.append(request.url)
        if len(sent) == 1:
            client._endpoint.http_session.send(request)  # DynamoDB applies the write...
            raise ConnectionClosedError(endpoint_url=request.url)  # ...the reply is lost

    client.meta.events.register("before-send.dynamodb.PutItem", lose_first_reply)
    engine = IdempotencyEngine(DynamoDBPersistenceLayer(dynamodb_table, boto3_client=client))

    decision = engine.begin(request())

    assert len(sent) == 2, "botocore resent the claim"
    assert isinstance(decision, Proceed)
    engine.complete(decision, RESPONSE)
    replay = engine.begin(request())
    assert isinstance(replay, Respond)
    assert replay.response.body == RESPONSE.body


@pytest.mark.redis
def test_redis_claim_resent_by_redis_py_proceeds(redis_url: str) -> None:
    """redis-py resends an EVALSHA whose reply was lost after Redis ran the script."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from idem_middleware.persistence.redis import RedisPersistenceLayer

    lost: list[bool] = []

    class LossyConnection(redis.Connection):
        def read_response(self, *args: Any, **kwargs: Any) -> Any:
            response = super().read_response(*args, **kwargs)
            if armed and not lost:
                lost.append(True)
                raise redis.ConnectionError("injected: connection dropped before the reply")
            return response

    armed = False
    client = redis.Redis.from_url(
        redis_url, connection_class=LossyConnection, retry=Retry(NoBackoff(), 2)
    )
    layer = RedisPersistenceLayer(client=client, key_namespace=f"test-{uuid.uuid4().hex}:")
    engine = IdempotencyEngine(layer)
    pending = engine.prepare(request())
    assert isinstance(pending, PendingClaim)
    client.ping()  # scripts and connection ready before the fault is armed
    armed = True

    decision = engine.claim(pending)

    assert lost, "the reply was lost and redis-py resent the script"
    assert isinstance(decision, Proceed)
    engine.complete(decision, RESPONSE)
    assert layer.get_record(decision.lease.idempotency_key).response == RESPONSE
    client.close()


# Records written before lease ids existed ----------------------------------------------------


def test_records_without_a_lease_id_are_read_completed_and_fenced(
    layer: BasePersistenceLayer, key: str, clock: FakeClock
) -> None:
    now = clock()
    lease_ms = int((now + LEASE) * 1000)
    write_raw_record(
        layer,
        key,
        status=STATUS_INPROGRESS,
        expiration=int(now) + EXPIRES,
        in_progress_expiration=lease_ms,
        validation=HASH,
    )

    legacy = layer.get_record(key)
    assert legacy.lease_id is None
    assert legacy.in_progress_expiry_timestamp == lease_ms
    impostor = DataRecord(
        key, STATUS_INPROGRESS, int(now) + EXPIRES, lease_ms, payload_hash=HASH, lease_id="x" * 32
    )
    with pytest.raises(IdempotencyLeaseLostError):
        layer.delete_record(impostor)  # a lease id where the record has none is another lease
    layer.save_success(legacy, RESPONSE)
    assert layer.get_record(key).response == RESPONSE


def test_an_expired_legacy_lease_is_taken_over_and_its_holder_fenced(
    layer: BasePersistenceLayer, key: str, clock: FakeClock
) -> None:
    now = clock()
    write_raw_record(
        layer,
        key,
        status=STATUS_INPROGRESS,
        expiration=int(now) + EXPIRES,
        in_progress_expiration=int((now + LEASE) * 1000),
        validation=HASH,
    )
    legacy = layer.get_record(key)
    clock.advance(LEASE + 1)

    newer = layer.save_inprogress(key, OTHER_HASH)

    with pytest.raises(IdempotencyLeaseLostError):
        layer.save_success(legacy, RESPONSE)
    layer.save_success(newer, OTHER_RESPONSE)
    assert layer.get_record(key).response == OTHER_RESPONSE


# 3. A record this version cannot read is a store error, never a 500 -------------------------

CORRUPTIONS: dict[str, dict[str, Any]] = {
    "unknown status": {"status": "DONE"},
    "unreadable data": {"status": STATUS_COMPLETED, "data": "{not a stored response"},
    "unreadable expiry": {"status": STATUS_COMPLETED, "expiration": "tomorrow"},
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
@pytest.mark.parametrize("policy", ["reject", "passthrough"])
def test_a_corrupt_record_is_a_store_error(
    persistence_layer: BasePersistenceLayer, corruption: str, policy: str
) -> None:
    fields: dict[str, Any] = {
        "expiration": int(time.time()) + EXPIRES,
        "data": RESPONSE.encode(),
        **CORRUPTIONS[corruption],
    }
    if isinstance(persistence_layer, InMemoryPersistenceLayer) and "expiry" in corruption:
        pytest.skip("the in-memory store keeps objects: an expiry is always a number")
    if is_postgres(persistence_layer) and "expiry" in corruption:
        pytest.skip("PostgreSQL's expiration column is BIGINT: an expiry is always a number")
    events: list[IdempotencyEvent] = []
    engine = IdempotencyEngine(
        persistence_layer,
        IdempotencyConfig(on_store_error=policy, on_event=events.append),  # type: ignore[arg-type]
    )
    pending = engine.prepare(request())
    assert isinstance(pending, PendingClaim)
    payload_hash = pending.payload_hash
    write_raw_record(persistence_layer, pending.idempotency_key, validation=payload_hash, **fields)

    decision = engine.claim(pending)

    if policy == "reject":
        assert isinstance(decision, Respond)
        assert decision.response.status == 503
        assert json.loads(decision.response.body)["code"] == "idempotency_store_unavailable"
    else:
        assert isinstance(decision, PassThrough)
    assert [event.name for event in events] == ["store_error"]


@pytest.mark.parametrize("corruption", ["unknown status", "unreadable expiry"])
def test_reading_a_corrupt_record_raises_a_typed_store_error(
    persistence_layer: BasePersistenceLayer, corruption: str
) -> None:
    if isinstance(persistence_layer, InMemoryPersistenceLayer):
        pytest.skip("the in-memory store keeps objects: nothing to parse")
    if is_postgres(persistence_layer) and "expiry" in corruption:
        pytest.skip("PostgreSQL's expiration column is BIGINT: an expiry is always a number")
    persistence_layer.configure(IdempotencyConfig())
    key = persistence_layer.build_idempotency_key("header:corrupt")
    fields: dict[str, Any] = {"expiration": int(time.time()) + EXPIRES, **CORRUPTIONS[corruption]}
    write_raw_record(persistence_layer, key, **fields)

    with pytest.raises(StoreRecordUnreadableError):
        persistence_layer.get_record(key)


# 4. SQLite purges in bounded batches --------------------------------------------------------


def test_sqlite_purge_off_the_request_path_is_bounded_and_makes_progress(tmp_path: Path) -> None:
    from idem_middleware.persistence.sqlite import SQLitePersistenceLayer

    layer = SQLitePersistenceLayer(tmp_path / "idempotency.sqlite3", purge_batch_size=100)
    layer.configure(IdempotencyConfig())
    clock = FakeClock()
    layer.clock = clock
    layer.check()
    expired = int(clock()) - 10
    with sqlite3.connect(layer.path) as connection:
        connection.executemany(
            f"INSERT INTO {layer.table_name} (id, status, expiration) VALUES (?, ?, ?)",
            ((f"old-{i}", STATUS_COMPLETED, expired) for i in range(250)),
        )
    batches: list[int] = []
    purge_batch = layer._purge_batch

    def counted(connection: sqlite3.Connection, cutoff: int) -> int:
        batches.append(purge_batch(connection, cutoff))
        return batches[-1]

    layer._purge_batch = counted  # type: ignore[method-assign]

    def rows() -> int:
        with sqlite3.connect(layer.path) as connection:
            count: int = connection.execute(f"SELECT COUNT(*) FROM {layer.table_name}").fetchone()[
                0
            ]
        return count

    for i in range(4):
        layer.save_inprogress(layer.build_idempotency_key(f"header:new-{i}"), HASH)
    assert layer._writer.wait_idle(10)

    # The writer's purge thread took the backlog one bounded batch (transaction) at a time,
    # until it was gone; no claim ran a purge.
    assert batches == [100, 100, 50]
    assert rows() == 4
    assert layer._next_purge == clock() + layer.purge_interval_seconds, "back to the interval"
    layer.close()


# 5. The memory store is bounded --------------------------------------------------------------


def test_memory_store_has_a_bounded_default() -> None:
    assert InMemoryPersistenceLayer().max_items == 100_000


@pytest.mark.parametrize("max_items", [0, -1, True, 2.5, "10"])
def test_memory_store_rejects_a_bad_max_items(max_items: Any) -> None:
    with pytest.raises(ValueError, match="max_items"):
        InMemoryPersistenceLayer(max_items=max_items)


def _memory_layer(max_items: int) -> tuple[InMemoryPersistenceLayer, FakeClock]:
    layer = InMemoryPersistenceLayer(max_items=max_items)
    layer.configure(
        IdempotencyConfig(expires_after_seconds=EXPIRES, in_progress_expires_after_seconds=LEASE)
    )
    clock = FakeClock()
    layer.clock = clock
    return layer, clock


def test_a_full_memory_store_evicts_expired_then_oldest_completed_never_in_progress() -> None:
    layer, clock = _memory_layer(max_items=3)
    keys = {name: layer.build_idempotency_key(f"header:{name}") for name in "abcdef"}
    in_flight = layer.save_inprogress(keys["a"], HASH)  # the oldest record, in progress
    layer.save_success(layer.save_inprogress(keys["b"], HASH), RESPONSE)
    # c: a completed record written to expire sooner than the others
    now = clock()
    layer._put_record(
        DataRecord(keys["c"], STATUS_COMPLETED, int(now) + 10, None, RESPONSE.encode(), HASH)
    )
    clock.advance(11)

    layer.save_inprogress(keys["d"], HASH)  # full: c has expired, it goes first

    assert set(layer._records) == {keys["a"], keys["b"], keys["d"]}

    layer.save_inprogress(keys["e"], HASH)  # full: b is the oldest completed record

    assert set(layer._records) == {keys["a"], keys["d"], keys["e"]}
    assert layer.record_count == 3
    layer.save_success(in_flight, RESPONSE)  # the in-progress record was never evicted
    assert layer.get_record(keys["a"]).response == RESPONSE


def test_a_memory_store_full_of_requests_in_progress_refuses_the_claim_with_503() -> None:
    layer = InMemoryPersistenceLayer(max_items=2)
    engine = IdempotencyEngine(layer)
    first, second = engine.begin(request("a")), engine.begin(request("b"))
    assert isinstance(first, Proceed)
    assert isinstance(second, Proceed)

    third = engine.begin(request("c"))

    assert isinstance(third, Respond)
    assert third.response.status == 503
    with pytest.raises(StoreFullError, match="max_items=2"):
        layer.save_inprogress(layer.build_idempotency_key("header:d"), HASH)
    assert layer.record_count == 2
    engine.complete(first, RESPONSE)
    assert isinstance(engine.begin(request("c")), Proceed), "a completed record makes room"


def test_memory_store_eviction_is_amortised_in_batches() -> None:
    layer, _ = _memory_layer(max_items=1000)
    for i in range(1000):
        layer.save_success(layer.save_inprogress(f"k{i}", HASH), RESPONSE)

    layer.save_inprogress("one-more", HASH)

    assert layer.record_count == 1000 - 10 + 1, "1% evicted at once, the oldest first"
    assert "k0" not in layer._records
    assert "k9" not in layer._records
    assert "k10" in layer._records


# 6. check() and typed store errors ----------------------------------------------------------


@pytest.mark.dynamodb
def test_dynamodb_check_passes_on_an_existing_table(
    dynamodb_client: Any, dynamodb_table: str
) -> None:
    from idem_middleware.persistence.dynamodb import DynamoDBPersistenceLayer

    DynamoDBPersistenceLayer(dynamodb_table, boto3_client=dynamodb_client).check()


@pytest.mark.dynamodb
def test_dynamodb_missing_table_is_store_not_found(dynamodb_client: Any) -> None:
    from idem_middleware.persistence.dynamodb import DynamoDBPersistenceLayer

    layer = DynamoDBPersistenceLayer("no-such-table", boto3_client=dynamodb_client)
    layer.configure(IdempotencyConfig())

    with pytest.raises(StoreNotFoundError, match="no-such-table") as info:
        layer.check()
    assert "create-table" in str(info.value)
    with pytest.raises(StoreNotFoundError):
        layer.save_inprogress(layer.build_idempotency_key("header:x"), HASH)


def test_dynamodb_unreachable_endpoint_is_store_unreachable(closed_port: int) -> None:
    import boto3
    from botocore.config import Config

    from idem_middleware.persistence.dynamodb import DynamoDBPersistenceLayer

    client = boto3.client(
        "dynamodb",
        region_name="us-east-1",
        endpoint_url=f"http://127.0.0.1:{closed_port}",
        config=Config(retries={"total_max_attempts": 1}, connect_timeout=2),
    )
    layer = DynamoDBPersistenceLayer("idempotency", boto3_client=client)

    with pytest.raises(StoreUnreachableError, match="idempotency") as info:
        layer.check()
    assert "endpoint" in str(info.value)


@pytest.fixture
def stubbed_dynamodb() -> Iterator[tuple[Any, Any]]:
    import boto3
    from botocore.stub import Stubber

    client = boto3.client("dynamodb", region_name="us-east-1")
    with Stubber(client) as stubber:
        yield client, stubber
        stubber.assert_no_pending_responses()


@pytest.mark.parametrize(
    "code", ["UnrecognizedClientException", "InvalidSignatureException", "ExpiredTokenException"]
)
def test_dynamodb_refused_credentials_are_store_not_authorised(
    stubbed_dynamodb: tuple[Any, Any], code: str
) -> None:
    from idem_middleware.persistence.dynamodb import DynamoDBPersistenceLayer

    client, stubber = stubbed_dynamodb
    stubber.add_client_error("describe_table", service_error_code=code, http_status_code=400)

    with pytest.raises(StoreNotAuthorisedError, match="credentials"):
        DynamoDBPersistenceLayer("idempotency", boto3_client=client).check()


def test_dynamodb_check_falls_back_to_an_item_read_without_describe_permission(
    stubbed_dynamodb: tuple[Any, Any],
) -> None:
    """Powertools' documented policy grants the item operations only."""
    from idem_middleware.persistence.dynamodb import DynamoDBPersistenceLayer

    client, stubber = stubbed_dynamodb
    stubber.add_client_error("describe_table", service_error_code="AccessDeniedException")
    stubber.add_response("get_item", {})

    DynamoDBPersistenceLayer("idempotency", boto3_client=client).check()


def test_sqlite_path_in_a_missing_directory_is_store_not_found(tmp_path: Path) -> None:
    from idem_middleware.persistence.sqlite import SQLitePersistenceLayer

    missing = tmp_path / "no-such-dir"
    layer = SQLitePersistenceLayer(missing / "idempotency.sqlite3")
    layer.configure(IdempotencyConfig())

    with pytest.raises(StoreNotFoundError, match="does not exist") as info:
        layer.check()
    assert str(missing) in str(info.value)
    with pytest.raises(StoreNotFoundError):
        layer.save_inprogress(layer.build_idempotency_key("header:x"), HASH)
    assert not missing.exists(), "the layer never creates directories"


def test_sqlite_check_opens_the_file_and_creates_the_table(tmp_path: Path) -> None:
    from idem_middleware.persistence.sqlite import SQLitePersistenceLayer

    path = tmp_path / "idempotency.sqlite3"
    layer = SQLitePersistenceLayer(path, table_name="records")

    layer.check()

    with sqlite3.connect(path) as connection:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
    assert "records" in tables
    layer.close()


def test_sqlite_table_made_before_lease_ids_gains_the_column(tmp_path: Path) -> None:
    from idem_middleware.persistence.sqlite import SQLitePersistenceLayer

    path = tmp_path / "idempotency.sqlite3"
    with sqlite3.connect(path) as connection:
        connection.execute(
            "CREATE TABLE idempotency_records (id TEXT PRIMARY KEY NOT NULL, status TEXT NOT NULL,"
            " expiration INTEGER, in_progress_expiration INTEGER, data TEXT, validation TEXT)"
        )
    layer = SQLitePersistenceLayer(path)
    layer.configure(IdempotencyConfig())
    key = layer.build_idempotency_key("header:x")

    lease = layer.save_inprogress(key, HASH)
    layer.save_success(lease, RESPONSE)

    assert layer.get_record(key).lease_id == lease.lease_id
    layer.close()


@pytest.mark.redis
def test_redis_check_passes_on_a_serving_server(redis_url: str) -> None:
    from idem_middleware.persistence.redis import RedisPersistenceLayer

    layer = RedisPersistenceLayer(redis_url)
    layer.check()
    layer.client.close()


def test_redis_closed_port_is_store_unreachable_quickly(
    closed_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from idem_middleware.persistence.redis import RedisPersistenceLayer

    # Promptly: a refused connection is answered at once, so what could delay the 503 is the
    # client's backoff between retries; recorded here rather than timed on a loaded machine.
    backoffs: list[float] = []
    monkeypatch.setattr("redis.retry.sleep", backoffs.append)
    port = closed_port
    layer = RedisPersistenceLayer(f"redis://127.0.0.1:{port}/0")

    with pytest.raises(StoreUnreachableError, match=f"127.0.0.1:{port}"):
        layer.check()
    assert len(backoffs) <= 2, backoffs
    assert sum(backoffs) <= 0.5, f"a down server answers 503 promptly, not after {backoffs}"


@pytest.mark.redis
def test_redis_refused_credentials_are_store_not_authorised(redis_url: str) -> None:
    import redis

    from idem_middleware.persistence.redis import RedisPersistenceLayer

    admin = redis.Redis.from_url(redis_url)
    user = f"idem-test-{uuid.uuid4().hex[:8]}"
    admin.acl_setuser(user, enabled=True, passwords=["+right-password"], commands=["+@all"])
    try:
        host_port = redis_url.split("//", 1)[1]
        layer = RedisPersistenceLayer(f"redis://{user}:wrong-password@{host_port}")
        with pytest.raises(StoreNotAuthorisedError, match="password"):
            layer.check()
    finally:
        admin.acl_deluser(user)
        admin.close()


def test_the_default_check_passes_on_the_memory_store() -> None:
    InMemoryPersistenceLayer().check()


# 7. Records need a status ---------------------------------------------------------------------


def test_a_data_record_needs_a_status() -> None:
    build: Callable[..., DataRecord] = DataRecord
    with pytest.raises(TypeError):
        build("key")
