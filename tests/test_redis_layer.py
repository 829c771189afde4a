"""RedisPersistenceLayer against a real redis-server (a private one started for these tests):
claim, collision, fencing, expiry, native TTL, store errors and concurrent claims.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from idem_middleware import IdempotencyConfig
from idem_middleware.exceptions import (
    IdempotencyItemAlreadyExistsError,
    IdempotencyItemNotFoundError,
    IdempotencyLeaseLostError,
    IdempotencyPersistenceLayerError,
)
from idem_middleware.persistence import RedisPersistenceLayer
from idem_middleware.persistence.record import STATUS_COMPLETED, STATUS_INPROGRESS, DataRecord
from idem_middleware.responses import StoredResponse

pytestmark = pytest.mark.redis

START = 1_700_000_000.25  # well before the real time: native TTLs must not depend on it
CONFIG = IdempotencyConfig(expires_after_seconds=3600, in_progress_expires_after_seconds=30)
BINARY_BODY = bytes(range(256)) + b"\x00\xff\xfe" + "é☃".encode()
RESPONSE = StoredResponse(
    status=201,
    headers=(("Content-Type", "application/octet-stream"), ("X-Trace", "caf\xe9")),
    body=BINARY_BODY,
)


class FakeClock:
    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make_layer(
    clock: FakeClock, url: str | None = None, client: redis.Redis | None = None, **options: Any
) -> RedisPersistenceLayer:
    layer = RedisPersistenceLayer(url, client=client, **options)
    # A prefix of its own per layer: tests never see each other's keys on a shared server.
    layer.configure(CONFIG, key_prefix=f"test-{uuid.uuid4().hex}")
    layer.clock = clock
    return layer


@pytest.fixture
def layer(redis_url: str, clock: FakeClock) -> Iterator[RedisPersistenceLayer]:
    layer = make_layer(clock, redis_url)
    yield layer
    layer.client.close()


# Claim and collision --------------------------------------------------------------------------


def test_claim_stores_an_inprogress_hash(layer: RedisPersistenceLayer, client: redis.Redis) -> None:
    key = layer.build_idempotency_key("order-1")
    lease = layer.save_inprogress(key, "hash-a")

    assert lease.status == STATUS_INPROGRESS
    assert client.hgetall(key) == {
        b"status": b"INPROGRESS",
        b"expiration": str(int(START) + 3600).encode(),
        b"in_progress_expiration": str(int((START + 30) * 1000)).encode(),
        b"validation": b"hash-a",
    }
    stored = layer.get_record(key)
    assert (stored.status, stored.payload_hash) == (STATUS_INPROGRESS, "hash-a")
    assert stored.in_progress_expiry_timestamp == lease.in_progress_expiry_timestamp
    assert stored.expiry_timestamp == lease.expiry_timestamp


def test_collision_returns_the_existing_record_from_the_claim_itself(
    layer: RedisPersistenceLayer, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = layer.build_idempotency_key("order-1")
    first = layer.save_inprogress(key, "hash-a")

    def no_second_read(*args: object, **kwargs: object) -> DataRecord:
        raise AssertionError("the collision must not need a separate read")

    monkeypatch.setattr(layer, "_get_record", no_second_read)
    monkeypatch.setattr(layer.client, "hgetall", no_second_read)
    with pytest.raises(IdempotencyItemAlreadyExistsError) as caught:
        layer.save_inprogress(key, "hash-b")

    existing = caught.value.old_data_record
    assert existing is not None
    assert existing.idempotency_key == key
    assert existing.status == STATUS_INPROGRESS
    assert existing.payload_hash == "hash-a"
    assert existing.in_progress_expiry_timestamp == first.in_progress_expiry_timestamp
    assert existing.expiry_timestamp == first.expiry_timestamp


def test_collision_with_a_completed_record_carries_its_response(
    layer: RedisPersistenceLayer, clock: FakeClock
) -> None:
    key = layer.build_idempotency_key("order-1")
    layer.save_success(layer.save_inprogress(key, "hash-a"), RESPONSE)
    clock.advance(600)  # past the lease: a completed record still blocks

    with pytest.raises(IdempotencyItemAlreadyExistsError) as caught:
        layer.save_inprogress(key, "hash-a")

    existing = caught.value.old_data_record
    assert existing is not None
    assert existing.status == STATUS_COMPLETED
    assert existing.response == RESPONSE


# Completion ------------------------------------------------------------------------------------


@pytest.mark.parametrize("decode_responses", [False, True])
def test_save_success_round_trips_a_binary_response_byte_exact(
    redis_url: str, clock: FakeClock, decode_responses: bool
) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=decode_responses)
    layer = make_layer(clock, client=client)
    key = layer.build_idempotency_key("order-1")
    lease = layer.save_inprogress(key, "hash-a")
    clock.advance(2)
    completed = layer.save_success(lease, RESPONSE)
    assert completed.expiry_timestamp == int(START + 2) + 3600

    # Another layer (as another worker would have) reads exactly what was written.
    reader = RedisPersistenceLayer(redis_url)
    reader.configure(CONFIG, key_prefix=layer.key_prefix)
    reader.clock = clock
    stored = reader.get_record(key, payload_hash="hash-a")
    assert stored.status == STATUS_COMPLETED
    assert stored.expiry_timestamp == completed.expiry_timestamp
    assert stored.in_progress_expiry_timestamp == lease.in_progress_expiry_timestamp
    assert stored.response is not None
    assert stored.response.body == BINARY_BODY
    assert stored.response == RESPONSE
    client.close()
    reader.client.close()


def test_completing_twice_with_one_lease_is_refused(layer: RedisPersistenceLayer) -> None:
    key = layer.build_idempotency_key("order-1")
    lease = layer.save_inprogress(key, "hash-a")
    layer.save_success(lease, RESPONSE)

    with pytest.raises(IdempotencyLeaseLostError):
        layer.save_success(lease, StoredResponse(500, (), b"other"))
    with pytest.raises(IdempotencyLeaseLostError):
        layer.delete_record(lease)
    assert layer.get_record(key).response == RESPONSE


def test_release_deletes_the_record_so_the_key_runs_again(
    layer: RedisPersistenceLayer, client: redis.Redis
) -> None:
    key = layer.build_idempotency_key("order-1")
    layer.delete_record(layer.save_inprogress(key, "hash-a"))

    assert client.exists(key) == 0
    with pytest.raises(IdempotencyItemNotFoundError):
        layer.get_record(key)
    assert layer.save_inprogress(key, "hash-b").payload_hash == "hash-b"


def test_get_record_of_unknown_key_raises_not_found(layer: RedisPersistenceLayer) -> None:
    with pytest.raises(IdempotencyItemNotFoundError):
        layer.get_record(layer.build_idempotency_key("never-seen"))


def test_key_namespace_is_put_before_every_stored_key(
    redis_url: str, clock: FakeClock, client: redis.Redis
) -> None:
    layer = make_layer(clock, redis_url, key_namespace="myapp:")
    key = layer.build_idempotency_key("order-1")
    lease = layer.save_inprogress(key, "hash-a")
    assert client.exists(f"myapp:{key}") == 1
    assert client.exists(key) == 0
    layer.save_success(lease, RESPONSE)
    assert layer.get_record(key).response == RESPONSE
    layer.client.close()


# Expiry, native TTL and lease takeover ---------------------------------------------------------


def test_keys_carry_a_native_ttl_matching_the_record_expiry(
    layer: RedisPersistenceLayer, client: redis.Redis, clock: FakeClock
) -> None:
    key = layer.build_idempotency_key("order-1")
    lease = layer.save_inprogress(key, "hash-a")
    assert lease.expiry_timestamp is not None
    # Live through the whole second expiry_timestamp: Redis drops the key when it ends.
    expected_ms = (lease.expiry_timestamp + 1) * 1000 - int(START * 1000)
    pttl = client.pttl(key)
    assert 0 < pttl <= expected_ms
    assert expected_ms - pttl < 2000  # only the real time since the claim has passed

    clock.advance(1200)
    completed = layer.save_success(lease, RESPONSE)
    assert completed.expiry_timestamp is not None
    expected_ms = (completed.expiry_timestamp + 1) * 1000 - int(clock.now * 1000)
    pttl = client.pttl(key)
    assert 0 < pttl <= expected_ms
    assert expected_ms - pttl < 2000


def test_redis_discards_the_key_when_its_ttl_ends(redis_url: str, client: redis.Redis) -> None:
    layer = RedisPersistenceLayer(redis_url)
    layer.configure(
        IdempotencyConfig(expires_after_seconds=1, in_progress_expires_after_seconds=1),
        key_prefix=f"test-{uuid.uuid4().hex}",
    )
    now = time.time()
    layer.clock = lambda: now + (1 - now % 1) - 0.1  # 0.1 s before a second ends: TTL ~1.1 s
    key = layer.build_idempotency_key("order-1")
    layer.save_inprogress(key, "hash-a")
    assert 0 < client.pttl(key) <= 1100
    deadline = time.monotonic() + 3
    while client.exists(key) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.exists(key) == 0
    layer.client.close()


def test_completed_record_expires_with_the_clock(
    layer: RedisPersistenceLayer, clock: FakeClock
) -> None:
    key = layer.build_idempotency_key("order-1")
    completed = layer.save_success(layer.save_inprogress(key, "hash-a"), RESPONSE)
    assert completed.expiry_timestamp is not None

    clock.now = completed.expiry_timestamp + 0.999  # the last second it is live
    assert layer.get_record(key).status == STATUS_COMPLETED
    with pytest.raises(IdempotencyItemAlreadyExistsError):
        layer.save_inprogress(key, "hash-a")

    clock.now = completed.expiry_timestamp + 1.0  # Redis still has the key; it is dead anyway
    with pytest.raises(IdempotencyItemNotFoundError):
        layer.get_record(key)
    lease = layer.save_inprogress(key, "hash-b")
    stored = layer.get_record(key)
    assert (stored.status, stored.payload_hash, stored.response_data) == (
        STATUS_INPROGRESS,
        "hash-b",
        None,
    )
    assert stored.in_progress_expiry_timestamp == lease.in_progress_expiry_timestamp


def test_lease_is_taken_over_only_after_it_expires(
    layer: RedisPersistenceLayer, clock: FakeClock
) -> None:
    key = layer.build_idempotency_key("order-1")
    first = layer.save_inprogress(key, "hash-a")

    clock.advance(29.9)
    with pytest.raises(IdempotencyItemAlreadyExistsError):
        layer.save_inprogress(key, "hash-b")

    clock.advance(0.2)
    second = layer.save_inprogress(key, "hash-b")
    assert second.in_progress_expiry_timestamp is not None
    assert first.in_progress_expiry_timestamp is not None
    assert second.in_progress_expiry_timestamp > first.in_progress_expiry_timestamp
    assert layer.get_record(key).payload_hash == "hash-b"


def test_stale_owner_cannot_complete_a_taken_over_record(
    layer: RedisPersistenceLayer, clock: FakeClock
) -> None:
    key = layer.build_idempotency_key("order-1")
    stale = layer.save_inprogress(key, "hash-a")
    clock.advance(31)
    fresh = layer.save_inprogress(key, "hash-b")

    with pytest.raises(IdempotencyLeaseLostError):
        layer.save_success(stale, StoredResponse(200, (), b"stale"))

    stored = layer.get_record(key)
    assert stored.status == STATUS_INPROGRESS
    assert stored.payload_hash == "hash-b"
    assert stored.in_progress_expiry_timestamp == fresh.in_progress_expiry_timestamp
    assert stored.response_data is None
    layer.save_success(fresh, RESPONSE)
    assert layer.get_record(key).response == RESPONSE


def test_stale_owner_cannot_release_a_taken_over_record(
    layer: RedisPersistenceLayer, clock: FakeClock
) -> None:
    key = layer.build_idempotency_key("order-1")
    stale = layer.save_inprogress(key, "hash-a")
    clock.advance(31)
    fresh = layer.save_inprogress(key, "hash-b")

    with pytest.raises(IdempotencyLeaseLostError):
        layer.delete_record(stale)

    stored = layer.get_record(key)
    assert stored.payload_hash == "hash-b"
    assert stored.in_progress_expiry_timestamp == fresh.in_progress_expiry_timestamp
    layer.delete_record(fresh)
    with pytest.raises(IdempotencyItemNotFoundError):
        layer.get_record(key)


def test_owner_whose_lease_ran_out_unclaimed_may_still_complete(
    layer: RedisPersistenceLayer, clock: FakeClock
) -> None:
    key = layer.build_idempotency_key("order-1")
    lease = layer.save_inprogress(key, "hash-a")
    clock.advance(120)  # lease expired, but nobody took the key over
    layer.save_success(lease, RESPONSE)
    assert layer.get_record(key).response == RESPONSE


def test_scripts_are_reloaded_after_script_flush(
    layer: RedisPersistenceLayer, client: redis.Redis
) -> None:
    key = layer.build_idempotency_key("order-1")
    layer.save_inprogress(key, "hash-a")
    client.script_flush()  # e.g. a Redis restart or failover: EVALSHA answers NOSCRIPT
    with pytest.raises(IdempotencyItemAlreadyExistsError):
        layer.save_inprogress(key, "hash-b")
    assert layer.get_record(key).payload_hash == "hash-a"


def test_url_and_client_are_exclusive(client: redis.Redis) -> None:
    with pytest.raises(ValueError, match="either url or client"):
        RedisPersistenceLayer("redis://127.0.0.1:1/0", client=client)


# Store errors ----------------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # nothing listens once the socket is closed


def all_operations(layer: RedisPersistenceLayer) -> list[tuple[str, object]]:
    key = layer.build_idempotency_key("order-1")
    lease = DataRecord(key, STATUS_INPROGRESS, int(START) + 10, int(START * 1000) + 10)
    return [
        ("claim", lambda: layer.save_inprogress(key, "hash-a")),
        ("read", lambda: layer.get_record(key)),
        ("complete", lambda: layer.save_success(lease, RESPONSE)),
        ("release", lambda: layer.delete_record(lease)),
    ]


def test_closed_port_is_a_persistence_error(clock: FakeClock) -> None:
    layer = make_layer(clock, f"redis://127.0.0.1:{closed_port()}/0")
    started = time.monotonic()
    for name, operation in all_operations(layer):
        with pytest.raises(IdempotencyPersistenceLayerError) as caught:
            operation()  # type: ignore[operator]
        assert isinstance(caught.value.__cause__, redis.ConnectionError), name
        assert caught.value.status == 503
    assert time.monotonic() - started < 10


def test_server_that_never_answers_is_a_persistence_error(clock: FakeClock) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)  # accepts connections (via the backlog) and never replies
        port = listener.getsockname()[1]
        layer = make_layer(
            clock,
            f"redis://127.0.0.1:{port}/0",
            socket_timeout_seconds=0.1,
            socket_connect_timeout_seconds=0.1,
        )
        started = time.monotonic()
        with pytest.raises(IdempotencyPersistenceLayerError) as caught:
            layer.save_inprogress(layer.build_idempotency_key("order-1"), "hash-a")
        assert isinstance(caught.value.__cause__, redis.RedisError)
        assert isinstance(caught.value.__cause__, (redis.TimeoutError, redis.ConnectionError))
        assert time.monotonic() - started < 10
        layer.client.close()


# Concurrency -----------------------------------------------------------------------------------


def test_fifty_threads_claiming_one_key_make_exactly_one_winner(
    layer: RedisPersistenceLayer,
) -> None:
    key = layer.build_idempotency_key("contended")
    threads_count = 50
    barrier = threading.Barrier(threads_count)
    winners: list[str] = []
    seen_by_losers: list[str | None] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def claim(index: int) -> None:
        barrier.wait()
        try:
            layer.save_inprogress(key, f"thread-{index}")
        except IdempotencyItemAlreadyExistsError as exc:
            with lock:
                record = exc.old_data_record
                seen_by_losers.append(None if record is None else record.payload_hash)
        except BaseException as exc:  # collected and asserted below
            with lock:
                errors.append(exc)
        else:
            with lock:
                winners.append(f"thread-{index}")

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert errors == []
    assert len(winners) == 1
    assert len(seen_by_losers) == threads_count - 1
    assert set(seen_by_losers) == {winners[0]}
    assert layer.get_record(key).payload_hash == winners[0]


def test_concurrent_takeover_of_an_expired_lease_has_one_winner(
    layer: RedisPersistenceLayer, clock: FakeClock
) -> None:
    key = layer.build_idempotency_key("crashed")
    layer.save_inprogress(key, "crashed-owner")
    clock.advance(31)  # the first owner "crashed": its lease has run out
    threads_count = 20
    barrier = threading.Barrier(threads_count)
    outcomes: list[bool] = []

    def claim(index: int) -> None:
        barrier.wait()
        try:
            layer.save_inprogress(key, f"thread-{index}")
        except IdempotencyItemAlreadyExistsError:
            outcomes.append(False)
        else:
            outcomes.append(True)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert sorted(outcomes) == [False] * (threads_count - 1) + [True]
    assert layer.get_record(key).payload_hash != "crashed-owner"
