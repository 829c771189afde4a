"""The named parameters of the fenced writes the SQL stores (SQLite, PostgreSQL) make: the same
names in both, whatever each driver's placeholder style (``:id``, ``%(id)s``).
"""

from __future__ import annotations

from typing import Any

from idem_middleware.persistence.record import STATUS_INPROGRESS, DataRecord


def completion_params(data_record: DataRecord) -> dict[str, Any]:
    """The completion of ``data_record``, fenced on the lease it was claimed with."""
    return {
        "id": data_record.idempotency_key,
        "status": data_record.status,
        "expiration": data_record.expiry_timestamp,
        "data": data_record.response_data,
        "validation": data_record.payload_hash,
        "inprogress": STATUS_INPROGRESS,
        "lease": data_record.in_progress_expiry_timestamp,
        "lease_id": data_record.lease_id,
    }


def renewal_params(lease: DataRecord, renewed: DataRecord) -> dict[str, Any]:
    """``lease`` extended to ``renewed``'s expiries, fenced on ``lease``."""
    return {
        "id": lease.idempotency_key,
        "renewed": renewed.in_progress_expiry_timestamp,
        "expiration": renewed.expiry_timestamp,
        "inprogress": STATUS_INPROGRESS,
        "lease": lease.in_progress_expiry_timestamp,
        "lease_id": lease.lease_id,
    }


def release_params(data_record: DataRecord) -> dict[str, Any]:
    """The release (deletion) of ``data_record``'s claim, fenced on its lease."""
    return {
        "id": data_record.idempotency_key,
        "inprogress": STATUS_INPROGRESS,
        "lease": data_record.in_progress_expiry_timestamp,
        "lease_id": data_record.lease_id,
    }
