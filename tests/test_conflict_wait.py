"""Duplicates that wait for the answer (``conflict_wait_seconds``): the engine's ``Conflict``
decision and ``poll`` step, and the wait loops of :mod:`idem_middleware.lease`.

Time is fake: the waits' sleeps move the engine's monotonic clock and the store's clock, so no
test sleeps (beyond the few milliseconds of the threaded race).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from idem_middleware.config import IdempotencyConfig
from idem_middleware.engine import (
    Conflict,
    Decision,
    IdempotencyEngine,
    IdempotencyEvent,
    PendingClaim,
    Proceed,
    Respond,
)
from idem_middleware.exceptions import IdempotencyPersistenceLayerError
from idem_middleware.lease import wait_for_answer, wait_for_answer_async
from idem_middleware.persistence.base import BasePersistenceLayer
from idem_middleware.persistence.memory import InMemoryPersistenceLayer
from idem_middleware.request import Headers, IdempotencyRequest
from idem_middleware.responses import StoredResponse
from tests.support.backends import FakeClock

LEASE = 10
WAIT = 5.0
CREATED = StoredResponse(201, (("content-type", "application/json"),), b'{"id": 1}')


def request(body: bytes = b'{"amount": 5}', key: str = "k-1") -> IdempotencyRequest:
    return IdempotencyRequest("POST", "/pay", "", Headers([("idempotency-key", key)]), body)


class World:
    """An engine over a store, one fake clock for both, and the events it emitted."""

    def __init__(self, layer: BasePersistenceLayer | None = None, **config: Any) -> None:
        self.events: list[IdempotencyEvent] = []
        self.clock = FakeClock()
        self.layer = layer if layer is not None else InMemoryPersistenceLayer()
        settings: dict[str, Any] = {
            "in_progress_expires_after_seconds": LEASE,
            "conflict_wait_seconds": WAIT,
            "on_event": self.events.append,
            **config,
        }
        self.engine = IdempotencyEngine(self.layer, IdempotencyConfig(**settings))
        self.layer.clock = self.clock
        self.engine.monotonic = self.clock
        self.slept: list[float] = []
        #: Run after the sleep that brings the total slept time to (at least) the key.
        self.at: dict[float, Callable[[], object]] = {}

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        before = sum(self.slept[:-1])
        self.clock.advance(seconds)
        for moment in sorted(self.at):
            if before < moment <= before + seconds + 1e-9:
                self.at.pop(moment)()

    async def async_sleep(self, seconds: float) -> None:
        self.sleep(seconds)

    def names(self) -> list[str]:
        return [event.name for event in self.events]

    def first(self, body: bytes = b'{"amount": 5}') -> Proceed:
        attempt = self.engine.begin(request(body))
        assert isinstance(attempt, Proceed)
        return attempt

    def duplicate(self, body: bytes = b'{"amount": 5}') -> Conflict:
        conflict = self.engine.begin(request(body))
        assert isinstance(conflict, Conflict)
        return conflict


def status_and_code(decision: Decision) -> tuple[int, str | None]:
    assert isinstance(decision, Respond)
    response = decision.response
    if response.headers and ("content-type", "application/problem+json") in response.headers:
        return response.status, json.loads(response.body)["code"]
    return response.status, None


def header(response: StoredResponse, name: str) -> str | None:
    return next((v for k, v in response.headers if k.lower() == name.lower()), None)


# The decision -----------------------------------------------------------------------------


def test_without_a_wait_a_duplicate_gets_409_at_once() -> None:
    world = World(conflict_wait_seconds=0)
    world.first()

    decision = world.engine.begin(request())

    assert not isinstance(decision, Conflict)
    assert status_and_code(decision) == (409, "idempotency_key_in_use")
    assert world.names() == ["claimed", "conflict"]


def test_a_duplicate_that_may_wait_gets_a_conflict_carrying_the_409() -> None:
    world = World()
    world.first()

    conflict = world.duplicate()

    # An adapter that does not wait sends the 409 it carries, as without a wait.
    assert isinstance(conflict, Respond)
    assert status_and_code(conflict) == (409, "idempotency_key_in_use")
    assert conflict.deadline == world.clock.now + WAIT
    assert conflict.delay == 0.05
    assert world.names() == ["claimed"]  # the outcome of the wait is what gets reported


def test_a_duplicate_with_another_payload_is_422_at_once_even_when_it_may_wait() -> None:
    world = World()
    world.first()

    decision = world.engine.begin(request(b'{"amount": 6}'))

    assert not isinstance(decision, Conflict)
    assert status_and_code(decision) == (422, "idempotency_key_reused")


def test_a_short_wait_starts_with_a_shorter_pause() -> None:
    world = World(conflict_wait_seconds=0.02)
    world.first()
    assert world.duplicate().delay == 0.02


# Waiting ----------------------------------------------------------------------------------


def test_the_duplicate_gets_the_replay_as_soon_as_the_first_completes() -> None:
    world = World()
    first = world.first()
    conflict = world.duplicate()
    world.at[0.3] = lambda: world.engine.complete(first, CREATED)

    decision = wait_for_answer(world.engine, conflict, sleep=world.sleep)

    assert isinstance(decision, Respond)
    assert decision.response.status == 201
    assert decision.response.body == CREATED.body
    assert header(decision.response, "Idempotent-Replayed") == "true"
    assert world.slept == [0.05, 0.1, 0.2]  # polled at 0.05, 0.15, then 0.35: done
    assert world.names() == ["claimed", "completed", "replayed"]


def test_the_pause_doubles_up_to_half_a_second_and_the_wait_ends_in_409() -> None:
    world = World()
    world.first()
    conflict = world.duplicate()

    decision = wait_for_answer(world.engine, conflict, sleep=world.sleep)

    assert status_and_code(decision) == (409, "idempotency_key_in_use")
    assert world.slept[:5] == [0.05, 0.1, 0.2, 0.4, 0.5]
    assert set(world.slept[5:-1]) == {0.5}
    assert sum(world.slept) == pytest.approx(WAIT)  # the last pause ends with the wait
    assert world.names() == ["claimed", "conflict"]


def test_polling_reads_the_record_once_per_poll_and_writes_nothing() -> None:
    world = World()
    world.first()
    conflict = world.duplicate()
    calls: list[str] = []
    for name in ("_put_record", "_get_record", "_update_record", "_delete_record"):
        primitive = getattr(world.layer, name)

        def counted(*args: Any, _name: str = name, _primitive: Any = primitive) -> Any:
            calls.append(_name)
            return _primitive(*args)

        setattr(world.layer, name, counted)

    assert world.engine.poll(conflict) is None
    assert world.engine.poll(conflict) is None

    assert calls == ["_get_record", "_get_record"]


def test_a_released_key_is_claimed_by_exactly_one_waiter_and_the_other_gets_its_replay() -> None:
    world = World()
    first = world.first()
    waiters = [world.duplicate(), world.duplicate()]
    world.engine.release(first, 500)  # the first request failed: its retries may run

    outcomes = [world.engine.poll(waiter) for waiter in waiters]

    assert isinstance(outcomes[0], Proceed)
    assert outcomes[1] is None  # the key is held again: keep waiting
    world.engine.complete(outcomes[0], CREATED)
    replay = world.engine.poll(waiters[1])
    assert isinstance(replay, Respond)
    assert replay.response.body == CREATED.body
    assert world.names() == ["claimed", "released", "claimed", "completed", "replayed"]


def test_a_crashed_first_request_is_taken_over_once_its_lease_runs_out() -> None:
    world = World(conflict_wait_seconds=LEASE + 2, expires_after_seconds=3600)
    crashed = world.first()
    conflict = world.duplicate()

    decision = wait_for_answer(world.engine, conflict, sleep=world.sleep)

    assert isinstance(decision, Proceed)
    assert LEASE < sum(world.slept) < LEASE + 0.6
    world.engine.complete(crashed, StoredResponse(200, (), b"late"))  # fenced out
    assert world.names() == ["claimed", "claimed", "lease_lost"]


def test_a_renewed_lease_keeps_the_duplicate_waiting_until_its_wait_ends() -> None:
    world = World(conflict_wait_seconds=LEASE * 2, expires_after_seconds=3600)
    first = world.first()
    conflict = world.duplicate()
    for moment in range(3, 20, 3):
        world.at[float(moment)] = lambda: world.engine.renew(first)

    decision = wait_for_answer(world.engine, conflict, sleep=world.sleep)

    assert status_and_code(decision) == (409, "idempotency_key_in_use")
    assert sum(world.slept) == pytest.approx(LEASE * 2)


def test_a_key_reused_meanwhile_with_another_payload_ends_the_wait_with_422() -> None:
    world = World()
    first = world.first()
    conflict = world.duplicate()
    world.engine.release(first, 500)
    assert isinstance(world.engine.begin(request(b'{"amount": 6}')), Proceed)

    decision = world.engine.poll(conflict)

    assert decision is not None
    assert status_and_code(decision) == (422, "idempotency_key_reused")


class FailingReads(InMemoryPersistenceLayer):
    down = False

    def _get_record(self, idempotency_key: str) -> Any:
        if self.down:
            raise IdempotencyPersistenceLayerError("down") from ConnectionError("refused")
        return super()._get_record(idempotency_key)


@pytest.mark.parametrize("policy", ["reject", "passthrough"])
def test_a_store_error_while_waiting_is_the_409_never_a_run(policy: str) -> None:
    # The request is known to duplicate one in flight: running it un-deduplicated (the
    # passthrough policy for an unknown key) would run the handler twice.
    layer = FailingReads()
    world = World(layer, on_store_error=policy)
    world.first()
    conflict = world.duplicate()
    layer.down = True

    decision = world.engine.poll(conflict)

    assert decision is not None
    assert status_and_code(decision) == (409, "idempotency_key_in_use")
    assert world.names() == ["claimed", "store_error", "conflict"]


def test_the_async_wait_polls_between_sleeps_on_the_loop() -> None:
    world = World()
    first = world.first()
    conflict = world.duplicate()
    world.at[0.3] = lambda: world.engine.complete(first, CREATED)

    decision = anyio.run(
        lambda: wait_for_answer_async(world.engine, conflict, sleep=world.async_sleep)
    )

    assert isinstance(decision, Respond)
    assert decision.response.body == CREATED.body
    assert world.slept == [0.05, 0.1, 0.2]


class ThreadNamingLayer(InMemoryPersistenceLayer):
    blocking_io = True

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[str] = []

    def _get_record(self, idempotency_key: str) -> Any:
        self.threads.append(threading.current_thread().name)
        return super()._get_record(idempotency_key)


def test_the_async_wait_polls_a_blocking_store_off_the_loop_through_store_call() -> None:
    layer = ThreadNamingLayer()
    world = World(layer)
    first = world.first()
    conflict = world.duplicate()
    world.at[0.1] = lambda: world.engine.complete(first, CREATED)
    store_calls: list[str] = []

    async def store_call(function: Callable[..., Any], *args: Any) -> Any:
        store_calls.append(function.__name__)
        return await anyio.to_thread.run_sync(function, *args)

    async def main() -> Decision:
        without = await wait_for_answer_async(
            world.engine, world.duplicate(), sleep=world.async_sleep
        )
        assert isinstance(without, Respond)
        return await wait_for_answer_async(
            world.engine, conflict, store_call=store_call, sleep=world.async_sleep
        )

    decision = anyio.run(main)

    assert isinstance(decision, Respond)
    assert decision.response.body == CREATED.body
    assert store_calls == ["poll"]
    assert layer.threads
    assert threading.current_thread().name not in layer.threads


def test_fifty_waiting_duplicates_get_one_execution_and_fifty_identical_replays() -> None:
    # Real threads and a real (short) wait: the in-memory store under contention.
    layer = InMemoryPersistenceLayer()
    engine = IdempotencyEngine(layer, IdempotencyConfig(conflict_wait_seconds=5))
    executions = 0
    lock = threading.Lock()
    barrier = threading.Barrier(51)
    results: list[Decision] = []

    def client() -> None:
        nonlocal executions
        barrier.wait()
        decision = engine.begin(request())
        if isinstance(decision, Conflict):
            decision = wait_for_answer(engine, decision)
        if isinstance(decision, Proceed):
            with lock:
                executions += 1
            threading.Event().wait(0.03)  # the handler
            engine.complete(decision, CREATED)
            return
        with lock:
            results.append(decision)

    threads = [threading.Thread(target=client) for _ in range(51)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)

    assert executions == 1
    assert len(results) == 50
    bodies = {(r.response.status, r.response.body) for r in results if isinstance(r, Respond)}
    assert bodies == {(201, CREATED.body)}


# Over every backend ---------------------------------------------------------------------------


def test_waiting_over_every_backend(persistence_layer: BasePersistenceLayer) -> None:
    world = World(persistence_layer, conflict_wait_seconds=LEASE * 3, expires_after_seconds=3600)
    # Completed during the wait: the replay.
    first = world.first()
    conflict = world.duplicate()
    world.at[0.3] = lambda: world.engine.complete(first, CREATED)
    replay = wait_for_answer(world.engine, conflict, sleep=world.sleep)
    assert isinstance(replay, Respond)
    assert (replay.response.status, replay.response.body) == (201, CREATED.body)

    # Released during the wait: one waiter claims, through the atomic claim.
    engine = world.engine
    pending = engine.prepare(request(key="k-2"))
    assert isinstance(pending, PendingClaim)
    second = engine.claim(pending)
    assert isinstance(second, Proceed)
    waiters = [engine.claim(pending), engine.claim(pending)]
    assert all(isinstance(waiter, Conflict) for waiter in waiters)
    engine.release(second, 503)
    outcomes = [engine.poll(waiter) for waiter in waiters if isinstance(waiter, Conflict)]
    assert isinstance(outcomes[0], Proceed)
    assert outcomes[1] is None

    # Crashed (its lease runs out unrenewed) during the wait: a waiter takes over.
    assert isinstance(waiters[1], Conflict)
    taken_over = wait_for_answer(engine, waiters[1], sleep=world.sleep)
    assert isinstance(taken_over, Proceed)
    assert taken_over.lease.lease_id != outcomes[0].lease.lease_id


class GatedClaims(InMemoryPersistenceLayer):
    blocking_io = True
    gated = False

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.entered = threading.Event()

    def _put_record(self, data_record: Any) -> None:
        if self.gated:
            self.entered.set()
            assert self.gate.wait(10)
        super()._put_record(data_record)


def test_a_client_gone_while_its_poll_claims_the_key_leaves_the_key_free() -> None:
    layer = GatedClaims()
    world = World(layer)
    first = world.first()
    conflict = world.duplicate()
    world.engine.release(first, 500)
    layer.gated = True

    async def fast_sleep(seconds: float) -> None:
        await anyio.lowlevel.checkpoint()

    async def main() -> None:
        async with anyio.create_task_group() as tasks:

            async def client_gone_once_the_poll_claims() -> None:
                # Not a time limit: a loaded machine could cancel before the claim began.
                assert await anyio.to_thread.run_sync(layer.entered.wait, 10)
                tasks.cancel_scope.cancel()
                threading.Timer(0.05, layer.gate.set).start()  # the claim lands after the cancel

            tasks.start_soon(client_gone_once_the_poll_claims)
            await wait_for_answer_async(world.engine, conflict, sleep=fast_sleep)
        assert tasks.cancel_scope.cancelled_caught

    anyio.run(main)

    assert layer.entered.is_set()
    assert world.names() == ["claimed", "released", "claimed", "released"]
    assert layer.record_count == 0  # a retry can run at once, not after the lease
