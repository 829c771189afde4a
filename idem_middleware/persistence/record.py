"""DataRecord: one idempotency record, as every persistence layer stores it."""

from __future__ import annotations

import time

from idem_middleware.exceptions import IdempotencyInvalidStatusError
from idem_middleware.responses import StoredResponse

STATUS_INPROGRESS = "INPROGRESS"
STATUS_COMPLETED = "COMPLETED"
STATUS_EXPIRED = "EXPIRED"
STATUSES = frozenset({STATUS_INPROGRESS, STATUS_COMPLETED, STATUS_EXPIRED})


class DataRecord:
    """An idempotency record (the Powertools ``DataRecord``, plus the HTTP response it replays).

    ``expiry_timestamp`` is epoch seconds (the DynamoDB TTL attribute);
    ``in_progress_expiry_timestamp`` is epoch milliseconds, when the lease runs out.
    ``lease_id`` is a token unique to each claim (:mod:`idem_middleware.persistence.lease_ids`):
    completion and release are conditional on it and on ``in_progress_expiry_timestamp``
    together, so two claims made in the same millisecond never hold the same lease, and a claim
    that a client library resent after a lost reply can recognise its own record. Records
    written before lease ids existed have none (``None``) and are fenced on
    ``in_progress_expiry_timestamp`` alone, as they were then.

    The response is held in whichever form the record was made with - the serialised
    ``response_data`` a store reads back, or the ``response`` an app just produced - and the
    other form is derived on first use, so a store that keeps objects never serialises.
    """

    __slots__ = (
        "_response",
        "_response_data",
        "expiry_timestamp",
        "idempotency_key",
        "in_progress_expiry_timestamp",
        "lease_id",
        "payload_hash",
        "status",
    )

    def __init__(
        self,
        idempotency_key: str,
        status: str,
        expiry_timestamp: int | None = None,
        in_progress_expiry_timestamp: int | None = None,
        response_data: str | None = None,
        payload_hash: str | None = None,
        *,
        response: StoredResponse | None = None,
        lease_id: str | None = None,
    ) -> None:
        if status not in STATUSES:
            raise IdempotencyInvalidStatusError(f"unknown idempotency record status {status!r}")
        self.idempotency_key = idempotency_key
        self.status = status
        self.expiry_timestamp = expiry_timestamp
        self.in_progress_expiry_timestamp = in_progress_expiry_timestamp
        self.payload_hash = payload_hash
        self.lease_id = lease_id
        self._response_data = response_data
        self._response = response

    @property
    def response_data(self) -> str | None:
        """The response serialised for a store (see :meth:`StoredResponse.encode`)."""
        if self._response_data is None and self._response is not None:
            self._response_data = self._response.encode()
        return self._response_data

    @response_data.setter
    def response_data(self, value: str | None) -> None:
        # A store that kept less than it was given (a body too large) says so here.
        self._response_data = value
        self._response = None

    @property
    def response(self) -> StoredResponse | None:
        """The stored response; ``ValueError`` when ``response_data`` is not one."""
        if self._response is None and self._response_data is not None:
            self._response = StoredResponse.decode(self._response_data)
        return self._response

    def __repr__(self) -> str:
        # Never the response: bodies stay out of logs and tracebacks.
        return (
            f"DataRecord(idempotency_key={self.idempotency_key!r}, status={self.status!r}, "
            f"expiry_timestamp={self.expiry_timestamp!r}, "
            f"in_progress_expiry_timestamp={self.in_progress_expiry_timestamp!r}, "
            f"lease_id={self.lease_id!r}, payload_hash={self.payload_hash!r})"
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

    def holds_same_lease(self, lease: DataRecord) -> bool:
        """Whether this stored record is the in-progress record ``lease`` was claimed with."""
        return (
            self.status == STATUS_INPROGRESS
            and self.lease_id == lease.lease_id
            and self.in_progress_expiry_timestamp == lease.in_progress_expiry_timestamp
        )

    def current_status(self, now: float | None = None) -> str:
        """``status``, or EXPIRED once the record has outlived its expiry."""
        return STATUS_EXPIRED if self.is_expired(now) else self.status
