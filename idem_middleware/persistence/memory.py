"""InMemoryPersistenceLayer: one process, no I/O. For tests and single-process apps."""

from __future__ import annotations

import math
import threading
from typing import ClassVar

from idem_middleware.exceptions import (
    IdempotencyItemAlreadyExistsError,
    IdempotencyItemNotFoundError,
    IdempotencyLeaseLostError,
    StoreFullError,
)
from idem_middleware.persistence.base import BasePersistenceLayer
from idem_middleware.persistence.record import STATUS_COMPLETED, DataRecord

#: Records kept at most by default: about 120 MB of typical small JSON responses.
DEFAULT_MAX_ITEMS = 100_000


class InMemoryPersistenceLayer(BasePersistenceLayer):
    """Records in a dict behind a lock: safe under threads and asyncio, gone with the process.

    Records are never mutated once stored (every write stores a new object), so a record handed
    out stays consistent. Expired records are swept every ``sweep_interval_seconds``, and at most
    ``max_items`` records are kept: a claim that finds the store full first sweeps the expired
    records, then evicts the oldest completed ones (their keys would run again, as after
    expiry). An in-progress record is never evicted: when every record is in progress, the
    claim fails with :class:`StoreFullError` (a 503) rather than let a duplicate run.
    """

    blocking_io: ClassVar[bool] = False

    def __init__(
        self, *, max_items: int = DEFAULT_MAX_ITEMS, sweep_interval_seconds: float = 60.0
    ) -> None:
        super().__init__()
        if isinstance(max_items, bool) or not isinstance(max_items, int) or max_items < 1:
            raise ValueError(f"max_items must be a positive int, got {max_items!r}")
        if (
            isinstance(sweep_interval_seconds, bool)
            or not isinstance(sweep_interval_seconds, int | float)
            or not 0 <= sweep_interval_seconds < math.inf
        ):
            # Checked here: a bad value would fail every claim (a 500), or never sweep (nan).
            raise ValueError(
                "sweep_interval_seconds must be a finite, non-negative number of seconds, "
                f"got {sweep_interval_seconds!r}"
            )
        self.max_items = max_items
        # Insertion-ordered: the first records are the oldest claims.
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
            key = data_record.idempotency_key
            existing = self._records.get(key)
            if existing is not None:
                if existing.blocks_claim(now):
                    raise IdempotencyItemAlreadyExistsError(existing)
                del self._records[key]  # re-inserted below as the newest record
            elif len(self._records) >= self.max_items:
                self._make_room(now)
            self._records[key] = data_record

    def _get_record(self, idempotency_key: str) -> DataRecord:
        try:
            return self._records[idempotency_key]
        except KeyError:
            raise IdempotencyItemNotFoundError(idempotency_key) from None

    def _update_record(self, data_record: DataRecord) -> None:
        with self._lock:
            self._check_lease(data_record)
            self._records[data_record.idempotency_key] = data_record

    def _renew_record(self, lease: DataRecord, renewed: DataRecord) -> None:
        with self._lock:
            self._check_lease(lease)
            self._records[lease.idempotency_key] = renewed

    def _delete_record(self, data_record: DataRecord) -> None:
        with self._lock:
            self._check_lease(data_record)
            del self._records[data_record.idempotency_key]

    def _remove_record(self, idempotency_key: str) -> bool:
        with self._lock:
            return self._records.pop(idempotency_key, None) is not None

    def _check_lease(self, data_record: DataRecord) -> None:
        current = self._records.get(data_record.idempotency_key)
        if current is None or not current.holds_same_lease(data_record):
            raise IdempotencyLeaseLostError(data_record.idempotency_key)

    def _make_room(self, now: float) -> None:
        """Free at least one slot: expired records first, then the oldest completed ones.

        Evicts a batch (1% of ``max_items``) so that a full store pays the scan once per batch
        of claims, not once per claim.
        """
        self._sweep(now)
        target = self.max_items - max(1, self.max_items // 100)
        if len(self._records) <= target:
            return
        excess = len(self._records) - target
        oldest_completed = []
        for key, record in self._records.items():
            if record.status == STATUS_COMPLETED:
                oldest_completed.append(key)
                if len(oldest_completed) == excess:
                    break
        for key in oldest_completed:
            del self._records[key]
        if len(self._records) >= self.max_items:
            raise StoreFullError(
                f"the in-memory idempotency store holds max_items={self.max_items} requests "
                "still in progress; raise max_items or use a shared store"
            )

    def _sweep(self, now: float) -> None:
        expired = [key for key, record in self._records.items() if record.is_expired(now)]
        for key in expired:
            del self._records[key]
        self._next_sweep = now + self._sweep_interval
