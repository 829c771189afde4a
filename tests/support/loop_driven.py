"""Layers whose store calls all go through their native asyncio primitives.

The contract suite is written against the blocking API (``save_inprogress``, ...). A layer with
:class:`LoopDriven` mixed in hands each blocking primitive to its asyncio twin (``_aput_record``,
...) on an event loop of its own, in a background thread, and waits for the answer: the whole
suite then checks the asyncio path (Redis, PostgreSQL, DynamoDB through aiobotocore), with the
many threads of the race tests sharing one loop as concurrent requests share a server's.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from idem_middleware.persistence.base import BasePersistenceLayer
from idem_middleware.persistence.record import DataRecord

T = TypeVar("T")


class LoopThread:
    """An asyncio event loop running in a daemon thread; ``run`` waits for a coroutine on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="test-event-loop", daemon=True
        )
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


class LoopDriven(BasePersistenceLayer):
    """Mixed in before a layer class: every record primitive runs as its asyncio twin on
    ``loop_thread``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        assert self.native_async
        self.loop_thread = LoopThread()

    def _put_record(self, data_record: DataRecord) -> None:
        self.loop_thread.run(self._aput_record(data_record))

    def _get_record(self, idempotency_key: str) -> DataRecord:
        return self.loop_thread.run(self._aget_record(idempotency_key))

    def _update_record(self, data_record: DataRecord) -> None:
        self.loop_thread.run(self._aupdate_record(data_record))

    def _renew_record(self, lease: DataRecord, renewed: DataRecord) -> None:
        self.loop_thread.run(self._arenew_record(lease, renewed))

    def _delete_record(self, data_record: DataRecord) -> None:
        self.loop_thread.run(self._adelete_record(data_record))

    def stop_loop(self) -> None:
        """Close what the layer opened on its loop, then the loop."""
        self.loop_thread.run(self.aclose())
        self.loop_thread.stop()
