"""Exceptions. Every error a client can cause knows its HTTP status and problem ``code``."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from idem_middleware.persistence.record import DataRecord


class IdempotencyError(Exception):
    """Base class of every exception raised by idem_middleware."""


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
    """The body could not be read as the JSON document the key or fingerprint is selected from."""

    status = 400
    code = "request_body_invalid"
    title = "Request body is not valid JSON"


class RequestBodyTooLargeError(IdempotencyHTTPError):
    status = 413
    code = "request_body_too_large"
    title = "Request body too large"


class RequestBodyIncompleteError(IdempotencyHTTPError):
    """The client sent fewer bytes than its Content-Length announced."""

    status = 400
    code = "request_body_incomplete"
    title = "Request body incomplete"


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


class IdempotencyPersistenceLayerError(IdempotencyHTTPError):
    """The store could not be reached or refused the operation; the cause is chained."""

    status = 503
    code = "idempotency_store_unavailable"
    title = "Idempotency store unavailable"
    retry_after = 5


class IdempotencyItemAlreadyExistsError(IdempotencyError):
    """The atomic claim found a live record; it carries that record (one round trip)."""

    def __init__(self, old_data_record: DataRecord | None = None) -> None:
        super().__init__("an idempotency record already exists for this key")
        self.old_data_record = old_data_record


class IdempotencyItemNotFoundError(IdempotencyError):
    """No record is stored under the key (or the one stored has expired)."""


class IdempotencyLeaseLostError(IdempotencyError):
    """The record is no longer held by this request's lease: another request took it over."""


class IdempotencyInvalidStatusError(IdempotencyError):
    """A stored record has a status this version does not know."""


# Store faults whose cause is clear. Each is a 503 like its base class (a request is never run
# un-deduplicated because of them unless ``on_store_error="passthrough"``); the message names the
# store and what to fix, for ``check()`` at startup, the CLI and the log.


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
