"""DataRecord: one idempotency record, as every persistence layer stores it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property

from idem_middleware.exceptions import IdempotencyInvalidStatusError
from idem_middleware.responses import StoredResponse

STATUS_INPROGRESS = "INPROGRESS"
STATUS_COMPLETED = "COMPLETED"
STATUS_EXPIRED = "EXPIRED"
STATUSES = frozenset({STATUS_INPROGRESS, STATUS_COMPLETED, STATUS_EXPIRED})


@dataclass(eq=False)
class DataRecord:
    """An idempotency record (the Powertools ``DataRecord``, plus the HTTP response it replays).

    ``expiry_timestamp`` is epoch seconds (the DynamoDB TTL attribute);
    ``in_progress_expiry_timestamp`` is epoch milliseconds and doubles as the lease token: each
    claim sets a later value than the lease it replaces, so completion and release can be made
    conditional on it.
    """

    idempotency_key: str
    status: str = ""
    expiry_timestamp: int | None = None
    in_progress_expiry_timestamp: int | None = None
    response_data: str | None = field(default=None, repr=False)
    payload_hash: str | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise IdempotencyInvalidStatusError(
                f"unknown idempotency record status {self.status!r}"
            )

    def is_expired(self, now: float | None = None) -> bool:
        if self.expiry_timestamp is None:
            return False
        return self.expiry_timestamp < int(time.time() if now is None else now)

    def lease_expired(self, now: float | None = None) -> bool:
        if self.in_progress_expiry_timestamp is None:
            return False
        now_ms = int((time.time() if now is None else now) * 1000)
        return self.in_progress_expiry_timestamp < now_ms

    def blocks_claim(self, now: float | None = None) -> bool:
        """Whether a new claim on this key must fail: the record is unexpired, and not an
        in-progress record whose lease has run out (its request is presumed crashed).
        """
        if self.is_expired(now):
            return False
        return not (self.status == STATUS_INPROGRESS and self.lease_expired(now))

    def current_status(self, now: float | None = None) -> str:
        """``status``, or EXPIRED once the record has outlived its expiry."""
        return STATUS_EXPIRED if self.is_expired(now) else self.status

    @cached_property
    def response(self) -> StoredResponse | None:
        """The stored response, decoded once per record object."""
        return None if self.response_data is None else StoredResponse.decode(self.response_data)
