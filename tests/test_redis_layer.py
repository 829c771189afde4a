"""RedisPersistenceLayer against a real redis-server (a private one started for these tests):
claim, collision, fencing, expiry, native TTL, store errors and concurrent claims.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from idem_middleware import IdempotencyConfig
from idem_middleware.exceptions import (
    IdempotencyItemAlreadyExistsError,
    IdempotencyPersistenceLayerError,
)
from idem_middleware.persistence import RedisPersistenceLayer
from idem_middleware.persistence.record import STATUS_INPROGRESS, DataRecord
from idem_middleware.responses import StoredResponse
from tests.support.backends import FakeClock

pytestmark = pytest.mark.redis

START = 1_700_000_000.25  # well before the real time: native TTLs must not depend on it
CONFIG = IdempotencyConfig(expires_after_seconds=3600, in_progress_expires_after_seconds=30)
BINARY_BODY = bytes(range(256)) + b"\x00\xff\xfe" + "é☃".encode()
RESPONSE = StoredResponse(
    status=201,
    headers=(("Content-Type", "application/octet-stream"), ("X-Trace", "caf\xe9")),
    body=BINARY_BODY,
)


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


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
    assert lease.lease_id is not None
    assert client.hgetall(key) == {
        b"status": b"INPROGRESS",
        b"expiration": str(int(START) + 3600).encode(),
        b"in_progress_expiration": str(int((START + 30) * 1000)).encode(),
        b"validation": b"hash-a",
        b"lease_id": lease.lease_id.encode(),
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


# Completion ------------------------------------------------------------------------------------


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


def all_operations(layer: RedisPersistenceLayer) -> list[tuple[str, object]]:
    key = layer.build_idempotency_key("order-1")
    lease = DataRecord(key, STATUS_INPROGRESS, int(START) + 10, int(START * 1000) + 10)
    return [
        ("claim", lambda: layer.save_inprogress(key, "hash-a")),
        ("read", lambda: layer.get_record(key)),
        ("complete", lambda: layer.save_success(lease, RESPONSE)),
        ("release", lambda: layer.delete_record(lease)),
    ]


def test_closed_port_is_a_persistence_error(clock: FakeClock, closed_port: int) -> None:
    layer = make_layer(clock, f"redis://127.0.0.1:{closed_port}/0")
    started = time.monotonic()
    for name, operation in all_operations(layer):
        with pytest.raises(IdempotencyPersistenceLayerError) as caught:
            operation()  # type: ignore[operator]
        assert isinstance(caught.value.__cause__, redis.ConnectionError), name
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
