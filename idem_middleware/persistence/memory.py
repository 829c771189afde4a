"""InMemoryPersistenceLayer: one process, no I/O. For tests and single-process apps."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Mapping, MutableMapping
from typing import ClassVar, Final, TypeAlias

from idem_middleware.exceptions import (
    IdempotencyInvalidStatusError,
    IdempotencyItemAlreadyExistsError,
    IdempotencyItemNotFoundError,
    IdempotencyLeaseLostError,
    StoreFullError,
    StoreRecordUnreadableError,
)
from idem_middleware.persistence.base import BasePersistenceLayer
from idem_middleware.persistence.record import STATUS_COMPLETED, STATUS_INPROGRESS, DataRecord
from idem_middleware.responses import StoredResponse

#: Records kept at most by default: about 120 MB of typical small JSON responses.
DEFAULT_MAX_ITEMS = 100_000

#: A record as plain values, in one flat tuple (nested ones take the collector a pass each to
#: untrack): status, expiry_timestamp, in_progress_expiry_timestamp, payload_hash, lease_id,
#: response_data (when only that was given), then the response's status (``None`` without a
#: response), headers, body, body_omitted and reason.
Row: TypeAlias = tuple[
    str,
    "int | None",
    "int | None",
    "str | None",
    "str | None",
    "str | None",
    "int | None",
    tuple[tuple[str, str], ...],
    bytes,
    bool,
    "str | None",
]

# Field positions in a Row.
_STATUS: Final = 0
_EXPIRY: Final = 1
_LEASE_END: Final = 2
_LEASE_ID: Final = 4


class InMemoryPersistenceLayer(BasePersistenceLayer):
    """Records in a dict behind a lock: safe under threads and asyncio, gone with the process.

    Records are kept as tuples of plain values (strings, numbers, bytes), never mutated: the
    garbage collector stops tracking such tuples, so a store of many records adds nothing to the
    heap each of its full collections walks (objects would: with a ``DataRecord`` and a
    ``StoredResponse`` per record, a full collection under load took tens of milliseconds, the
    long tail of latencies). A record read is a new ``DataRecord``, so one handed out stays
    consistent. Expired records are swept every ``sweep_interval_seconds``, and at most
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
        self._rows: dict[str, Row] = {}
        self._lock = threading.Lock()
        self._sweep_interval = sweep_interval_seconds
        self._next_sweep = 0.0

    @property
    def record_count(self) -> int:
        """Records held, live or awaiting the next sweep. (Not ``__len__``: an empty layer
        must stay truthy for ``layer or default``.)
        """
        return len(self._rows)

    @property
    def _records(self) -> MutableMapping[str, DataRecord]:
        """The records as ``DataRecord`` objects, read and written through (tests, debugging)."""
        return _RecordView(self)

    def _put_record(self, data_record: DataRecord) -> None:
        now = self.clock()
        with self._lock:
            if now >= self._next_sweep:
                self._sweep(now)
            key = data_record.idempotency_key
            existing = self._rows.get(key)
            if existing is not None:
                if _blocks_claim(existing, now):
                    raise IdempotencyItemAlreadyExistsError(_record(key, existing))
                del self._rows[key]  # re-inserted below as the newest record
            elif len(self._rows) >= self.max_items:
                self._make_room(now)
            self._rows[key] = _row(data_record)

    def _get_record(self, idempotency_key: str) -> DataRecord:
        try:
            return _record(idempotency_key, self._rows[idempotency_key])
        except KeyError:
            raise IdempotencyItemNotFoundError(idempotency_key) from None

    def _update_record(self, data_record: DataRecord) -> None:
        row = _row(data_record)  # outside the lock: the response may be large
        with self._lock:
            self._check_lease(data_record)
            self._rows[data_record.idempotency_key] = row

    def _renew_record(self, lease: DataRecord, renewed: DataRecord) -> None:
        with self._lock:
            self._check_lease(lease)
            self._rows[lease.idempotency_key] = _row(renewed)

    def _delete_record(self, data_record: DataRecord) -> None:
        with self._lock:
            self._check_lease(data_record)
            del self._rows[data_record.idempotency_key]

    def _remove_record(self, idempotency_key: str) -> bool:
        with self._lock:
            return self._rows.pop(idempotency_key, None) is not None

    def _check_lease(self, data_record: DataRecord) -> None:
        # DataRecord.holds_same_lease, on a row.
        current = self._rows.get(data_record.idempotency_key)
        if (
            current is None
            or current[_STATUS] != STATUS_INPROGRESS
            or current[_LEASE_ID] != data_record.lease_id
            or current[_LEASE_END] != data_record.in_progress_expiry_timestamp
        ):
            raise IdempotencyLeaseLostError(data_record.idempotency_key)

    def _make_room(self, now: float) -> None:
        """Free at least one slot: expired records first, then the oldest completed ones.

        Evicts a batch (1% of ``max_items``) so that a full store pays the scan once per batch
        of claims, not once per claim.
        """
        self._sweep(now)
        target = self.max_items - max(1, self.max_items // 100)
        if len(self._rows) <= target:
            return
        excess = len(self._rows) - target
        oldest_completed = []
        for key, row in self._rows.items():
            if row[_STATUS] == STATUS_COMPLETED:
                oldest_completed.append(key)
                if len(oldest_completed) == excess:
                    break
        for key in oldest_completed:
            del self._rows[key]
        if len(self._rows) >= self.max_items:
            raise StoreFullError(
                f"the in-memory idempotency store holds max_items={self.max_items} requests "
                "still in progress; raise max_items or use a shared store"
            )

    def _sweep(self, now: float) -> None:
        # DataRecord.is_expired, on a row.
        second = int(now)
        expired = [
            key
            for key, row in self._rows.items()
            if row[_EXPIRY] is not None and row[_EXPIRY] < second
        ]
        for key in expired:
            del self._rows[key]
        self._next_sweep = now + self._sweep_interval


def _row(record: DataRecord) -> Row:
    response = record._response
    if response is None:
        return (
            record.status,
            record.expiry_timestamp,
            record.in_progress_expiry_timestamp,
            record.payload_hash,
            record.lease_id,
            record._response_data,
            None,
            (),
            b"",
            False,
            None,
        )
    return (
        record.status,
        record.expiry_timestamp,
        record.in_progress_expiry_timestamp,
        record.payload_hash,
        record.lease_id,
        None,
        response.status,
        response.headers,
        response.body,
        response.body_omitted,
        response.reason,
    )


def _record(key: str, row: Row) -> DataRecord:
    (
        status,
        expiry,
        lease_end,
        payload_hash,
        lease_id,
        response_data,
        response_status,
        headers,
        body,
        body_omitted,
        reason,
    ) = row
    try:
        return DataRecord(
            key,
            status,
            expiry,
            lease_end,
            response_data,
            payload_hash,
            response=None
            if response_status is None
            else StoredResponse(response_status, headers, body, body_omitted, reason),
            lease_id=lease_id,
        )
    except IdempotencyInvalidStatusError:  # written by something else than this version
        raise StoreRecordUnreadableError(
            f"the stored idempotency record has an unknown status {status!r}"
        ) from None


def _blocks_claim(row: Row, now: float) -> bool:
    """DataRecord.blocks_claim, on a row: unexpired, and not in progress under a lease that
    has run out.
    """
    expiry = row[_EXPIRY]
    if expiry is not None and expiry < int(now):
        return False
    lease_end = row[_LEASE_END]
    return not (
        row[_STATUS] == STATUS_INPROGRESS and lease_end is not None and lease_end < int(now * 1000)
    )


class _RecordView(MutableMapping[str, DataRecord]):
    """A layer's rows as ``DataRecord`` objects; writes go through to the rows."""

    def __init__(self, layer: InMemoryPersistenceLayer) -> None:
        self._layer = layer

    def __getitem__(self, key: str) -> DataRecord:
        return _record(key, self._layer._rows[key])

    def __setitem__(self, key: str, record: DataRecord) -> None:
        self._layer._rows[key] = _row(record)

    def __delitem__(self, key: str) -> None:
        del self._layer._rows[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._layer._rows)

    def __len__(self) -> int:
        return len(self._layer._rows)

    def __eq__(self, other: object) -> bool:
        # By value: each read is a new DataRecord, which compares by identity.
        if not isinstance(other, Mapping):
            return NotImplemented
        try:
            rows = {key: _row(record) for key, record in other.items()}
        except AttributeError:  # not records
            return False
        return self._layer._rows == rows

    __hash__ = None  # type: ignore[assignment]
