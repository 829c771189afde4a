"""The persistence-layer contract, run over every backend in ``tests.support.backends``.

Time moves through the layer's ``clock`` (a :class:`FakeClock`), never by sleeping: the layers
take "now" from it for expiries, leases and the store's own condition values.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from idem_middleware.config import IdempotencyConfig
from idem_middleware.exceptions import (
    IdempotencyItemAlreadyExistsError,
    IdempotencyItemNotFoundError,
    IdempotencyLeaseLostError,
    IdempotencyPayloadMismatchError,
)
from idem_middleware.persistence.base import BasePersistenceLayer
from idem_middleware.persistence.memory import InMemoryPersistenceLayer
from idem_middleware.persistence.record import STATUS_COMPLETED, STATUS_INPROGRESS, DataRecord
from idem_middleware.responses import StoredResponse
from tests.support.backends import FakeClock

EXPIRES = 3600
LEASE = 60
HASH = "a" * 64
OTHER_HASH = "b" * 64
PRIMITIVES = ("_put_record", "_get_record", "_update_record", "_delete_record")

JSON_RESPONSE = StoredResponse(
    status=201,
    headers=(("Content-Type", "application/json"), ("Location", "/orders/1")),
    body=b'{"id":1}',
)

ConfigureLayer = Callable[..., BasePersistenceLayer]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def configure(persistence_layer: BasePersistenceLayer, clock: FakeClock) -> ConfigureLayer:
    """Configure the backend's layer (short expiries, the fake clock); options override."""

    def configure(**options: Any) -> BasePersistenceLayer:
        settings: dict[str, Any] = {
            "expires_after_seconds": EXPIRES,
            "in_progress_expires_after_seconds": LEASE,
            **options,
        }
        persistence_layer.configure(IdempotencyConfig(**settings))
        persistence_layer.clock = clock
        return persistence_layer

    return configure


@pytest.fixture
def layer(configure: ConfigureLayer) -> BasePersistenceLayer:
    return configure()


@pytest.fixture
def key(layer: BasePersistenceLayer) -> str:
    return layer.build_idempotency_key("header:order-1")


class PrimitiveCalls:
    """Counts calls of a layer's four store primitives by wrapping them on the instance."""

    def __init__(self, layer: BasePersistenceLayer) -> None:
        self.counts: Counter[str] = Counter()
        for name in PRIMITIVES:
            setattr(layer, name, self._counted(name, getattr(layer, name)))

    def _counted(self, name: str, primitive: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.counts[name] += 1
            return primitive(*args, **kwargs)

        return counted

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def claim_collision(layer: BasePersistenceLayer, key: str, payload_hash: str = HASH) -> DataRecord:
    """The record a colliding claim reports; fails the test if the claim succeeds."""
    with pytest.raises(IdempotencyItemAlreadyExistsError) as info:
        layer.save_inprogress(key, payload_hash)
    assert info.value.old_data_record is not None, "the collision must carry the existing record"
    return info.value.old_data_record


# Claim --------------------------------------------------------------------------------------


def test_claim_returns_an_inprogress_lease(
    layer: BasePersistenceLayer, key: str, clock: FakeClock
) -> None:
    lease = layer.save_inprogress(key, HASH)

    assert lease.idempotency_key == key
    assert lease.status == STATUS_INPROGRESS
    assert lease.expiry_timestamp == int(clock.now) + EXPIRES
    assert lease.in_progress_expiry_timestamp == int((clock.now + LEASE) * 1000)
    assert lease.payload_hash == HASH
    assert lease.response is None

    stored = layer.get_record(key)
    assert stored.status == STATUS_INPROGRESS
    assert stored.expiry_timestamp == lease.expiry_timestamp
    assert stored.in_progress_expiry_timestamp == lease.in_progress_expiry_timestamp
    assert stored.payload_hash == HASH
    assert stored.response_data is None


def test_unknown_key_is_not_found(layer: BasePersistenceLayer, key: str) -> None:
    with pytest.raises(IdempotencyItemNotFoundError):
        layer.get_record(key)


def test_keys_are_independent(layer: BasePersistenceLayer) -> None:
    first = layer.build_idempotency_key("header:a")
    second = layer.build_idempotency_key("header:b")
    assert first != second
    layer.save_inprogress(first, HASH)
    layer.save_inprogress(second, OTHER_HASH)
    assert layer.get_record(first).payload_hash == HASH
    assert layer.get_record(second).payload_hash == OTHER_HASH


def test_collision_carries_the_inprogress_record(layer: BasePersistenceLayer, key: str) -> None:
    lease = layer.save_inprogress(key, HASH)

    existing = claim_collision(layer, key, OTHER_HASH)

    assert existing.idempotency_key == key
    assert existing.status == STATUS_INPROGRESS
    assert existing.payload_hash == HASH  # the first request's, not the claimant's
    assert existing.in_progress_expiry_timestamp == lease.in_progress_expiry_timestamp
    assert existing.expiry_timestamp == lease.expiry_timestamp
    assert layer.get_record(key).payload_hash == HASH, "a failed claim must not write"


def test_collision_carries_the_completed_record_and_its_response(
    layer: BasePersistenceLayer, key: str
) -> None:
    layer.save_success(layer.save_inprogress(key, HASH), JSON_RESPONSE)

    existing = claim_collision(layer, key)

    assert existing.status == STATUS_COMPLETED
    assert existing.payload_hash == HASH
    assert existing.response == JSON_RESPONSE


# Completion ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response",
    [
        pytest.param(JSON_RESPONSE, id="json"),
        pytest.param(
            StoredResponse(
                200, (("Content-Type", "application/octet-stream"),), bytes(range(256)) * 8
            ),
            id="binary-body",
        ),
        pytest.param(StoredResponse(200, (("Content-Type", "text/plain"),), b""), id="empty-body"),
        pytest.param(StoredResponse(204, (), b""), id="no-headers-204"),
        pytest.param(
            StoredResponse(
                200,
                (
                    ("X-Trace", "1"),
                    ("Link", "</a>; rel=next"),
                    ("x-trace", "2"),
                    ("Link", "</b>; rel=prev"),
                    ("X-Latin-1", "caf\xe9 \xff"),
                    ("X-Empty", ""),
                ),
                "héllo wörld ✓ 🎉".encode(),
            ),
            id="headers-order-duplicates-utf8-body",
        ),
        pytest.param(
            StoredResponse(200, (("Content-Type", "video/mp4"),), b"", body_omitted=True),
            id="body-omitted",
        ),
        pytest.param(
            StoredResponse(409, (("Content-Type", "application/json"),), b'{"error":"taken"}'),
            id="4xx",
        ),
    ],
)
def test_completed_record_replays_the_exact_response(
    layer: BasePersistenceLayer, key: str, clock: FakeClock, response: StoredResponse
) -> None:
    lease = layer.save_inprogress(key, HASH)
    clock.advance(2)

    completed = layer.save_success(lease, response)

    assert completed.status == STATUS_COMPLETED
    assert completed.expiry_timestamp == int(clock.now) + EXPIRES
    stored = layer.get_record(key, HASH)
    assert stored.status == STATUS_COMPLETED
    assert stored.payload_hash == HASH
    assert stored.expiry_timestamp == completed.expiry_timestamp
    assert stored.response == response
    # What a fresh process would decode from the stored data, not just this process's object.
    assert stored.response_data is not None
    decoded = StoredResponse.decode(stored.response_data)
    assert decoded == response
    assert decoded.body == response.body
    assert list(decoded.headers) == list(response.headers)


# Expiry -------------------------------------------------------------------------------------


def test_completed_record_expires_and_the_key_can_be_claimed_again(
    layer: BasePersistenceLayer, key: str, clock: FakeClock
) -> None:
    layer.save_success(layer.save_inprogress(key, HASH), JSON_RESPONSE)

    clock.advance(EXPIRES)  # the last second of its life
    assert layer.get_record(key).status == STATUS_COMPLETED
    assert claim_collision(layer, key).status == STATUS_COMPLETED

    clock.advance(1)
    with pytest.raises(IdempotencyItemNotFoundError):
        layer.get_record(key)
    lease = layer.save_inprogress(key, OTHER_HASH)
    assert lease.status == STATUS_INPROGRESS
    stored = layer.get_record(key)
    assert stored.status == STATUS_INPROGRESS
    assert stored.payload_hash == OTHER_HASH
    assert stored.response_data is None


def test_live_lease_blocks_and_an_expired_lease_can_be_taken_over(
    layer: BasePersistenceLayer, key: str, clock: FakeClock
) -> None:
    first = layer.save_inprogress(key, HASH)

    clock.advance(LEASE)  # the lease's last millisecond
    assert claim_collision(layer, key).in_progress_expiry_timestamp == (
        first.in_progress_expiry_timestamp
    )

    clock.advance(1)
    second = layer.save_inprogress(key, OTHER_HASH)

    assert second.in_progress_expiry_timestamp is not None
    assert first.in_progress_expiry_timestamp is not None
    assert second.in_progress_expiry_timestamp > first.in_progress_expiry_timestamp
    stored = layer.get_record(key)
    assert stored.status == STATUS_INPROGRESS
    assert stored.payload_hash == OTHER_HASH
    assert stored.in_progress_expiry_timestamp == second.in_progress_expiry_timestamp


def test_an_expired_lease_does_not_make_a_completed_record_claimable(
    layer: BasePersistenceLayer, key: str, clock: FakeClock
) -> None:
    layer.save_success(layer.save_inprogress(key, HASH), JSON_RESPONSE)
    clock.advance(LEASE * 10)  # far past the lease, well within the record's expiry

    assert claim_collision(layer, key).status == STATUS_COMPLETED
    assert layer.get_record(key).response == JSON_RESPONSE


# Fencing ------------------------------------------------------------------------------------


def test_stale_owner_cannot_complete_or_release_the_new_owners_record(
    layer: BasePersistenceLayer, key: str, clock: FakeClock
) -> None:
    stale = layer.save_inprogress(key, HASH)
    clock.advance(LEASE + 1)
    current = layer.save_inprogress(key, HASH)

    with pytest.raises(IdempotencyLeaseLostError):
        layer.save_success(stale, StoredResponse(200, (), b"stale"))
    with pytest.raises(IdempotencyLeaseLostError):
        layer.delete_record(stale)

    stored = layer.get_record(key)
    assert stored.status == STATUS_INPROGRESS
    assert stored.in_progress_expiry_timestamp == current.in_progress_expiry_timestamp

    layer.save_success(current, JSON_RESPONSE)
    with pytest.raises(IdempotencyLeaseLostError):
        layer.save_success(stale, StoredResponse(200, (), b"stale"))
    with pytest.raises(IdempotencyLeaseLostError):
        layer.delete_record(stale)
    assert layer.get_record(key).response == JSON_RESPONSE


def test_stale_owner_cannot_resurrect_a_record_the_new_owner_released(
    layer: BasePersistenceLayer, key: str, clock: FakeClock
) -> None:
    stale = layer.save_inprogress(key, HASH)
    clock.advance(LEASE + 1)
    layer.delete_record(layer.save_inprogress(key, HASH))

    with pytest.raises(IdempotencyLeaseLostError):
        layer.save_success(stale, JSON_RESPONSE)
    with pytest.raises(IdempotencyLeaseLostError):
        layer.delete_record(stale)
    with pytest.raises(IdempotencyItemNotFoundError):
        layer.get_record(key)


def test_owner_whose_lease_ran_out_unchallenged_still_completes(
    layer: BasePersistenceLayer, key: str, clock: FakeClock
) -> None:
    lease = layer.save_inprogress(key, HASH)
    clock.advance(LEASE + 5)

    layer.save_success(lease, JSON_RESPONSE)

    assert layer.get_record(key).response == JSON_RESPONSE


def test_a_resent_completion_is_accepted_but_a_different_one_is_refused(
    layer: BasePersistenceLayer, key: str
) -> None:
    """A client library may resend a completion whose reply was lost; the store then holds
    exactly this completion, so it is not reported as a lost lease. Another response is.
    """
    lease = layer.save_inprogress(key, HASH)
    layer.save_success(lease, JSON_RESPONSE)

    layer.save_success(lease, JSON_RESPONSE)
    with pytest.raises(IdempotencyLeaseLostError):
        layer.save_success(lease, StoredResponse(500, (), b"other"))
    assert layer.get_record(key).response == JSON_RESPONSE


def test_a_completed_record_cannot_be_released(layer: BasePersistenceLayer, key: str) -> None:
    lease = layer.save_inprogress(key, HASH)
    layer.save_success(lease, JSON_RESPONSE)

    with pytest.raises(IdempotencyLeaseLostError):
        layer.delete_record(lease)

    assert layer.get_record(key).response == JSON_RESPONSE


def test_owner_release_frees_the_key(layer: BasePersistenceLayer, key: str) -> None:
    lease = layer.save_inprogress(key, HASH)

    layer.delete_record(lease)

    with pytest.raises(IdempotencyItemNotFoundError):
        layer.get_record(key)
    again = layer.save_inprogress(key, OTHER_HASH)
    assert layer.get_record(key).in_progress_expiry_timestamp == again.in_progress_expiry_timestamp


# Payload validation -------------------------------------------------------------------------


def test_payload_mismatch_is_rejected_and_leaves_the_record_untouched(
    layer: BasePersistenceLayer, key: str
) -> None:
    layer.save_success(layer.save_inprogress(key, HASH), JSON_RESPONSE)

    with pytest.raises(IdempotencyPayloadMismatchError):
        layer.get_record(key, OTHER_HASH)

    assert layer.get_record(key, HASH).response == JSON_RESPONSE
    assert layer.get_record(key).payload_hash == HASH


def test_payload_mismatch_on_an_inprogress_record(layer: BasePersistenceLayer, key: str) -> None:
    layer.save_inprogress(key, HASH)

    with pytest.raises(IdempotencyPayloadMismatchError):
        layer.get_record(key, OTHER_HASH)
    assert layer.get_record(key, HASH).status == STATUS_INPROGRESS


# Local cache --------------------------------------------------------------------------------


def test_local_cache_replays_a_completed_record_without_store_calls(
    configure: ConfigureLayer,
) -> None:
    layer = configure(use_local_cache=True)
    key = layer.build_idempotency_key("header:cached")
    layer.save_success(layer.save_inprogress(key, HASH), JSON_RESPONSE)
    calls = PrimitiveCalls(layer)

    cached = layer.get_cached_record(key)
    assert cached is not None
    assert cached.status == STATUS_COMPLETED
    assert cached.response == JSON_RESPONSE
    assert layer.get_record(key, HASH).response == JSON_RESPONSE
    assert claim_collision(layer, key).response == JSON_RESPONSE
    with pytest.raises(IdempotencyPayloadMismatchError):
        layer.get_record(key, OTHER_HASH)

    assert calls.total == 0, calls.counts


def test_local_cache_never_serves_an_expired_record(
    configure: ConfigureLayer, clock: FakeClock
) -> None:
    layer = configure(use_local_cache=True)
    key = layer.build_idempotency_key("header:cached")
    layer.save_success(layer.save_inprogress(key, HASH), JSON_RESPONSE)
    calls = PrimitiveCalls(layer)

    clock.advance(EXPIRES)
    assert layer.get_cached_record(key) is not None
    clock.advance(1)
    assert layer.get_cached_record(key) is None

    with pytest.raises(IdempotencyItemNotFoundError):
        layer.get_record(key)
    assert calls.counts["_get_record"] == 1
    lease = layer.save_inprogress(key, OTHER_HASH)
    assert calls.counts["_put_record"] == 1
    assert lease.payload_hash == OTHER_HASH


def test_local_cache_holds_only_completed_records(configure: ConfigureLayer) -> None:
    layer = configure(use_local_cache=True)
    key = layer.build_idempotency_key("header:in-flight")
    lease = layer.save_inprogress(key, HASH)
    calls = PrimitiveCalls(layer)

    assert layer.get_record(key).status == STATUS_INPROGRESS
    assert layer.get_record(key).status == STATUS_INPROGRESS
    assert layer.get_cached_record(key) is None
    assert calls.counts["_get_record"] == 2

    layer.delete_record(lease)
    assert layer.get_cached_record(key) is None
    with pytest.raises(IdempotencyItemNotFoundError):
        layer.get_record(key)


def test_local_cache_is_refilled_from_the_store_and_bounded(configure: ConfigureLayer) -> None:
    layer = configure(use_local_cache=True, local_cache_max_items=1)
    first = layer.build_idempotency_key("header:first")
    second = layer.build_idempotency_key("header:second")
    layer.save_success(layer.save_inprogress(first, HASH), JSON_RESPONSE)
    layer.save_success(layer.save_inprogress(second, HASH), JSON_RESPONSE)
    calls = PrimitiveCalls(layer)

    assert layer.get_cached_record(first) is None  # evicted: the cache holds one record
    assert layer.get_record(first).response == JSON_RESPONSE
    assert calls.counts["_get_record"] == 1
    assert layer.get_record(first).response == JSON_RESPONSE
    assert calls.counts["_get_record"] == 1, "the record read from the store is now cached"
    assert layer.get_cached_record(second) is None


# Concurrency --------------------------------------------------------------------------------


def _race(
    layer: BasePersistenceLayer, key: str, threads: int
) -> tuple[list[str], list[DataRecord]]:
    """``threads`` claims of ``key`` released at once; returns the winners' payload hashes and
    the records the losers were told about.
    """
    barrier = threading.Barrier(threads)
    winners: list[str] = []
    seen: list[DataRecord] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def claim(index: int) -> None:
        payload_hash = f"{index:064x}"
        barrier.wait()
        try:
            layer.save_inprogress(key, payload_hash)
        except IdempotencyItemAlreadyExistsError as exc:
            with lock:
                seen.append(exc.old_data_record)  # type: ignore[arg-type]
        except BaseException as exc:
            with lock:
                errors.append(exc)
        else:
            with lock:
                winners.append(payload_hash)

    workers = [threading.Thread(target=claim, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert not errors, errors
    return winners, seen


def test_fifty_concurrent_claims_have_exactly_one_winner(
    layer: BasePersistenceLayer, key: str
) -> None:
    winners, seen = _race(layer, key, 50)

    assert len(winners) == 1
    assert len(seen) == 49
    assert all(record is not None for record in seen)
    assert {record.payload_hash for record in seen} == set(winners)
    assert layer.get_record(key).payload_hash == winners[0]


def test_fifty_concurrent_takeovers_of_an_expired_lease_have_exactly_one_winner(
    layer: BasePersistenceLayer, key: str, clock: FakeClock
) -> None:
    crashed = layer.save_inprogress(key, HASH)
    clock.advance(LEASE + 1)

    winners, seen = _race(layer, key, 50)

    assert len(winners) == 1
    assert len(seen) == 49
    assert {record.payload_hash for record in seen} == set(winners)
    with pytest.raises(IdempotencyLeaseLostError):
        layer.save_success(crashed, JSON_RESPONSE)
    assert layer.get_record(key).payload_hash == winners[0]


# Configuration ------------------------------------------------------------------------------


def test_a_layer_serves_one_config(persistence_layer: BasePersistenceLayer) -> None:
    config = IdempotencyConfig(expires_after_seconds=100)
    persistence_layer.configure(config)
    persistence_layer.configure(IdempotencyConfig(expires_after_seconds=100))  # equal: fine

    with pytest.raises(ValueError, match="already configured"):
        persistence_layer.configure(IdempotencyConfig(expires_after_seconds=200))
    assert persistence_layer.config is config


def test_key_prefix_namespaces_stored_keys(persistence_layer: BasePersistenceLayer) -> None:
    persistence_layer.configure(IdempotencyConfig(key_prefix="billing"))

    key = persistence_layer.build_idempotency_key("header:abc")

    assert key.startswith("billing#")
    assert "abc" not in key, "raw client keys are hashed"
    assert key != persistence_layer.build_idempotency_key("header:abc", scope="tenant-2")


# Memory layer -------------------------------------------------------------------------------


def test_memory_layer_sweeps_expired_records() -> None:
    clock = FakeClock()
    layer = InMemoryPersistenceLayer(sweep_interval_seconds=100)
    layer.configure(IdempotencyConfig(expires_after_seconds=60))
    layer.clock = clock
    start = clock.now

    for name in ("a", "b", "c"):  # expire at start + 60
        layer.save_inprogress(layer.build_idempotency_key(f"header:{name}"), HASH)
    assert layer.record_count == 3

    clock.now = start + 70  # a, b, c have expired, but the next sweep is not due
    layer.save_inprogress(layer.build_idempotency_key("header:d"), HASH)  # expires start + 130
    assert layer.record_count == 4

    clock.now = start + 100  # the sweep is due: only d, and e itself, are live
    layer.save_inprogress(layer.build_idempotency_key("header:e"), HASH)
    assert layer.record_count == 2
    with pytest.raises(IdempotencyItemNotFoundError):
        layer.get_record(layer.build_idempotency_key("header:a"))
    assert layer.get_record(layer.build_idempotency_key("header:d")).status == STATUS_INPROGRESS


def test_an_empty_memory_layer_is_truthy() -> None:
    assert InMemoryPersistenceLayer()


# Operator removal (remove_record: unfenced) --------------------------------------------------


def test_remove_record_deletes_a_completed_record_so_the_key_runs_again(
    layer: BasePersistenceLayer, key: str
) -> None:
    layer.save_success(layer.save_inprogress(key, HASH), JSON_RESPONSE)

    assert layer.remove_record(key) is True

    with pytest.raises(IdempotencyItemNotFoundError):
        layer.get_record(key)
    lease = layer.save_inprogress(key, OTHER_HASH)
    assert lease.payload_hash == OTHER_HASH
    assert layer.get_record(key).status == STATUS_INPROGRESS


def test_remove_record_clears_a_stuck_inprogress_record_whatever_its_lease(
    layer: BasePersistenceLayer, key: str, clock: FakeClock
) -> None:
    stuck = layer.save_inprogress(key, HASH)

    assert layer.remove_record(key) is True

    with pytest.raises(IdempotencyItemNotFoundError):
        layer.get_record(key)
    # The request that held the key cannot write its record back, nor release a newer one.
    with pytest.raises(IdempotencyLeaseLostError):
        layer.save_success(stuck, JSON_RESPONSE)
    with pytest.raises(IdempotencyItemNotFoundError):
        layer.get_record(key)
    clock.advance(1)  # a later claim holds a later lease token
    newer = layer.save_inprogress(key, OTHER_HASH)
    with pytest.raises(IdempotencyLeaseLostError):
        layer.delete_record(stuck)
    assert layer.get_record(key).in_progress_expiry_timestamp == newer.in_progress_expiry_timestamp


def test_remove_record_of_an_unknown_key_reports_nothing_removed(
    layer: BasePersistenceLayer, key: str
) -> None:
    other = layer.build_idempotency_key("header:order-2")
    layer.save_success(layer.save_inprogress(other, HASH), JSON_RESPONSE)

    assert layer.remove_record(key) is False
    assert layer.remove_record(key) is False
    assert layer.get_record(other).response == JSON_RESPONSE, "other records are untouched"


def test_remove_record_twice_removes_once(layer: BasePersistenceLayer, key: str) -> None:
    layer.save_inprogress(key, HASH)

    assert layer.remove_record(key) is True
    assert layer.remove_record(key) is False


def test_remove_record_evicts_the_local_cache(configure: ConfigureLayer) -> None:
    layer = configure(use_local_cache=True)
    key = layer.build_idempotency_key("header:cached")
    layer.save_success(layer.save_inprogress(key, HASH), JSON_RESPONSE)
    assert layer.get_cached_record(key) is not None

    assert layer.remove_record(key) is True

    assert layer.get_cached_record(key) is None
    with pytest.raises(IdempotencyItemNotFoundError):
        layer.get_record(key)
    assert layer.save_inprogress(key, OTHER_HASH).payload_hash == OTHER_HASH
