"""A PostgresPersistenceLayer whose store calls all go through its native asyncio primitives.

As :mod:`tests.support.async_redis` does for Redis: the blocking primitives hand each call to
the layer's asyncio twin (``_aput_record``, ...) on an event loop of its own, in a background
thread, and wait for the answer. The contract suite then checks the asyncio pool and statements,
with the many threads of the race tests sharing one loop as concurrent requests share a server's.
"""

from __future__ import annotations

from typing import Any

from idem_middleware.persistence.postgres import PostgresPersistenceLayer
from idem_middleware.persistence.record import DataRecord
from tests.support.async_redis import LoopThread


class AsyncDrivenPostgresLayer(PostgresPersistenceLayer):
    """Every record primitive runs as its asyncio twin on ``loop_thread``."""

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

    def close(self) -> None:
        self.loop_thread.run(self.aclose())
        self.loop_thread.stop()
        super().close()
