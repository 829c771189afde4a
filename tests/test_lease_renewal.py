"""Lease renewal: the fenced store write, over every backend, then the engine's ``renew`` step and
the keepers that call it while a handler runs (:mod:`idem_middleware.lease`).

In the contract tests time moves through the layer's ``clock`` (a :class:`FakeClock`), never by
sleeping; the keepers run on real time with renewal intervals of a few milliseconds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import pytest

from idem_middleware import lease as lease_module
from idem_middleware.config import IdempotencyConfig
from idem_middleware.engine import IdempotencyEngine, IdempotencyEvent, Proceed, Respond
from idem_middleware.exceptions import (
    IdempotencyItemAlreadyExistsError,
    IdempotencyItemNotFoundError,
    IdempotencyLeaseLostError,
    IdempotencyPersistenceLayerError,
)
from idem_middleware.lease import AsyncLeaseKeeper, LeaseKeeper
from idem_middleware.persistence.base import BasePersistenceLayer
from idem_middleware.persistence.memory import InMemoryPersistenceLayer
from idem_middleware.persistence.record import STATUS_COMPLETED, STATUS_INPROGRESS, DataRecord
from idem_middleware.request import Headers, IdempotencyRequest
from idem_middleware.responses import StoredResponse
from tests.support.backends import FakeClock

T = TypeVar("T")

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
    assert claimed.expiry_timestamp is not None
    assert clock.now > claimed.expiry_timestamp + 1
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


# The engine's renewal step --------------------------------------------------------------------


def request(key: str = "k-1") -> IdempotencyRequest:
    return IdempotencyRequest("POST", "/pay", "", Headers([("idempotency-key", key)]), b"{}")


def claimed(
    layer: InMemoryPersistenceLayer | None = None, *, lease: int = LEASE
) -> tuple[IdempotencyEngine, Proceed, list[IdempotencyEvent], FakeClock]:
    """An engine over ``layer`` (a fake clock) and the attempt that holds key ``k-1``."""
    layer = layer or InMemoryPersistenceLayer()
    events: list[IdempotencyEvent] = []
    engine = IdempotencyEngine(
        layer,
        IdempotencyConfig(in_progress_expires_after_seconds=lease, on_event=events.append),
    )
    clock = FakeClock()
    layer.clock = clock
    attempt = engine.begin(request())
    assert isinstance(attempt, Proceed)
    return engine, attempt, events, clock


def names(events: list[IdempotencyEvent]) -> list[str]:
    return [event.name for event in events]


def test_engine_renew_keeps_the_renewed_lease_and_completes_under_it() -> None:
    engine, attempt, events, clock = claimed()
    claimed_lease = attempt.lease
    clock.advance(LEASE / 3)

    assert engine.renew(attempt) is True

    assert attempt.lease is not claimed_lease
    assert attempt.lease.in_progress_expiry_timestamp == int((clock.now + LEASE) * 1000)
    engine.complete(attempt, CREATED)
    assert names(events) == ["claimed", "completed"]
    replay = engine.begin(request())
    assert isinstance(replay, Respond)
    assert replay.response.body == CREATED.body


def test_engine_renew_reports_a_lost_lease_and_never_raises() -> None:
    engine, attempt, events, clock = claimed()
    clock.advance(LEASE + 1)
    assert isinstance(engine.begin(request()), Proceed)  # a retry took the key over

    assert engine.renew(attempt) is False

    assert names(events) == ["claimed", "claimed", "lease_lost"]


class RenewalDownLayer(InMemoryPersistenceLayer):
    def _renew_record(self, lease: DataRecord, renewed: DataRecord) -> None:
        raise IdempotencyPersistenceLayerError("down") from ConnectionError("refused")


def test_engine_renew_reports_a_store_error_and_keeps_the_lease() -> None:
    engine, attempt, events, _ = claimed(RenewalDownLayer())
    claimed_lease = attempt.lease

    assert engine.renew(attempt) is True  # a later renewal may still succeed

    assert attempt.lease is claimed_lease
    assert names(events) == ["claimed", "store_error"]
    assert "lease not renewed" in (events[-1].detail or "")
    engine.complete(attempt, CREATED)
    assert names(events)[-1] == "completed"


# Keepers --------------------------------------------------------------------------------------

TICK = 0.005  # renewal interval of the keeper tests: real time, a few milliseconds


def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.001)


async def eventually_async(condition: Callable[[], bool]) -> None:
    for _ in range(5000):
        if condition():
            return
        await anyio.sleep(0.001)
    raise AssertionError("condition not reached")


class GatedRenewalLayer(InMemoryPersistenceLayer):
    """Renewals block until ``gate`` opens; ``entered`` says one is under way."""

    blocking_io = True

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.renewal_calls = 0

    def _renew_record(self, lease: DataRecord, renewed: DataRecord) -> None:
        self.renewal_calls += 1
        self.entered.set()
        assert self.gate.wait(10)
        super()._renew_record(lease, renewed)


class CountingLayer(InMemoryPersistenceLayer):
    def __init__(self, *, blocking: bool = False, fail_first: int = 0) -> None:
        super().__init__()
        self.blocking_io = blocking  # type: ignore[misc]
        self.renewal_calls = 0
        self.threads: set[str] = set()
        self.fail_first = fail_first

    def _renew_record(self, lease: DataRecord, renewed: DataRecord) -> None:
        self.renewal_calls += 1
        self.threads.add(threading.current_thread().name)
        if self.renewal_calls <= self.fail_first:
            raise IdempotencyPersistenceLayerError("down")
        super()._renew_record(lease, renewed)


def stored_lease(engine: IdempotencyEngine, attempt: Proceed) -> DataRecord:
    return engine.persistence_layer._get_record(attempt.lease.idempotency_key)


def test_thread_keeper_renews_until_stopped_then_never_again() -> None:
    layer = CountingLayer()
    engine, attempt, events, _ = claimed(layer)
    claimed_lease = attempt.lease

    with LeaseKeeper(engine, attempt, interval=TICK) as keeper:
        eventually(lambda: keeper.renewals >= 3)
    calls = layer.renewal_calls
    time.sleep(TICK * 6)

    assert layer.renewal_calls == calls
    assert keeper.stopped
    assert not keeper.lost
    assert attempt.lease is not claimed_lease
    assert stored_lease(engine, attempt).holds_same_lease(attempt.lease)
    assert threading.current_thread().name not in layer.threads
    engine.complete(attempt, CREATED)
    assert names(events) == ["claimed", "completed"]


def test_thread_keeper_stopped_before_its_first_renewal_never_renews() -> None:
    layer = CountingLayer()
    engine, attempt, _, _ = claimed(layer)
    for _ in range(100):
        LeaseKeeper(engine, attempt, interval=TICK).start().stop()
    time.sleep(TICK * 4)
    assert layer.renewal_calls == 0


def test_thread_keeper_stop_waits_for_the_renewal_under_way_so_completion_uses_its_lease() -> None:
    layer = GatedRenewalLayer()
    engine, attempt, events, _ = claimed(layer)
    keeper = LeaseKeeper(engine, attempt, interval=TICK).start()
    assert layer.entered.wait(5)
    claimed_lease = attempt.lease

    stopper = threading.Thread(target=keeper.stop)
    stopper.start()
    stopper.join(0.05)
    assert stopper.is_alive(), "stop() returned while a renewal was still writing"
    layer.gate.set()
    stopper.join(5)
    assert not stopper.is_alive()

    assert attempt.lease is not claimed_lease  # the renewal's lease, final once stop returned
    assert layer.renewal_calls == 1
    engine.complete(attempt, CREATED)
    assert names(events) == ["claimed", "completed"]


def test_thread_keeper_stops_renewing_a_lost_lease() -> None:
    layer = CountingLayer()
    engine, attempt, events, clock = claimed(layer)
    clock.advance(LEASE + 1)
    assert isinstance(engine.begin(request()), Proceed)  # a retry took the key over

    keeper = LeaseKeeper(engine, attempt, interval=TICK).start()
    eventually(lambda: keeper.lost)
    time.sleep(TICK * 4)

    assert layer.renewal_calls == 1
    assert names(events) == ["claimed", "claimed", "lease_lost"]
    keeper.stop()


def test_thread_keeper_renews_again_after_a_store_error() -> None:
    layer = CountingLayer(fail_first=2)
    engine, attempt, events, _ = claimed(layer)
    with LeaseKeeper(engine, attempt, interval=TICK) as keeper:
        eventually(lambda: keeper.renewals >= 1)
    assert layer.renewal_calls >= 3
    assert names(events)[:3] == ["claimed", "store_error", "store_error"]
    assert stored_lease(engine, attempt).holds_same_lease(attempt.lease)


def test_thread_keepers_of_many_requests_each_keep_their_own_lease() -> None:
    layer = InMemoryPersistenceLayer()
    engine = IdempotencyEngine(layer, IdempotencyConfig(in_progress_expires_after_seconds=LEASE))
    attempts = [engine.begin(request(f"k-{i}")) for i in range(20)]
    keepers = [
        LeaseKeeper(engine, attempt, interval=TICK * (1 + i % 3)).start()
        for i, attempt in enumerate(attempts)
        if isinstance(attempt, Proceed)
    ]
    eventually(lambda: all(keeper.renewals >= 2 for keeper in keepers))
    for keeper in keepers:
        keeper.stop()
    for attempt in attempts:
        assert isinstance(attempt, Proceed)
        assert stored_lease(engine, attempt).holds_same_lease(attempt.lease)
        engine.complete(attempt, CREATED)


@pytest.mark.parametrize("blocking", [False, True], ids=["on-the-loop", "in-a-thread"])
def test_async_keeper_renews_until_stopped_then_never_again(blocking: bool) -> None:
    layer = CountingLayer(blocking=blocking)
    engine, attempt, events, _ = claimed(layer)
    claimed_lease = attempt.lease

    async def main() -> AsyncLeaseKeeper:
        async with AsyncLeaseKeeper(engine, attempt, interval=TICK) as keeper:
            await eventually_async(lambda: keeper.renewals >= 3)
        calls = layer.renewal_calls
        await anyio.sleep(TICK * 6)
        assert layer.renewal_calls == calls
        return keeper

    keeper = anyio.run(main)

    assert not keeper.lost
    assert attempt.lease is not claimed_lease
    assert stored_lease(engine, attempt).holds_same_lease(attempt.lease)
    on_loop = threading.current_thread().name in layer.threads
    assert on_loop is not blocking
    engine.complete(attempt, CREATED)
    assert names(events) == ["claimed", "completed"]


def test_async_keeper_runs_renewals_through_the_adapters_store_call() -> None:
    layer = CountingLayer(blocking=True)
    engine, attempt, _, _ = claimed(layer)
    calls: list[str] = []

    async def store_call(function: Callable[..., T], *args: Any) -> T:
        calls.append(function.__name__)
        return await anyio.to_thread.run_sync(function, *args)

    async def main() -> None:
        async with AsyncLeaseKeeper(engine, attempt, store_call=store_call, interval=TICK) as k:
            await eventually_async(lambda: k.renewals >= 2)

    anyio.run(main)
    assert calls[:2] == ["renew", "renew"]
    assert len(calls) == layer.renewal_calls


def test_async_keeper_stop_waits_for_the_renewal_under_way_so_completion_uses_its_lease() -> None:
    layer = GatedRenewalLayer()
    engine, attempt, events, _ = claimed(layer)
    claimed_lease = attempt.lease

    async def main() -> None:
        async with AsyncLeaseKeeper(engine, attempt, interval=TICK) as keeper:
            await eventually_async(layer.entered.is_set)
            stopped = anyio.Event()

            async def stop() -> None:
                await keeper.stop()
                stopped.set()

            async with anyio.create_task_group() as group:
                group.start_soon(stop)
                await anyio.sleep(0.05)
                assert not stopped.is_set(), "stop() returned while a renewal was still writing"
                layer.gate.set()
            assert attempt.lease is not claimed_lease
            await anyio.to_thread.run_sync(engine.complete, attempt, CREATED)

    anyio.run(main)
    assert layer.renewal_calls == 1
    assert names(events) == ["claimed", "completed"]


def test_async_keeper_lets_the_handlers_exception_through_unwrapped() -> None:
    engine, attempt, _, _ = claimed()

    async def main() -> None:
        async with AsyncLeaseKeeper(engine, attempt, interval=TICK):
            await anyio.sleep(TICK * 3)
            raise KeyError("from the handler")

    with pytest.raises(KeyError, match="from the handler"):
        anyio.run(main)


def test_a_cancelled_request_releases_under_the_lease_of_the_renewal_under_way() -> None:
    layer = GatedRenewalLayer()
    engine, attempt, events, _ = claimed(layer)
    claimed_lease = attempt.lease

    async def main() -> None:
        # Cancelled once the renewal is under way, however long a loaded machine takes to get
        # there (a time limit could cancel before it started).
        with anyio.CancelScope() as request_scope:
            try:
                async with AsyncLeaseKeeper(engine, attempt, interval=TICK):
                    await eventually_async(layer.entered.is_set)
                    request_scope.cancel()
                    threading.Timer(0.05, layer.gate.set).start()  # lands after the cancel
                    await anyio.sleep(10)
            finally:
                engine.release(attempt)  # no await: the cancellation cannot interrupt it
        assert request_scope.cancelled_caught

    anyio.run(main)
    assert attempt.lease is not claimed_lease
    assert names(events) == ["claimed", "released"]


def test_async_keeper_without_asyncio_uses_a_task(monkeypatch: pytest.MonkeyPatch) -> None:
    # Other anyio backends (trio) have no loop timers: the keeper runs a task instead.
    monkeypatch.setattr(lease_module, "_asyncio_loop", lambda: None)
    layer = GatedRenewalLayer()
    engine, attempt, events, _ = claimed(layer)

    async def main() -> None:
        async with AsyncLeaseKeeper(engine, attempt, interval=TICK) as keeper:
            assert keeper._group is not None
            await eventually_async(layer.entered.is_set)
            threading.Timer(0.05, layer.gate.set).start()
            await keeper.stop()
            assert layer.gate.is_set()
            assert keeper.renewals == 1
        await anyio.sleep(TICK * 4)
        assert layer.renewal_calls == 1
        await anyio.to_thread.run_sync(engine.complete, attempt, CREATED)

    anyio.run(main)
    assert names(events) == ["claimed", "completed"]
