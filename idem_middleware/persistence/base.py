"""BasePersistenceLayer: the logic every store shares; backends only move records.

Mirrors the persistence layer of Powertools for AWS Lambda: the base class builds keys, sets
expiries, validates payloads and keeps the local cache; a backend implements the primitives
(claim, read, complete, renew, release, remove). On top of Powertools it fences completion,
release and lease renewal on the lease a request holds, and renews leases while handlers run.

Each public operation is written once, as store steps (:mod:`idem_middleware.persistence.steps`):
``save_inprogress`` runs ``save_inprogress_steps`` with the blocking primitives, and a layer with
a native async path (``native_async``) has the same steps awaited on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from typing import ClassVar

from cachetools import LRUCache

from idem_middleware.config import IdempotencyConfig
from idem_middleware.exceptions import (
    IdempotencyItemAlreadyExistsError,
    IdempotencyItemNotFoundError,
    IdempotencyLeaseLostError,
    IdempotencyPayloadMismatchError,
    IdempotencyPersistenceLayerError,
    StoreNotAuthorisedError,
    StoreNotFoundError,
    StoreRecordUnreadableError,
    StoreRequestRejectedError,
)
from idem_middleware.keys import hasher
from idem_middleware.persistence.lease_ids import new_lease_id
from idem_middleware.persistence.record import (
    STATUS_COMPLETED,
    STATUS_INPROGRESS,
    STATUSES,
    DataRecord,
)
from idem_middleware.persistence.steps import (
    CLAIM,
    DELETE,
    GET,
    RENEW,
    SLEEP,
    UPDATE,
    Primitive,
    Steps,
    run,
)
from idem_middleware.responses import StoredResponse

DEFAULT_KEY_PREFIX = "idempotency"


class BasePersistenceLayer(ABC):
    """Stores idempotency records. Subclasses implement ``_put_record``, ``_get_record``,
    ``_update_record``, ``_renew_record``, ``_delete_record`` and ``_remove_record``; everything
    else lives here, once.
    """

    #: ``True`` when the primitives do network or disk I/O: the ASGI adapter then runs them in a
    #: worker thread so the event loop never waits on the store.
    blocking_io: ClassVar[bool] = True

    #: ``True`` when the layer also has native async primitives (``_aput_record``,
    #: ``_aget_record``, ``_aupdate_record``, ``_arenew_record``, ``_adelete_record``) that run
    #: on the event loop: the ASGI adapter then awaits its store steps there instead of moving
    #: each call to a worker thread. The logic stays in the steps, shared by both paths.
    native_async: bool = False

    #: Largest response body this store keeps unless the config says otherwise. Larger responses
    #: stream through and their record keeps status and headers only.
    max_response_bytes: int = 4 * 1024 * 1024

    #: Attempts at a completion or release write that fails with a store error (a short network
    #: partition, a locked SQLite file) before giving up: by then the handler has run, and a
    #: record left in progress makes the client's retry wait out the lease and run it again.
    write_attempts: int = 3
    #: Sleep before the second attempt; each later one sleeps four times longer, with jitter.
    write_retry_delay_seconds: float = 0.05

    def __init__(self) -> None:
        self.config = IdempotencyConfig()
        self.key_prefix = DEFAULT_KEY_PREFIX
        self._configured_with: IdempotencyConfig | None = None
        self._hash = hasher(self.config.hash_function)
        self._cache: LRUCache[str, DataRecord] | None = None
        self._cache_lock = threading.Lock()
        #: Source of "now" in epoch seconds; tests replace it to move time without sleeping.
        self.clock: Callable[[], float] = time.time
        #: How the write retries wait; tests replace it to count the waits without sleeping.
        self.sleep: Callable[[float], None] = time.sleep
        #: The same on the native async path.
        self.async_sleep: Callable[[float], Awaitable[None]] = asyncio.sleep

    def configure(self, config: IdempotencyConfig, key_prefix: str | None = None) -> None:
        """Adopt the middleware's config. A layer serves one config: reusing it with another
        would silently change the keys, expiries and cache of the first.
        """
        if self._configured_with is not None:
            if self._configured_with == config and key_prefix in (None, self.key_prefix):
                return
            raise ValueError(
                "this persistence layer is already configured for another IdempotencyConfig; "
                "create one layer per middleware"
            )
        self._configured_with = config
        self.config = config
        self.key_prefix = key_prefix or config.key_prefix or DEFAULT_KEY_PREFIX
        self._hash = hasher(config.hash_function)
        if config.use_local_cache:
            self._cache = LRUCache(maxsize=config.local_cache_max_items)

    def check(self) -> None:
        """Raise :class:`IdempotencyPersistenceLayerError` naming the cause when the store cannot
        serve requests (unreachable, not authorised, table or file missing); return otherwise.

        For startup (the ASGI adapter calls it at lifespan startup), the CLI and health checks.
        The default reads a key no request uses; backends override it with a sharper probe.
        """
        with contextlib.suppress(IdempotencyItemNotFoundError):
            self._get_record(f"{self.key_prefix}#check")

    async def aclose(self) -> None:
        """Close what this layer opened on the running event loop (an asyncio client or pool);
        what it was given stays its owner's. The ASGI middleware calls it at lifespan shutdown.
        Layers that open nothing per loop have nothing to close.
        """
        return None

    # Keys ---------------------------------------------------------------------------------

    def build_idempotency_key(self, key_material: str, scope: str | None = None) -> str:
        """The stored key: the prefix, then a hash of the scope and the key material.

        Hashing keeps raw client keys out of the store and makes two scopes (tenants, users)
        with the same client key name two different records.
        """
        digest = self._hash(b"" if scope is None else scope.encode("utf-8"))
        digest.update(b"\0")
        digest.update(key_material.encode("utf-8"))
        return f"{self.key_prefix}#{digest.hexdigest()}"

    # Public API ---------------------------------------------------------------------------

    def save_inprogress(self, idempotency_key: str, payload_hash: str) -> DataRecord:
        """Atomically claim the key; returns the lease this request now holds.

        Raises :class:`IdempotencyItemAlreadyExistsError` carrying the live record found instead.
        """
        return run(self, self.save_inprogress_steps(idempotency_key, payload_hash))

    def save_inprogress_steps(self, idempotency_key: str, payload_hash: str) -> Steps[DataRecord]:
        """:meth:`save_inprogress` as store steps."""
        outcome = yield from self.claim_steps(idempotency_key, payload_hash)
        if isinstance(outcome, IdempotencyItemAlreadyExistsError):
            raise outcome
        return outcome

    def claim_steps(
        self, idempotency_key: str, payload_hash: str
    ) -> Steps[DataRecord | IdempotencyItemAlreadyExistsError]:
        """:meth:`save_inprogress_steps`, with a live record found returned (as the error that
        carries it) rather than raised: the engine's claim, for which a collision (a replay) is
        an answer as common as a claim.
        """
        cached = self.get_cached_record(idempotency_key)
        if cached is not None:
            return IdempotencyItemAlreadyExistsError(cached)
        now = self.clock()
        lease = DataRecord(
            idempotency_key=idempotency_key,
            status=STATUS_INPROGRESS,
            expiry_timestamp=int(now) + self.config.expires_after_seconds,
            in_progress_expiry_timestamp=int(
                (now + self.config.in_progress_expires_after_seconds) * 1000
            ),
            payload_hash=payload_hash,
            lease_id=new_lease_id(),
        )
        found = yield CLAIM, (lease,)
        if not isinstance(found, IdempotencyItemAlreadyExistsError):
            return lease
        existing = found.old_data_record
        # botocore and redis-py resend a write whose reply was lost; the resend then finds the
        # record the first attempt wrote. Its lease id (unique to each claim) says it is this
        # request's own, so the claim succeeded: proceed instead of waiting out our own lease
        # with a 409.
        if existing is not None and existing.holds_same_lease(lease):
            return lease
        if existing is not None and existing.status not in STATUSES:
            raise StoreRecordUnreadableError(
                f"the stored idempotency record has an unknown status {existing.status!r}"
            )
        return found

    def save_success(
        self,
        lease: DataRecord,
        response: StoredResponse,
        *,
        expires_after_seconds: int | None = None,
    ) -> DataRecord:
        """Complete the record held by ``lease`` with the response to replay, kept for
        ``expires_after_seconds`` (default: the config's; a route's own, ``@idempotent``).

        Raises :class:`IdempotencyLeaseLostError` when another request has taken the key over.
        """
        return run(
            self,
            self.save_success_steps(lease, response, expires_after_seconds=expires_after_seconds),
        )

    def save_success_steps(
        self,
        lease: DataRecord,
        response: StoredResponse,
        *,
        expires_after_seconds: int | None = None,
    ) -> Steps[DataRecord]:
        """:meth:`save_success` as store steps."""
        record = DataRecord(
            idempotency_key=lease.idempotency_key,
            status=STATUS_COMPLETED,
            expiry_timestamp=int(self.clock())
            + (expires_after_seconds or self.config.expires_after_seconds),
            in_progress_expiry_timestamp=lease.in_progress_expiry_timestamp,
            payload_hash=lease.payload_hash,
            response=response,
            lease_id=lease.lease_id,
        )
        yield from self._write_with_retries(UPDATE, record, self._completed_under)
        self._save_to_cache(record)
        return record

    def renew_lease(self, lease: DataRecord) -> DataRecord:
        """Move the lease's end a full ``in_progress_expires_after_seconds`` past now, while the
        handler still runs; returns the renewed lease, which the request completes or releases
        with from then on (the one it renewed no longer holds the record).

        Fenced like a completion: raises :class:`IdempotencyLeaseLostError` when the record is
        no longer this lease's. Not retried: the lease keeper renews again well before the
        lease runs out.
        """
        return run(self, self.renew_lease_steps(lease))

    def renew_lease_steps(self, lease: DataRecord) -> Steps[DataRecord]:
        """:meth:`renew_lease` as store steps."""
        now = self.clock()
        previous_end = lease.in_progress_expiry_timestamp or 0
        renewed = DataRecord(
            idempotency_key=lease.idempotency_key,
            status=STATUS_INPROGRESS,
            # The record must outlive its lease, or a live request's key could be claimed.
            expiry_timestamp=max(
                lease.expiry_timestamp or 0, int(now) + self.config.expires_after_seconds
            ),
            # Always later than the lease it replaces, so the old token stops matching even
            # when the renewal lands within the claim's millisecond.
            in_progress_expiry_timestamp=max(
                int((now + self.config.in_progress_expires_after_seconds) * 1000),
                previous_end + 1,
            ),
            payload_hash=lease.payload_hash,
            lease_id=lease.lease_id,
        )
        try:
            yield RENEW, (lease, renewed)
        except IdempotencyLeaseLostError:
            # botocore and redis-py resend a write whose reply was lost: the resend then finds
            # the renewal the first attempt made.
            if (yield from self._holds(renewed)):
                return renewed
            raise
        return renewed

    def _holds(self, lease: DataRecord) -> Steps[bool]:
        try:
            current: DataRecord = yield GET, (lease.idempotency_key,)
        except (IdempotencyItemNotFoundError, IdempotencyPersistenceLayerError):
            return False
        return current.holds_same_lease(lease)

    def delete_record(self, lease: DataRecord) -> None:
        """Release the key held by ``lease`` so a retry runs the handler again.

        Raises :class:`IdempotencyLeaseLostError` when another request has taken the key over.
        """
        run(self, self.delete_record_steps(lease))

    def delete_record_steps(self, lease: DataRecord) -> Steps[None]:
        """:meth:`delete_record` as store steps."""
        self._evict_from_cache(lease.idempotency_key)
        yield from self._write_with_retries(DELETE, lease, None)

    def _write_with_retries(
        self,
        write: Primitive,
        record: DataRecord,
        already_done: Callable[[DataRecord], Steps[bool]] | None,
    ) -> Steps[None]:
        """Run a fenced write (completion or release), retrying store errors with a bounded
        backoff: at most ``write_attempts`` attempts, and none started later than a quarter of
        the lease after the first, so a request never holds its response for long and the
        write lands well before another request could take the lease over.

        A lost lease is an answer, never retried. After a failed attempt the write may have
        landed anyway (the reply was lost), so a lost lease is then checked against the store:
        ``already_done`` (a completion) or the record being gone (a release) means success.
        """
        budget = self.config.in_progress_expires_after_seconds / 4
        started = time.monotonic()
        delay = self.write_retry_delay_seconds
        attempt = 1
        while True:
            try:
                yield write, (record,)
                return
            except IdempotencyLeaseLostError:
                if already_done is not None:
                    if (yield from already_done(record)):
                        return
                elif attempt > 1 and (yield from self._is_gone(record.idempotency_key)):
                    return
                raise
            except (
                StoreNotFoundError,
                StoreNotAuthorisedError,
                StoreRecordUnreadableError,
                StoreRequestRejectedError,
            ):
                raise  # the cause is clear and lasting: retrying only delays the answer
            except IdempotencyPersistenceLayerError as exc:
                pause = delay * (0.5 + random.random() / 2)  # noqa: S311 - jitter, not secrets
                if attempt >= self.write_attempts or time.monotonic() - started + pause > budget:
                    if attempt > 1:
                        exc.args = (f"{exc} (gave up after {attempt} attempts)",)
                    raise
            yield SLEEP, (pause,)
            delay *= 4
            attempt += 1

    def _is_gone(self, idempotency_key: str) -> Steps[bool]:
        try:
            yield GET, (idempotency_key,)
        except IdempotencyItemNotFoundError:
            return True
        except IdempotencyPersistenceLayerError:
            return False
        return False

    def remove_record(self, idempotency_key: str) -> bool:
        """Delete the key's record whatever its state or lease; returns whether one was stored.

        For operators clearing a stuck key (``idem-middleware delete``), never for requests: it
        is not fenced, so a request still holding the key then fails to complete or release it
        (:class:`IdempotencyLeaseLostError`) instead of writing the record back.
        """
        self._evict_from_cache(idempotency_key)
        return self._remove_record(idempotency_key)

    def get_record(self, idempotency_key: str, payload_hash: str | None = None) -> DataRecord:
        """The live record for the key, validated against ``payload_hash`` when given.

        Raises :class:`IdempotencyItemNotFoundError` or :class:`IdempotencyPayloadMismatchError`.
        """
        return run(self, self.get_record_steps(idempotency_key, payload_hash))

    def get_record_steps(
        self, idempotency_key: str, payload_hash: str | None = None
    ) -> Steps[DataRecord]:
        """:meth:`get_record` as store steps."""
        record = self.get_cached_record(idempotency_key)
        if record is None:
            record = yield GET, (idempotency_key,)
            if record.is_expired(self.clock()):
                raise IdempotencyItemNotFoundError(idempotency_key)
            self._save_to_cache(record)
        if payload_hash is not None:
            self.validate_payload(record, payload_hash)
        return record

    def validate_payload(self, record: DataRecord, payload_hash: str) -> None:
        """Raise :class:`IdempotencyPayloadMismatchError` when the record was made by another
        payload.
        """
        if record.payload_hash is not None and record.payload_hash != payload_hash:
            raise IdempotencyPayloadMismatchError(record.idempotency_key)

    def _completed_under(self, record: DataRecord) -> Steps[bool]:
        """Whether the store already holds exactly this completion: a client library (botocore,
        redis-py) may resend an update whose reply was lost, and the resend then fails the
        lease condition although the first attempt succeeded.
        """
        try:
            current: DataRecord = yield GET, (record.idempotency_key,)
            return (
                current.status == STATUS_COMPLETED
                and current.lease_id == record.lease_id
                and current.in_progress_expiry_timestamp == record.in_progress_expiry_timestamp
                and current.response == record.response
            )
        except (IdempotencyItemNotFoundError, IdempotencyPersistenceLayerError, ValueError):
            # Not provably ours: report the lease as lost rather than claim a completion.
            return False

    # Local cache: COMPLETED records only, never served past their expiry --------------------

    def local_lookup_reads_store(self) -> bool:
        """Whether :meth:`get_cached_record` reads the store itself (SQLite's inline replays),
        so that what it costs is reported as store time.
        """
        return False

    def get_cached_record(self, idempotency_key: str) -> DataRecord | None:
        if self._cache is None:
            return None
        with self._cache_lock:
            record = self._cache.get(idempotency_key)
            if record is not None and record.is_expired(self.clock()):
                del self._cache[idempotency_key]
                return None
        return record

    def _save_to_cache(self, record: DataRecord) -> None:
        if self._cache is not None and record.status == STATUS_COMPLETED:
            with self._cache_lock:
                self._cache[record.idempotency_key] = record

    def _evict_from_cache(self, idempotency_key: str) -> None:
        if self._cache is not None:
            with self._cache_lock:
                self._cache.pop(idempotency_key, None)

    # Primitives ---------------------------------------------------------------------------

    @abstractmethod
    def _put_record(self, data_record: DataRecord) -> None:
        """Create the record (``lease_id`` included) unless a live one exists, atomically.

        "Live" means: not past ``expiry_timestamp``, and not an INPROGRESS record whose lease
        (``in_progress_expiry_timestamp``) has run out. Otherwise raise
        :class:`IdempotencyItemAlreadyExistsError` carrying the existing record, found in the same
        round trip. A record that cannot be read raises :class:`StoreRecordUnreadableError`.
        """

    @abstractmethod
    def _get_record(self, idempotency_key: str) -> DataRecord:
        """The stored record (consistent read), or :class:`IdempotencyItemNotFoundError`."""

    @abstractmethod
    def _update_record(self, data_record: DataRecord) -> None:
        """Replace the record, only while it is INPROGRESS under the same lease: the same
        ``lease_id`` (absent when the lease has none) and ``in_progress_expiry_timestamp``;
        otherwise raise :class:`IdempotencyLeaseLostError`.
        A store that can only keep the response without its body sets ``response_data`` to
        what it kept.
        """

    @abstractmethod
    def _renew_record(self, lease: DataRecord, renewed: DataRecord) -> None:
        """Set the record's ``in_progress_expiry_timestamp`` and ``expiry_timestamp`` to
        ``renewed``'s (and the store's own expiry, if it keeps one), only while it is INPROGRESS
        under ``lease`` (fenced as :meth:`_update_record`); otherwise raise
        :class:`IdempotencyLeaseLostError`. Nothing else changes: the status, ``lease_id``,
        validation hash and key stay as they are.
        """

    @abstractmethod
    def _delete_record(self, data_record: DataRecord) -> None:
        """Delete the record, only while it is INPROGRESS under the same lease (as
        :meth:`_update_record`); otherwise raise :class:`IdempotencyLeaseLostError`.
        """

    @abstractmethod
    def _remove_record(self, idempotency_key: str) -> bool:
        """Delete the record unconditionally (no lease check); return whether one was stored,
        expired or not. Store faults raise :class:`IdempotencyPersistenceLayerError`.
        """

    # Native async primitives: the same contracts, awaited on the event loop. Only a layer that
    # sets ``native_async`` implements them; the steps above run unchanged over either kind.

    def missing_async_primitives(self) -> list[str]:
        """The native async primitives a layer that sets ``native_async`` has not implemented
        (the engine refuses such a layer at construction rather than fail its requests).
        """
        if not self.native_async:
            return []
        return [
            name
            for name in _ASYNC_PRIMITIVES
            if getattr(type(self), name) is getattr(BasePersistenceLayer, name)
        ]

    async def _aput_record(self, data_record: DataRecord) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no native async path")

    async def _aget_record(self, idempotency_key: str) -> DataRecord:
        raise NotImplementedError(f"{type(self).__name__} has no native async path")

    async def _aupdate_record(self, data_record: DataRecord) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no native async path")

    async def _arenew_record(self, lease: DataRecord, renewed: DataRecord) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no native async path")

    async def _adelete_record(self, data_record: DataRecord) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no native async path")


_ASYNC_PRIMITIVES = (
    "_aput_record",
    "_aget_record",
    "_aupdate_record",
    "_arenew_record",
    "_adelete_record",
)
