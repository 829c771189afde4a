"""Store steps: every operation that touches the store is written once, then run blocking or
awaited on the event loop.

An operation (a claim, a completion with its bounded retries, a lease renewal, the engine's
claim with its fallback read) is a generator that yields the store calls it needs, as
``(primitive, args)``, and receives each call's result or has its exception thrown in (sans-IO).
:func:`run` makes the calls with the layer's blocking primitives (``_put_record``, ...);
:func:`arun` awaits its native async ones (``_aput_record``, ...) on the running event loop, so a
store with an asyncio client (Redis) needs no worker thread and no second copy of the logic.
The pause between two write attempts is a call too (``sleep`` / ``async_sleep``).

Given a :class:`StoreTimer`, both runners time the store calls (not the pauses) of the step they
run and keep the sum there; :func:`store_timer` returns it while the step runs, so the events a
step emits can say how long its store calls took. Without one, nothing is timed.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from time import perf_counter
from typing import Any, Generic, NamedTuple, ParamSpec, TypeVar

from idem_middleware.exceptions import IdempotencyItemAlreadyExistsError

T = TypeVar("T")
P = ParamSpec("P")


class Primitive(NamedTuple):
    """A store call, by the names of the layer's attributes that make it."""

    blocking: str
    native_async: str
    #: Exceptions of the call that are answers, not failures: the runner sends them to the step
    #: as the call's result (without their traceback) instead of throwing them into it.
    answers: tuple[type[Exception], ...] = ()


PUT = Primitive("_put_record", "_aput_record")
#: The claim (``_put_record``) with the live record it found as its result: a replay's path,
#: spared an exception raised through every step between the store call and the engine.
CLAIM = Primitive("_put_record", "_aput_record", (IdempotencyItemAlreadyExistsError,))
GET = Primitive("_get_record", "_aget_record")
UPDATE = Primitive("_update_record", "_aupdate_record")
RENEW = Primitive("_renew_record", "_arenew_record")
DELETE = Primitive("_delete_record", "_adelete_record")
SLEEP = Primitive("sleep", "async_sleep")

#: One store call a step needs: the primitive and its positional arguments.
StoreCall = tuple[Primitive, tuple[Any, ...]]
#: An operation as steps, returning ``T``.
Steps = Generator[StoreCall, Any, T]


class StoreTimer:
    """The seconds spent so far in the store calls of the step running."""

    __slots__ = ("seconds",)

    def __init__(self) -> None:
        self.seconds = 0.0


# A context variable, not an attribute of the step: one StoreStep serves concurrent requests
# (threads, tasks), each running in its own context.
_timer: ContextVar[StoreTimer | None] = ContextVar("idem_middleware_store_timer", default=None)


def store_timer() -> StoreTimer | None:
    """The timer of the step running in this context (thread or task); ``None`` outside one."""
    return _timer.get()


@contextmanager
def timing(timer: StoreTimer | None) -> Iterator[None]:
    """Make ``timer`` the one events emitted in this block read (a store call made outside a
    step, such as a local lookup that reads the store).
    """
    token = None if timer is None else _timer.set(timer)
    try:
        yield
    finally:
        if token is not None:
            _timer.reset(token)


def _outcome(primitive: Primitive, error: Exception) -> tuple[Any, Exception | None]:
    """What a store call that raised ``error`` gives its step: ``(result, None)`` when the error
    is one of the call's answers, else ``(None, error)``, to be thrown into the step.
    """
    if primitive.answers and isinstance(error, primitive.answers):
        # Its traceback holds the runner's frame, which would hold it: a reference cycle.
        return error.with_traceback(None), None
    return None, error


def run(layer: object, steps: Steps[T], timer: StoreTimer | None = None) -> T:
    """Run ``steps`` with ``layer``'s blocking primitives; returns what the steps return."""
    result: Any = None
    error: Exception | None = None
    token = None if timer is None else _timer.set(timer)
    try:
        while True:
            try:
                if error is None:
                    primitive, args = steps.send(result)
                else:
                    # Thrown into the step, which may handle it, then dropped: a frame that kept
                    # it would be in its traceback, and the traceback in the frame, a cycle.
                    thrown, error = error, None
                    try:
                        primitive, args = steps.throw(thrown)
                    finally:
                        del thrown
            except StopIteration as done:
                value: T = done.value
                return value
            started = 0.0 if timer is None else perf_counter()
            try:
                result = getattr(layer, primitive.blocking)(*args)
            except Exception as exc:
                result, error = _outcome(primitive, exc)
            if timer is not None and primitive is not SLEEP:
                timer.seconds += perf_counter() - started
    finally:
        if token is not None:
            _timer.reset(token)


async def arun(layer: object, steps: Steps[T], timer: StoreTimer | None = None) -> T:
    """Run ``steps`` with ``layer``'s native async primitives, on the running event loop."""
    result: Any = None
    error: Exception | None = None
    token = None if timer is None else _timer.set(timer)
    try:
        while True:
            try:
                if error is None:
                    primitive, args = steps.send(result)
                else:
                    # Thrown into the step, which may handle it, then dropped: a frame that kept
                    # it would be in its traceback, and the traceback in the frame, a cycle.
                    thrown, error = error, None
                    try:
                        primitive, args = steps.throw(thrown)
                    finally:
                        del thrown
            except StopIteration as done:
                value: T = done.value
                return value
            # Wall time of the awaited call: under a busy loop it includes waiting for the loop.
            started = 0.0 if timer is None else perf_counter()
            try:
                result = await getattr(layer, primitive.native_async)(*args)
            except Exception as exc:
                result, error = _outcome(primitive, exc)
            if timer is not None and primitive is not SLEEP:
                timer.seconds += perf_counter() - started
    finally:
        if token is not None:
            _timer.reset(token)


class StoreStep(Generic[P, T]):
    """An operation written as steps, bound to the layer that runs them: calling it runs it
    blocking (WSGI, worker threads); ``await step.native(...)`` runs it through the layer's
    native async path (``layer.native_async``) on the event loop.
    """

    def __init__(
        self,
        layer: object,
        steps: Callable[P, Steps[T]],
        *,
        timed: Callable[[], bool] | None = None,
    ) -> None:
        self.layer = layer
        self.steps = steps
        #: Asked before each run whether to time its store calls (whether anyone reads them).
        self.timed = timed
        self.__doc__ = steps.__doc__
        # Named as the operation it runs: ``_claim_steps`` is ``claim``.
        self.__name__ = getattr(steps, "__name__", "step").strip("_").removesuffix("_steps")

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> T:
        timer = StoreTimer() if self.timed is not None and self.timed() else None
        return run(self.layer, self.steps(*args, **kwargs), timer)

    async def native(self, *args: P.args, **kwargs: P.kwargs) -> T:
        timer = StoreTimer() if self.timed is not None and self.timed() else None
        return await arun(self.layer, self.steps(*args, **kwargs), timer)

    def __repr__(self) -> str:
        return f"<StoreStep {self.__name__} of {self.layer!r}>"
