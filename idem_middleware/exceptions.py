"""Exceptions, in two families::

    IdempotencyError
    ├── IdempotencyHTTPError                  answered to the client as problem+json
    │   ├── IdempotencyKeyMissingError           400  idempotency_key_missing
    │   ├── IdempotencyKeyInvalidError           400  idempotency_key_invalid
    │   ├── IdempotencyKeyError                  400  request_body_invalid
    │   ├── RequestBodyIncompleteError           400  request_body_incomplete
    │   ├── RequestBodyTooLargeError             413  request_body_too_large
    │   ├── IdempotencyAlreadyInProgressError    409  idempotency_key_in_use
    │   ├── IdempotencyValidationError           422  idempotency_key_reused
    │   └── IdempotencyStoreUnavailableError     503  idempotency_store_unavailable
    └── IdempotencyPersistenceError           signals of a persistence layer to the engine
        ├── IdempotencyItemAlreadyExistsError    the claim found a live record (it carries it)
        ├── IdempotencyItemNotFoundError
        ├── IdempotencyLeaseLostError            another request took the key over
        ├── IdempotencyPayloadMismatchError      the record was made by another payload
        ├── IdempotencyInvalidStatusError
        └── IdempotencyPersistenceLayerError     the store failed; the engine answers 503
            ├── StoreUnreachableError
            ├── StoreNotAuthorisedError
            ├── StoreNotFoundError
            ├── StoreRecordUnreadableError
            ├── StoreRequestRejectedError
            └── StoreFullError

A persistence layer raises only the second family; the engine decides what a client is told.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from idem_middleware.persistence.record import DataRecord


class IdempotencyError(Exception):
    """Base class of every exception raised by idem_middleware."""


# Client-facing problems ---------------------------------------------------------------------


class IdempotencyHTTPError(IdempotencyError):
    """An outcome answered with an RFC 9457 problem response instead of running the handler."""

    status: ClassVar[int] = 400
    code: ClassVar[str] = "idempotency_error"
    title: ClassVar[str] = "Idempotency error"
    retry_after: ClassVar[int | None] = None

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class IdempotencyKeyMissingError(IdempotencyHTTPError):
    status = 400
    code = "idempotency_key_missing"
    title = "Idempotency key missing"


class IdempotencyKeyInvalidError(IdempotencyHTTPError):
    status = 400
    code = "idempotency_key_invalid"
    title = "Idempotency key invalid"


class IdempotencyKeyError(IdempotencyHTTPError):
    """The body is not the JSON document the key or fingerprint is selected from, or the
    selection cannot be evaluated on it.
    """

    status = 400
    code = "request_body_invalid"
    title = "Request body unusable for the idempotency key"


class RequestBodyIncompleteError(IdempotencyHTTPError):
    """The client sent fewer bytes than its Content-Length announced."""

    status = 400
    code = "request_body_incomplete"
    title = "Request body incomplete"


class RequestBodyTooLargeError(IdempotencyHTTPError):
    status = 413
    code = "request_body_too_large"
    title = "Request body too large"


class IdempotencyAlreadyInProgressError(IdempotencyHTTPError):
    status = 409
    code = "idempotency_key_in_use"
    title = "A request with this idempotency key is still in progress"
    retry_after = 1


class IdempotencyValidationError(IdempotencyHTTPError):
    """The key was first used with a different payload (method, path, query or body)."""

    status = 422
    code = "idempotency_key_reused"
    title = "Idempotency key reused with a different request"


class IdempotencyStoreUnavailableError(IdempotencyHTTPError):
    """The answer to a store fault under ``on_store_error="reject"``: the client retries later."""

    status = 503
    code = "idempotency_store_unavailable"
    title = "Idempotency store unavailable"
    retry_after = 5


# Persistence signals ------------------------------------------------------------------------


class IdempotencyPersistenceError(IdempotencyError):
    """Base class of what a persistence layer tells the engine."""


class IdempotencyItemAlreadyExistsError(IdempotencyPersistenceError):
    """The atomic claim found a live record; it carries that record (one round trip)."""

    def __init__(self, old_data_record: DataRecord | None = None) -> None:
        super().__init__("an idempotency record already exists for this key")
        self.old_data_record = old_data_record


class IdempotencyItemNotFoundError(IdempotencyPersistenceError):
    """No record is stored under the key (or the one stored has expired)."""


class IdempotencyLeaseLostError(IdempotencyPersistenceError):
    """The record is no longer held by this request's lease: another request took it over."""


class IdempotencyPayloadMismatchError(IdempotencyPersistenceError):
    """The record was made by a request with another payload fingerprint."""


class IdempotencyInvalidStatusError(IdempotencyPersistenceError):
    """A stored record has a status this version does not know."""


class IdempotencyPersistenceLayerError(IdempotencyPersistenceError):
    """The store could not be reached or refused the operation; the cause is chained.

    The engine answers it with 503 (:class:`IdempotencyStoreUnavailableError`) or runs the
    request un-deduplicated, as ``on_store_error`` says. The subclasses name causes that are
    clear, each message naming the store and what to fix (for ``check()`` at startup, the CLI
    and the log).
    """


class StoreUnreachableError(IdempotencyPersistenceLayerError):
    """The store did not answer: wrong host or port, network down, server stopped."""


class StoreNotAuthorisedError(IdempotencyPersistenceLayerError):
    """The store answered but refused these credentials or this operation."""


class StoreNotFoundError(IdempotencyPersistenceLayerError):
    """The store answered but the table (or the SQLite file's directory) does not exist."""


class StoreRecordUnreadableError(IdempotencyPersistenceLayerError):
    """A stored record has an unknown status or data this version cannot read."""


class StoreRequestRejectedError(IdempotencyPersistenceLayerError):
    """The store refused the request itself (e.g. an item over DynamoDB's size limit): the same
    request would be refused again, so it is not retried.
    """


class StoreFullError(IdempotencyPersistenceLayerError):
    """The store has no room for a new record (a bounded in-memory store of in-flight keys)."""
