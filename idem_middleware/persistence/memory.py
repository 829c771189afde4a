"""InMemoryPersistenceLayer: one process, no I/O. For tests and single-process apps."""

from __future__ import annotations

import threading
from typing import ClassVar

from idem_middleware.exceptions import (
    IdempotencyItemAlreadyExistsError,
    IdempotencyItemNotFoundError,
    IdempotencyLeaseLostError,
)
from idem_middleware.persistence.base import BasePersistenceLayer
from idem_middleware.persistence.record import STATUS_INPROGRESS, DataRecord


class InMemoryPersistenceLayer(BasePersistenceLayer):
    """Records in a dict behind a lock: safe under threads and asyncio, gone with the process.

    Records are never mutated once stored (every write stores a new object), so a record handed
    out stays consistent. Expired records are swept every ``sweep_interval_seconds``, so memory
    stays bounded by the records that are still live.
    """

    blocking_io: ClassVar[bool] = False

    def __init__(self, *, sweep_interval_seconds: float = 60.0) -> None:
        super().__init__()
        self._records: dict[str, DataRecord] = {}
        self._lock = threading.Lock()
        self._sweep_interval = sweep_interval_seconds
        self._next_sweep = 0.0

    @property
    def record_count(self) -> int:
        """Records held, live or awaiting the next sweep. (Not ``__len__``: an empty layer
        must stay truthy for ``layer or default``.)
        """
        return len(self._records)

    def _put_record(self, data_record: DataRecord) -> None:
        now = self.clock()
        with self._lock:
            if now >= self._next_sweep:
                self._sweep(now)
            existing = self._records.get(data_record.idempotency_key)
            if existing is not None and existing.blocks_claim(now):
                raise IdempotencyItemAlreadyExistsError(existing)
            self._records[data_record.idempotency_key] = data_record

    def _get_record(self, idempotency_key: str) -> DataRecord:
        try:
            return self._records[idempotency_key]
        except KeyError:
            raise IdempotencyItemNotFoundError(idempotency_key) from None

    def _update_record(self, data_record: DataRecord) -> None:
        with self._lock:
            self._check_lease(data_record)
            self._records[data_record.idempotency_key] = data_record

    def _delete_record(self, data_record: DataRecord) -> None:
        with self._lock:
            self._check_lease(data_record)
            del self._records[data_record.idempotency_key]

    def _remove_record(self, idempotency_key: str) -> bool:
        with self._lock:
            return self._records.pop(idempotency_key, None) is not None

    def _check_lease(self, data_record: DataRecord) -> None:
        current = self._records.get(data_record.idempotency_key)
        if (
            current is None
            or current.status != STATUS_INPROGRESS
            or current.in_progress_expiry_timestamp != data_record.in_progress_expiry_timestamp
        ):
            raise IdempotencyLeaseLostError(data_record.idempotency_key)

    def _sweep(self, now: float) -> None:
        expired = [key for key, record in self._records.items() if record.is_expired(now)]
        for key in expired:
            del self._records[key]
        self._next_sweep = now + self._sweep_interval
