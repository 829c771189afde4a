"""Lease renewal, over every backend: a fenced write that keeps a running request's key its own.

Time moves through the layer's ``clock`` (a :class:`FakeClock`), never by sleeping.
"""

from __future__ import annotations

import pytest

from idem_middleware.config import IdempotencyConfig
from idem_middleware.exceptions import (
    IdempotencyItemAlreadyExistsError,
    IdempotencyItemNotFoundError,
    IdempotencyLeaseLostError,
)
from idem_middleware.persistence.base import BasePersistenceLayer
from idem_middleware.persistence.record import STATUS_COMPLETED, STATUS_INPROGRESS
from idem_middleware.responses import StoredResponse
from tests.support.backends import FakeClock

EXPIRES = 3600
LEASE = 10
HASH = "a" * 64
CREATED = StoredResponse(201, (("Content-Type", "application/json"),), b'{"id":1}')


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def layer(persistence_layer: BasePersistenceLayer, clock: FakeClock) -> BasePersistenceLayer:
    persistence_layer.configure(
        IdempotencyConfig(expires_after_seconds=EXPIRES, in_progress_expires_after_seconds=LEASE)
    )
    persistence_layer.clock = clock
    return persistence_layer


@pytest.fixture
def key(layer: BasePersistenceLayer) -> str:
    return layer.build_idempotency_key("header:order-1")


def test_renewal_moves_the_lease_end_a_full_lease_past_now(
    layer: BasePersistenceLayer, key: str, clock: FakeClock
) -> None:
    lease = layer.save_inprogress(key, HASH)
    clock.advance(LEASE * 0.7)

    renewed = layer.renew_lease(lease)

    assert renewed.in_progress_expiry_timestamp == int((clock.now + LEASE) * 1000)
    assert renewed.lease_id == lease.lease_id
    assert renewed.status == STATUS_INPROGRESS
    assert renewed.payload_hash == HASH
    stored = layer.get_record(key)
    assert stored.holds_same_lease(renewed)
    assert stored.payload_hash == HASH
    # Past the original lease the key is still held: a claim collides with the renewed record.
    clock.advance(LEASE * 0.7)
    with pytest.raises(IdempotencyItemAlreadyExistsError) as info:
        layer.save_inprogress(key, HASH)
    assert info.value.old_data_record is not None
    assert info.value.old_data_record.holds_same_lease(renewed)


def test_renewal_keeps_the_record_alive_past_its_original_expiry(
    persistence_layer: BasePersistenceLayer, clock: FakeClock
) -> None:
    # A record expiring with its lease: renewal must move the expiry too, or the record of a
    # request still running would expire and its key be claimed by a retry.
    persistence_layer.configure(
        IdempotencyConfig(expires_after_seconds=LEASE, in_progress_expires_after_seconds=LEASE)
    )
    persistence_layer.clock = clock
    key = persistence_layer.build_idempotency_key("header:order-1")
    claimed = lease = persistence_layer.save_inprogress(key, HASH)
    for _ in range(4):
        clock.advance(LEASE * 0.6)
        lease = persistence_layer.renew_lease(lease)
    assert claimed.expiry_timestamp is not None and clock.now > claimed.expiry_timestamp + 1
    assert lease.expiry_timestamp == int(clock.now) + LEASE

    with pytest.raises(IdempotencyItemAlreadyExistsError):
        persistence_layer.save_inprogress(key, HASH)
    persistence_layer.save_success(lease, CREATED)
    assert persistence_layer.get_record(key).response == CREATED


def test_a_renewed_lease_completes_and_the_record_replays(
    layer: BasePersistenceLayer, key: str, clock: FakeClock
) -> None:
    lease = layer.save_inprogress(key, HASH)
    clock.advance(LEASE / 3)
    renewed = layer.renew_lease(lease)
    clock.advance(LEASE / 3)
    renewed = layer.renew_lease(renewed)

    layer.save_success(renewed, CREATED)

    stored = layer.get_record(key)
    assert stored.status == STATUS_COMPLETED
    assert stored.response == CREATED


def test_a_renewed_lease_releases(layer: BasePersistenceLayer, key: str) -> None:
    renewed = layer.renew_lease(layer.save_inprogress(key, HASH))

    layer.delete_record(renewed)

    with pytest.raises(IdempotencyItemNotFoundError):
        layer.get_record(key)


def test_a_renewal_within_the_claims_millisecond_still_replaces_the_token(
    layer: BasePersistenceLayer, key: str
) -> None:
    lease = layer.save_inprogress(key, HASH)  # the fake clock does not move: same millisecond

    renewed = layer.renew_lease(lease)

    assert lease.in_progress_expiry_timestamp is not None
    assert renewed.in_progress_expiry_timestamp == lease.in_progress_expiry_timestamp + 1
    with pytest.raises(IdempotencyLeaseLostError):
        layer.save_success(lease, CREATED)


def test_the_token_a_renewal_replaced_can_neither_complete_release_nor_renew(
    layer: BasePersistenceLayer, key: str, clock: FakeClock
) -> None:
    old = layer.save_inprogress(key, HASH)
    clock.advance(1)
    renewed = layer.renew_lease(old)

    with pytest.raises(IdempotencyLeaseLostError):
        layer.save_success(old, StoredResponse(200, (), b"stale"))
    with pytest.raises(IdempotencyLeaseLostError):
        layer.delete_record(old)
    clock.advance(1)
    with pytest.raises(IdempotencyLeaseLostError):
        layer.renew_lease(old)

    assert layer.get_record(key).holds_same_lease(renewed)
    layer.save_success(renewed, CREATED)
    assert layer.get_record(key).response == CREATED


def test_a_lease_taken_over_cannot_be_renewed(
    layer: BasePersistenceLayer, key: str, clock: FakeClock
) -> None:
    stale = layer.save_inprogress(key, HASH)
    clock.advance(LEASE + 1)
    current = layer.save_inprogress(key, HASH)

    with pytest.raises(IdempotencyLeaseLostError):
        layer.renew_lease(stale)

    stored = layer.get_record(key)
    assert stored.holds_same_lease(current)
    layer.save_success(current, CREATED)
    with pytest.raises(IdempotencyLeaseLostError):
        layer.renew_lease(stale)
    assert layer.get_record(key).response == CREATED


def test_a_completed_released_or_removed_record_cannot_be_renewed(
    layer: BasePersistenceLayer, clock: FakeClock
) -> None:
    completed = layer.save_inprogress(layer.build_idempotency_key("header:completed"), HASH)
    layer.save_success(completed, CREATED)
    released = layer.save_inprogress(layer.build_idempotency_key("header:released"), HASH)
    layer.delete_record(released)
    removed = layer.save_inprogress(layer.build_idempotency_key("header:removed"), HASH)
    assert layer.remove_record(removed.idempotency_key)

    for lease in (completed, released, removed):
        with pytest.raises(IdempotencyLeaseLostError):
            layer.renew_lease(lease)
    assert layer.get_record(completed.idempotency_key).response == CREATED
    for lease in (released, removed):
        with pytest.raises(IdempotencyItemNotFoundError):
            layer.get_record(lease.idempotency_key)


def test_an_owner_whose_lease_ran_out_unchallenged_renews_it(
    layer: BasePersistenceLayer, key: str, clock: FakeClock
) -> None:
    # As with completion: nobody took the key over, so the record is still this request's.
    lease = layer.save_inprogress(key, HASH)
    clock.advance(LEASE + 5)

    renewed = layer.renew_lease(lease)

    with pytest.raises(IdempotencyItemAlreadyExistsError):
        layer.save_inprogress(key, HASH)
    layer.save_success(renewed, CREATED)


def test_a_competing_claim_fails_for_as_long_as_the_lease_is_renewed(
    layer: BasePersistenceLayer, key: str, clock: FakeClock
) -> None:
    lease = layer.save_inprogress(key, HASH)
    for _ in range(10):  # ten leases' worth of time, renewed every third of a lease
        clock.advance(LEASE / 3)
        lease = layer.renew_lease(lease)
        with pytest.raises(IdempotencyItemAlreadyExistsError) as info:
            layer.save_inprogress(key, HASH)
        assert info.value.old_data_record is not None
        assert info.value.old_data_record.status == STATUS_INPROGRESS

    # Once renewals stop (a crashed worker), the key is free one lease later.
    clock.advance(LEASE + 1)
    taken_over = layer.save_inprogress(key, HASH)
    assert taken_over.lease_id != lease.lease_id
    with pytest.raises(IdempotencyLeaseLostError):
        layer.renew_lease(lease)


def test_a_resent_renewal_whose_first_attempt_landed_is_accepted(
    layer: BasePersistenceLayer, key: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # botocore and redis-py resend a write whose reply was lost; the resend then fails the
    # lease condition although the first attempt renewed the lease.
    lease = layer.save_inprogress(key, HASH)
    clock.advance(1)
    renew_record = layer._renew_record

    def lost_reply_then_resend(old: object, renewed: object) -> None:
        renew_record(old, renewed)  # type: ignore[arg-type]
        renew_record(old, renewed)  # type: ignore[arg-type]

    monkeypatch.setattr(layer, "_renew_record", lost_reply_then_resend)

    renewed = layer.renew_lease(lease)

    assert layer.get_record(key).holds_same_lease(renewed)
