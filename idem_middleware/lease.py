"""Requests in flight: keeping a running handler's lease, and waiting for another's answer.

A request that holds a key (:class:`~idem_middleware.engine.Proceed`) renews its lease every
third of ``in_progress_expires_after_seconds`` while the handler runs, so the lease can be short
(a crashed worker's key runs again within one lease) and a handler may still run for as long as
it needs. :class:`AsyncLeaseKeeper` renews from the event loop (ASGI), :class:`LeaseKeeper` from
a background thread (WSGI).

Both keep one rule, which makes a renewal never race a completion: **stop, then complete**.
``stop()`` returns only once no renewal is running and none will start, so ``attempt.lease`` is
then final and ``engine.complete`` / ``engine.release`` write under the lease the store holds.
Stopping takes at most one renewal's store call; a keeper between renewals stops at once.

A duplicate that may wait (:class:`~idem_middleware.engine.Conflict`) is turned into its final
decision by :func:`wait_for_answer` (WSGI: sleeps its own thread) or
:func:`wait_for_answer_async` (ASGI: holds no thread between polls).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Protocol, TypeVar

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread

from idem_middleware.engine import Conflict, Decision, IdempotencyEngine, Proceed
from idem_middleware.persistence.steps import StoreStep

logger = logging.getLogger("idem_middleware")

T = TypeVar("T")

#: Renewals per lease: two may fail (or be late) before the lease runs out.
RENEWALS_PER_LEASE = 3


class StoreCall(Protocol):
    """How an async adapter runs an engine step that may touch the store: on the event loop
    through the layer's native async path when it has one, in a worker thread under its own
    limiter when the store blocks, directly otherwise (the ASGI middleware's ``store_call``).
    """

    def __call__(self, function: Callable[..., T], /, *args: Any) -> Awaitable[T]: ...


def renewal_interval(engine: IdempotencyEngine) -> float:
    """Seconds between two renewals of a lease."""
    return engine.config.in_progress_expires_after_seconds / RENEWALS_PER_LEASE


def _retry_after_store_error(interval: float) -> float:
    # A renewal the store refused is tried again sooner: the lease has not moved.
    return interval / RENEWALS_PER_LEASE


# ASGI ---------------------------------------------------------------------------------------


class AsyncLeaseKeeper:
    """Renews ``attempt``'s lease from the event loop while the handler runs.

    ``async with AsyncLeaseKeeper(engine, attempt, store_call=...) as keeper:`` around the app;
    ``await keeper.stop()`` before ``engine.complete`` or ``engine.release`` (leaving the block
    stops it too; ``stop`` may be called from any task of the request). Each renewal is one
    store call, run through ``store_call`` (the adapter's thread limiter) or, without it, in
    anyio's worker threads when the store blocks.

    Under asyncio a keeper is a timer handle until its first renewal is due, so the many
    requests that finish within a third of the lease pay about a microsecond for it; each
    renewal runs in a task of its own that nothing cancels, so a cancelled request never
    leaves a renewal half-known. Other anyio backends get a task per keeper.
    """

    def __init__(
        self,
        engine: IdempotencyEngine,
        attempt: Proceed,
        *,
        store_call: StoreCall | None = None,
        interval: float | None = None,
    ) -> None:
        self.engine = engine
        self.attempt = attempt
        self.interval = renewal_interval(engine) if interval is None else interval
        self._store_call = store_call
        #: Whether a renewal found the lease lost (another request took the key over).
        self.lost = False
        #: Renewals that moved the lease.
        self.renewals = 0
        self._stopping = False
        # asyncio: the loop's schedule of renewals due, or the task running one.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._schedule: _LoopSchedule | None = None
        self._task: asyncio.Task[None] | None = None
        # Other backends: a task that sleeps and renews until told to stop.
        self._group: anyio.abc.TaskGroup | None = None
        self._wake: anyio.Event | None = None
        self._stopped: anyio.Event | None = None

    async def __aenter__(self) -> AsyncLeaseKeeper:
        self._loop = _asyncio_loop()
        if self._loop is not None:
            self._schedule = _LoopSchedule.of(self._loop)
            self._schedule.add(self, self.interval)
        else:
            self._wake, self._stopped = anyio.Event(), anyio.Event()
            self._group = anyio.create_task_group()
            await self._group.__aenter__()
            self._group.start_soon(self._keep)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if not self._stopping or self._task is not None or self._wake is not None:
            await self.stop()  # not already stopped by the completion (stop() before complete)
        if self._group is not None:
            # The block's exception is not handed to the task group: anyio would wrap it in an
            # exception group, and the renewal task has already ended.
            group, self._group = self._group, None
            await group.__aexit__(None, None, None)

    async def stop(self) -> None:
        """Stop renewing; returns once no renewal runs, so ``attempt.lease`` is final."""
        self._stopping = True
        if self._schedule is not None:
            self._schedule.discard(self)
        if self._task is None and self._wake is None:
            return  # the common case: no renewal ever started
        # Shielded: a request cancelled meanwhile must still release under the final lease.
        with anyio.CancelScope(shield=True):
            if self._task is not None:
                await asyncio.wait((self._task,))
            if self._wake is not None and self._stopped is not None:
                self._wake.set()
                await self._stopped.wait()

    def _due(self) -> None:
        if not self._stopping and self._loop is not None:
            self._task = self._loop.create_task(self._renew_and_reschedule())

    async def _renew_and_reschedule(self) -> None:
        try:
            if self._stopping:  # stopped between the timer and this task's first step
                return
            delay = await self._renew()
        finally:
            self._task = None
        if delay is not None and not self._stopping and self._schedule is not None:
            self._schedule.add(self, delay)

    async def _keep(self) -> None:
        assert self._wake is not None
        assert self._stopped is not None
        try:
            delay: float | None = self.interval
            while delay is not None:
                with anyio.move_on_after(delay):
                    await self._wake.wait()
                if self._stopping:
                    return
                with anyio.CancelScope(shield=True):
                    delay = await self._renew()
        finally:
            self._stopped.set()

    async def _renew(self) -> float | None:
        """One renewal; the delay until the next one, ``None`` once the lease is lost."""
        before = self.attempt.lease
        try:
            held = await _run(self.engine, self._store_call, self.engine.renew, self.attempt)
        except Exception:
            # engine.renew never raises; a failing store_call must not fail the request.
            logger.exception("idempotency lease renewal could not run")
            held = True
        if not held:
            self.lost = True
            return None
        if self.attempt.lease is before:
            return _retry_after_store_error(self.interval)
        self.renewals += 1
        return self.interval


class _LoopSchedule:
    """The renewals due on one event loop, behind a single timer.

    Most handlers end long before their first renewal, so a keeper is an entry in a dict (added
    and removed in well under a microsecond) rather than a timer of its own: a timer per request
    costs a heap entry that outlives the request once cancelled, and measured about 15 µs a
    request in the in-process benchmark.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # Weakly: the schedule must not keep a finished loop (and its closed resources) alive.
        self._loop = weakref.ref(loop)
        self._due: dict[AsyncLeaseKeeper, float] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = math.inf  # when the timer fires; inf without one

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> _LoopSchedule:
        global _last_schedule
        schedule = _last_schedule
        if schedule is not None and schedule._loop() is loop:
            return schedule  # a server runs one loop: spared the weak dictionary's lookup
        schedule = _SCHEDULES.get(loop)
        if schedule is None:
            schedule = _SCHEDULES[loop] = cls(loop)
        _last_schedule = schedule
        return schedule

    def add(self, keeper: AsyncLeaseKeeper, delay: float) -> None:
        when = self._running_loop().time() + delay
        self._due[keeper] = when
        if when < self._timer_when:
            self._arm(when)

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop()
        if loop is None:  # only its own loop calls a schedule, so it is alive
            raise RuntimeError("the event loop of this lease schedule is gone")
        return loop

    def discard(self, keeper: AsyncLeaseKeeper) -> None:
        self._due.pop(keeper, None)

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._running_loop().call_at(when, self._tick)
        self._timer_when = when

    def _tick(self) -> None:
        self._timer = None
        self._timer_when = math.inf
        now = self._running_loop().time()
        due = [keeper for keeper, when in self._due.items() if when <= now]
        for keeper in due:
            del self._due[keeper]
            keeper._due()
        if self._due:
            self._arm(min(self._due.values()))


#: One schedule per event loop (a server may run several, one per thread).
_SCHEDULES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopSchedule] = (
    weakref.WeakKeyDictionary()
)
#: The schedule asked for last, checked first.
_last_schedule: _LoopSchedule | None = None


def _asyncio_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:  # another anyio backend (trio)
        return None


async def wait_for_answer_async(
    engine: IdempotencyEngine,
    conflict: Conflict,
    *,
    store_call: StoreCall | None = None,
    sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
) -> Decision:
    """Wait for the request ``conflict`` duplicates: its replay, the key (it failed or crashed),
    or the 409 when ``conflict_wait_seconds`` runs out. Holds no thread between polls.

    Cancelling the wait (the client went away) leaves nothing behind: a poll is never cut off
    halfway, and a poll that has just claimed the key for this request releases it again.
    """
    while True:
        await sleep(conflict.delay)
        with anyio.CancelScope(shield=True):
            decision = await _run(engine, store_call, engine.poll, conflict)
        if isinstance(decision, Proceed):
            try:
                await anyio.lowlevel.checkpoint()
            except anyio.get_cancelled_exc_class():
                with anyio.CancelScope(shield=True):
                    await _run(engine, store_call, engine.release, decision)
                raise
        if decision is not None:
            return decision


async def _run(
    engine: IdempotencyEngine,
    store_call: StoreCall | None,
    function: Callable[..., T],
    *args: Any,
) -> T:
    if store_call is not None:
        return await store_call(function, *args)
    if engine.store_async and isinstance(function, StoreStep):
        result: T = await function.native(*args)
        return result
    if engine.store_blocks:
        return await anyio.to_thread.run_sync(function, *args)
    return function(*args)


# WSGI ---------------------------------------------------------------------------------------


class LeaseKeeper:
    """Renews ``attempt``'s lease from a background thread while the handler runs.

    ``with LeaseKeeper(engine, attempt):`` around the app, or ``start()`` / ``stop()`` when the
    handler lives on in the response iterable; ``stop()`` before ``engine.complete`` or
    ``engine.release``. Starting costs no thread: one scheduler thread per process waits for
    every keeper's next renewal and runs each renewal in a thread of its own, so only handlers
    that outlive a third of the lease start one, and a store call that hangs delays no other
    request's renewal.
    """

    def __init__(
        self, engine: IdempotencyEngine, attempt: Proceed, *, interval: float | None = None
    ) -> None:
        self.interval = renewal_interval(engine) if interval is None else interval
        #: Whether a renewal found the lease lost (another request took the key over).
        self.lost = False
        #: Renewals that moved the lease.
        self.renewals = 0
        # Dropped at stop: the scheduler may hold a stopped keeper until its next due time,
        # and must not keep the request (its body) alive meanwhile.
        self._work: tuple[IdempotencyEngine, Proceed] | None = (engine, attempt)
        # Held for the whole of a renewal: stop() waits on it, so it never returns while a
        # renewal runs.
        self._lock = threading.Lock()

    def __enter__(self) -> LeaseKeeper:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> LeaseKeeper:
        _SCHEDULER.schedule(self, time.monotonic() + self.interval)
        return self

    def stop(self) -> None:
        """Stop renewing; returns once no renewal runs, so ``attempt.lease`` is final."""
        with self._lock:
            self._work = None

    @property
    def stopped(self) -> bool:
        return self._work is None

    def _renew(self) -> None:
        with self._lock:
            if self._work is None:
                return
            engine, attempt = self._work
            before = attempt.lease
            try:
                held = engine.renew(attempt)
            except Exception:  # engine.renew never raises; keep renewing if it somehow does
                logger.exception("idempotency lease renewal failed")
                held = True
            if not held:
                self.lost = True
                self._work = None
                return
            if attempt.lease is before:
                delay = _retry_after_store_error(self.interval)
            else:
                self.renewals += 1
                delay = self.interval
        _SCHEDULER.schedule(self, time.monotonic() + delay)


class _Scheduler:
    """One daemon thread per process that sleeps until the next keeper is due, then starts its
    renewal in a new daemon thread. A keeper stopped meanwhile is skipped when due.
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        # Also the child's state after fork(): the parent's thread does not exist there, and
        # the parent's requests (their leases) are not the child's to renew.
        self._condition = threading.Condition(threading.Lock())
        self._due: list[tuple[float, int, LeaseKeeper]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None

    def schedule(self, keeper: LeaseKeeper, at: float) -> None:
        with self._condition:
            heapq.heappush(self._due, (at, next(self._order), keeper))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="idem-lease-scheduler", daemon=True
                )
                self._thread.start()
            elif self._due[0][2] is keeper:
                self._condition.notify()  # due before the one the thread sleeps until

    def _run(self) -> None:
        while True:
            with self._condition:
                while True:
                    if not self._due:
                        self._condition.wait()
                        continue
                    wait = self._due[0][0] - time.monotonic()
                    if wait <= 0:
                        keeper = heapq.heappop(self._due)[2]
                        break
                    self._condition.wait(wait)
            if not keeper.stopped:
                threading.Thread(
                    target=keeper._renew, name="idem-lease-renewal", daemon=True
                ).start()


_SCHEDULER = _Scheduler()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_SCHEDULER._reset)


def wait_for_answer(
    engine: IdempotencyEngine,
    conflict: Conflict,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> Decision:
    """Wait for the request ``conflict`` duplicates (see :func:`wait_for_answer_async`),
    sleeping this thread between polls.
    """
    while True:
        sleep(conflict.delay)
        decision = engine.poll(conflict)
        if decision is not None:
            return decision


__all__ = [
    "RENEWALS_PER_LEASE",
    "AsyncLeaseKeeper",
    "LeaseKeeper",
    "StoreCall",
    "renewal_interval",
    "wait_for_answer",
    "wait_for_answer_async",
]
