"""The protocol-agnostic decision engine: every HTTP decision of the middleware lives here.

An adapter (ASGI or WSGI) asks :meth:`IdempotencyEngine.begin` what to do with a request and
gets one of three decisions:

* :class:`PassThrough` - run the app untouched (method not covered, no key, or a store outage
  under ``on_store_error="passthrough"``);
* :class:`Respond` - send this response and do not run the app (a replay or a problem);
* :class:`Proceed` - this request holds the key: run the app, then ``complete`` with its
  response *before* sending it, or ``release`` if it failed. While the app runs, ``renew`` keeps
  the lease (:mod:`idem_middleware.lease` calls it every third of a lease).

``begin`` is ``prepare`` (pure computation and the local cache) followed by ``claim`` (one store
call), so an async adapter can run only the store call in a worker thread.

The steps that touch the store (``claim``, ``poll``, ``renew``, ``complete``, ``release``) are
each written once, as store steps (:mod:`idem_middleware.persistence.steps`), and are
:class:`~idem_middleware.persistence.steps.StoreStep` objects: calling one runs it with the
layer's blocking calls; ``await engine.claim.native(...)`` runs it on the event loop through a
layer's native async path (``store_async``), with no worker thread.

With ``conflict_wait_seconds``, a duplicate of an in-flight request gets a :class:`Conflict`: a
:class:`Respond` carrying the 409 to send at once, which an adapter may instead turn into a wait,
sleeping ``conflict.delay`` between calls to ``poll`` until it returns the final decision.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from time import perf_counter
from typing import Literal

from idem_middleware.config import IdempotencyConfig
from idem_middleware.exceptions import (
    IdempotencyAlreadyInProgressError,
    IdempotencyHTTPError,
    IdempotencyItemAlreadyExistsError,
    IdempotencyItemNotFoundError,
    IdempotencyKeyMissingError,
    IdempotencyLeaseLostError,
    IdempotencyPayloadMismatchError,
    IdempotencyPersistenceLayerError,
    IdempotencyStoreUnavailableError,
    IdempotencyValidationError,
    RequestBodyIncompleteError,
    RequestBodyTooLargeError,
)
from idem_middleware.keys import KeyDeriver
from idem_middleware.persistence.base import BasePersistenceLayer
from idem_middleware.persistence.record import STATUS_COMPLETED, STATUS_INPROGRESS, DataRecord
from idem_middleware.persistence.steps import Steps, StoreStep, StoreTimer, store_timer, timing
from idem_middleware.request import IdempotencyRequest
from idem_middleware.responses import StoredResponse, problem_response
from idem_middleware.routes import compile_paths
from idem_middleware.sizes import SizeLimits

logger = logging.getLogger("idem_middleware")

EventName = Literal[
    "claimed",
    "completed",
    "replayed",
    "conflict",
    "mismatch",
    "released",
    "rejected",
    "store_error",
    "lease_lost",
]


@dataclass(frozen=True, slots=True)
class IdempotencyEvent:
    """One decision, for ``IdempotencyConfig.on_event`` (metrics) and the log.

    ``key`` is the stored (hashed) key, never the raw client key; ``status`` is the HTTP status
    sent or stored, when there is one; ``store_seconds`` is the time the store calls behind the
    decision took: ``None`` for a decision made without one (a local-cache replay, a refusal
    before the claim), and when neither ``on_event`` nor the DEBUG log reads the events.
    """

    name: EventName
    method: str
    path: str
    key: str | None = None
    status: int | None = None
    detail: str | None = None
    store_seconds: float | None = None


# The decisions are made for every request and read once: plain slotted dataclasses, since a
# frozen dataclass pays an object.__setattr__ call per field to be built.
@dataclass(frozen=True, slots=True)
class PassThrough:
    """Run the app as if the middleware were not there."""


@dataclass(slots=True)
class Respond:
    """Send ``response`` without running the app."""

    response: StoredResponse


@dataclass(slots=True)
class Proceed:
    """This request holds the key under ``lease``; run the app and complete or release."""

    request: IdempotencyRequest
    lease: DataRecord


@dataclass(slots=True)
class PendingClaim:
    """A request that passed every check that needs no store call; ``claim`` finishes it."""

    request: IdempotencyRequest
    idempotency_key: str
    payload_hash: str
    #: The in-progress record found holding the key, when there is one (for Retry-After).
    holder: DataRecord | None = None


@dataclass(slots=True)
class Conflict(Respond):
    """A duplicate of a request still in flight, with ``conflict_wait_seconds`` above 0.

    ``response`` is the 409 to send now; an adapter that waits instead sleeps ``delay`` seconds
    (without holding the event loop), then calls :meth:`IdempotencyEngine.poll`, until ``poll``
    returns the decision to act on. The wait holds no lease, so abandoning it (the client went
    away) needs no clean-up.
    """

    pending: PendingClaim
    #: When the wait ends, on the engine's ``monotonic`` clock.
    deadline: float
    #: How long to sleep before the next ``poll``; ``poll`` lengthens it (backoff).
    delay: float


Decision = PassThrough | Respond | Proceed

#: The first pause of a waiting duplicate; each poll doubles it, up to the longest pause.
FIRST_POLL_DELAY_SECONDS = 0.05
LONGEST_POLL_DELAY_SECONDS = 0.5

PASS_THROUGH = PassThrough()


class IdempotencyEngine:
    """Decides, for one config and one persistence layer, what happens to each request."""

    def __init__(
        self,
        persistence_layer: BasePersistenceLayer,
        config: IdempotencyConfig | None = None,
        *,
        configure_layer: bool = True,
    ) -> None:
        if not isinstance(persistence_layer, BasePersistenceLayer):
            hint = " (a class: pass an instance)" if isinstance(persistence_layer, type) else ""
            raise TypeError(
                "persistence_layer: expected a BasePersistenceLayer instance such as "
                f"InMemoryPersistenceLayer(), got {persistence_layer!r}{hint}"
            )
        if config is not None and not isinstance(config, IdempotencyConfig):
            raise TypeError(
                "config: expected an IdempotencyConfig instance such as "
                f"IdempotencyConfig(require_key=True), got {config!r}"
            )
        self.config = config or IdempotencyConfig()
        self.persistence_layer = persistence_layer
        if configure_layer:
            persistence_layer.configure(self.config)
        #: A route's own record lifetime, when it is not the layer's (``for_route``).
        self._expires_after_seconds: int | None = None
        self.keys = KeyDeriver(self.config)
        #: Whether store calls block; an async adapter runs ``claim``, ``complete`` and
        #: ``release`` in a worker thread when they do.
        self.store_blocks = persistence_layer.blocking_io
        #: Whether the layer has a native async path: an async adapter then awaits the store
        #: steps on its event loop (``await engine.claim.native(pending)``), no thread involved.
        self.store_async = persistence_layer.native_async
        missing = persistence_layer.missing_async_primitives()
        if missing:
            raise TypeError(
                f"persistence_layer: {type(persistence_layer).__name__} sets native_async but "
                f"does not implement {', '.join(missing)}"
            )
        # Store calls are timed (IdempotencyEvent.store_seconds) only when something reads it.
        timed = self._observed
        self.claim = StoreStep(persistence_layer, self._claim_steps, timed=timed)
        self.poll = StoreStep(persistence_layer, self._poll_steps, timed=timed)
        self.renew = StoreStep(persistence_layer, self._renew_steps, timed=timed)
        self.complete = StoreStep(persistence_layer, self._complete_steps, timed=timed)
        self.release = StoreStep(persistence_layer, self._release_steps, timed=timed)
        #: Response bodies up to this size are stored and replayed; larger ones stream through.
        self.sizes = SizeLimits.resolve(self.config, persistence_layer.max_response_bytes)
        self._methods = _all_cases(self.config.methods)
        self._include = _compile_globs(self.config.include_paths)
        self._exclude = _compile_globs(self.config.exclude_paths or None)
        self._excluded_headers = self.config.replay_excluded_headers
        self._transient_statuses = self.config.transient_statuses
        #: Source of monotonic time for conflict waits; tests replace it to move time.
        self.monotonic: Callable[[], float] = time.monotonic
        if self.config.scope is None and configure_layer:
            _warn_unscoped(self.config)

    def for_route(self, config: IdempotencyConfig) -> IdempotencyEngine:
        """An engine for one route's config (``@idempotent``), on this engine's persistence
        layer. The layer stays configured with this engine's config: a route may change what
        the engine decides (keys, fingerprints, coverage, replays) and its records' lifetime,
        which is passed with each completion, but not what the layer owns (key prefix, hash,
        lease, local cache).
        """
        engine = IdempotencyEngine(self.persistence_layer, config, configure_layer=False)
        if config.expires_after_seconds != self.persistence_layer.config.expires_after_seconds:
            engine._expires_after_seconds = config.expires_after_seconds
        return engine

    # Selection ----------------------------------------------------------------------------

    def covers(self, method: str, path: str) -> bool:
        """Whether the middleware handles this request at all; checked before reading the body.

        Methods match case-insensitively: werkzeug routes ``post`` to a POST view, and ASGI
        servers pass the method as the client sent it.
        """
        if method not in self._methods:
            return False
        if self._include is not None and not self._include.fullmatch(path):
            return False
        return not (self._exclude is not None and self._exclude.fullmatch(path))

    def decide_before_body(
        self, method: str, path: str, headers: Mapping[str, str]
    ) -> PassThrough | Respond | None:
        """The decision on a covered request that its headers alone settle, or ``None`` when
        its body must be read. With header keys, a request without the header passes through
        unbuffered (or is refused under ``require_key``): an upload without a key is none of
        the middleware's business, whatever its size.
        """
        if self.config.key_source != "header" or self.config.header_name in headers:
            return None
        if self.config.require_key:
            return self._refuse(
                method,
                path,
                IdempotencyKeyMissingError(
                    f"this endpoint requires an {self.config.header_name} header"
                ),
            )
        return PASS_THROUGH

    def body_too_large(self, method: str, path: str) -> Respond:
        """The 413 answer to a body over ``max_request_body_bytes``; the app does not run."""
        return self._refuse(
            method,
            path,
            RequestBodyTooLargeError(
                f"covered requests may carry at most {self.config.max_request_body_bytes} bytes"
            ),
        )

    def body_incomplete(self, method: str, path: str) -> Respond:
        """The answer to a body cut short of its Content-Length; nothing is claimed."""
        return self._refuse(
            method, path, RequestBodyIncompleteError("the request body ended before Content-Length")
        )

    # Begin --------------------------------------------------------------------------------

    def begin(self, request: IdempotencyRequest) -> Decision:
        """Decide what to do with a covered request whose body has been read."""
        step = self.prepare(request)
        return self.claim(step) if isinstance(step, PendingClaim) else step

    def prepare(self, request: IdempotencyRequest) -> Decision | PendingClaim:
        """Everything ``begin`` does that needs no store call (parsing, hashing, local cache)."""
        try:
            material = self.keys.key_material(request)
            if material is None:
                if self.config.require_key:
                    raise IdempotencyKeyMissingError(self.keys.missing_key_detail)
                return PASS_THROUGH
            payload_hash = self.keys.fingerprint(request)
        except IdempotencyHTTPError as error:
            return self._reject(request, error)
        scope = self._scope_of(request) if self.config.scope is not None else None
        key = self.persistence_layer.build_idempotency_key(material, scope)
        layer = self.persistence_layer
        if layer.local_lookup_reads_store() and self._observed():
            # SQLite's inline replays read the file: what they cost is store time too.
            timer = StoreTimer()
            started = perf_counter()
            cached = layer.get_cached_record(key)
            timer.seconds = perf_counter() - started
            if cached is not None:
                with timing(timer):
                    return self._answer_existing(request, cached, payload_hash)
        else:
            cached = layer.get_cached_record(key)
            if cached is not None:
                return self._answer_existing(request, cached, payload_hash)
        return PendingClaim(request, key, payload_hash)

    def _scope_of(self, request: IdempotencyRequest) -> str:
        assert self.config.scope is not None
        scope = self.config.scope(request)
        if not isinstance(scope, str):
            # None would silently share records between principals; say which callable is wrong.
            raise TypeError(
                f"IdempotencyConfig.scope must return a str, got {type(scope).__name__} {scope!r}"
            )
        return scope

    def _claim_steps(self, pending: PendingClaim) -> Steps[Decision]:
        """Claim the key with one atomic store call; a collision is answered from the record
        that call returned. A duplicate of an in-flight request is a 409 or, with
        ``conflict_wait_seconds``, a :class:`Conflict` the adapter may wait on.
        """
        try:
            outcome = yield from self._claim_or_raise(pending, waiting=False)
        except IdempotencyPersistenceLayerError as error:
            return self._store_unavailable(pending.request, error, pending.idempotency_key)
        if outcome is not None:
            return outcome
        wait = self.config.conflict_wait_seconds
        return Conflict(
            problem_response(self._in_use(pending.holder)),
            pending,
            deadline=self.monotonic() + wait,
            delay=min(FIRST_POLL_DELAY_SECONDS, wait),
        )

    def _claim_or_raise(self, pending: PendingClaim, *, waiting: bool) -> Steps[Decision | None]:
        """The claim; ``None`` when the key is held by a live request and the duplicate may
        wait (a waiting duplicate, or ``conflict_wait_seconds`` above 0).
        """
        request = pending.request
        layer = self.persistence_layer
        # Two attempts: the record that beat us may expire between its write and our read.
        for _ in range(2):
            claimed = yield from layer.claim_steps(pending.idempotency_key, pending.payload_hash)
            if not isinstance(claimed, IdempotencyItemAlreadyExistsError):
                self._emit("claimed", request.method, request.path, claimed.idempotency_key)
                return Proceed(request, claimed)
            existing = claimed.old_data_record
            if existing is None:
                try:
                    existing = yield from layer.get_record_steps(pending.idempotency_key)
                except IdempotencyItemNotFoundError:
                    continue
            status = existing.current_status(layer.clock())
            if status == STATUS_INPROGRESS and (waiting or self.config.conflict_wait_seconds > 0):
                pending.holder = existing
                return self._unless_mismatch(request, existing, pending.payload_hash)
            if status in (STATUS_COMPLETED, STATUS_INPROGRESS):
                return self._answer_existing(request, existing, pending.payload_hash)
        if waiting:
            return None
        return self._reject(request, self._in_use(None), pending.idempotency_key)

    def _unless_mismatch(
        self, request: IdempotencyRequest, record: DataRecord, payload_hash: str
    ) -> Respond | None:
        """The 422 when ``record`` was made by another payload; ``None`` (keep waiting) else."""
        try:
            self.persistence_layer.validate_payload(record, payload_hash)
        except IdempotencyPayloadMismatchError:
            return self._key_reused(request, record.idempotency_key)
        return None

    def _poll_steps(self, conflict: Conflict) -> Steps[Decision | None]:
        """One look at the record a waiting duplicate waits for (one store read, plus a claim
        when the key has come free); ``None`` while it is still in flight and the wait has not
        run out: sleep ``conflict.delay``, then poll again.

        The decision is a replay once the first request completed; a :class:`Proceed` when it
        released the key (it failed) or its lease ran out (it crashed), through the same atomic
        claim as any request, so at most one waiter runs the handler; a 422 when the key was
        meanwhile used with another payload; the 409 once the wait is over, or when the store
        fails meanwhile (the request is known to be a duplicate: never run it un-deduplicated).
        """
        pending = conflict.pending
        request = pending.request
        layer = self.persistence_layer
        outcome: Decision | None
        try:
            try:
                record: DataRecord | None = yield from layer.get_record_steps(
                    pending.idempotency_key
                )
            except IdempotencyItemNotFoundError:
                record = None
            if record is None or not record.blocks_claim(layer.clock()):
                outcome = yield from self._claim_or_raise(pending, waiting=True)
            elif record.status == STATUS_INPROGRESS:
                pending.holder = record
                outcome = self._unless_mismatch(request, record, pending.payload_hash)
            else:
                outcome = self._answer_existing(request, record, pending.payload_hash)
        except IdempotencyPersistenceLayerError as error:
            self._emit(
                "store_error",
                request.method,
                request.path,
                pending.idempotency_key,
                status=IdempotencyAlreadyInProgressError.status,
                detail=f"stopped waiting for the request in flight: {error}",
                level=logging.WARNING,
            )
            return self._conflict(conflict)
        if outcome is not None:
            return outcome
        remaining = conflict.deadline - self.monotonic()
        if remaining <= 0:
            return self._conflict(conflict)
        conflict.delay = min(conflict.delay * 2, LONGEST_POLL_DELAY_SECONDS, remaining)
        return None

    def _conflict(self, conflict: Conflict) -> Respond:
        """The 409 a duplicate gets once it stops waiting."""
        request = conflict.pending.request
        self._emit(
            "conflict",
            request.method,
            request.path,
            conflict.pending.idempotency_key,
            status=IdempotencyAlreadyInProgressError.status,
            detail=IdempotencyAlreadyInProgressError.code,
        )
        return Respond(problem_response(self._in_use(conflict.pending.holder)))

    def _in_use(self, holder: DataRecord | None) -> IdempotencyAlreadyInProgressError:
        """The 409; its Retry-After is what is left of ``holder``'s lease (at least a second):
        by then the request has completed, or renewed its lease, or crashed and freed the key.
        """
        error = IdempotencyAlreadyInProgressError(
            "a request with this idempotency key is still being processed; retry after it completes"
        )
        lease_ms = holder.in_progress_expiry_timestamp if holder is not None else None
        if lease_ms is not None:
            left = math.ceil(lease_ms / 1000 - self.persistence_layer.clock())
            error.retry_after = max(1, left)
        return error

    def _answer_existing(
        self, request: IdempotencyRequest, record: DataRecord, payload_hash: str
    ) -> Decision:
        key = record.idempotency_key
        try:
            self.persistence_layer.validate_payload(record, payload_hash)
        except IdempotencyPayloadMismatchError:
            return self._key_reused(request, key)
        if record.status == STATUS_INPROGRESS:
            return self._reject(request, self._in_use(record), key, event="conflict")
        try:
            stored = record.response
        except ValueError as exc:
            unreadable = IdempotencyPersistenceLayerError(
                f"the stored response could not be read: {exc}"
            )
            return self._store_unavailable(request, unreadable, key)
        if stored is None:
            return self._store_unavailable(
                request, IdempotencyPersistenceLayerError("the stored record has no response"), key
            )
        self._emit("replayed", request.method, request.path, key, status=stored.status)
        replay = stored.for_replay(self.config.replay_header)
        if self.config.response_hook is not None:
            replay = self._hooked(replay, request)
        return Respond(replay)

    def _hooked(self, replay: StoredResponse, request: IdempotencyRequest) -> StoredResponse:
        """The replay as ``response_hook`` adjusts it; the replay as stored when the hook fails:
        a broken hook must not turn a replay into a 500 (or a second execution).
        """
        assert self.config.response_hook is not None
        try:
            hooked = self.config.response_hook(replay, request)
            if not isinstance(hooked, StoredResponse):
                raise TypeError(f"returned {type(hooked).__name__}, not a StoredResponse")
            return hooked.with_content_length()
        except Exception:
            logger.exception(
                "idempotency response_hook failed on %s %s; the stored replay is sent unchanged",
                request.method,
                request.path,
            )
            return replay

    # While the app runs -------------------------------------------------------------------

    def _renew_steps(self, attempt: Proceed) -> Steps[bool]:
        """Renew the attempt's lease (one fenced store call) and keep the renewed lease in
        ``attempt.lease``, which ``complete`` and ``release`` then write under. Never raises.

        ``False`` once the lease is lost (another request took the key over): renewing again
        cannot help. A store error keeps the lease as it was and returns ``True``: the next
        renewal may succeed before the lease runs out.
        """
        request = attempt.request
        try:
            attempt.lease = yield from self.persistence_layer.renew_lease_steps(attempt.lease)
        except IdempotencyLeaseLostError:
            self._lease_lost(attempt)
            return False
        except IdempotencyPersistenceLayerError as error:
            self._emit(
                "store_error",
                request.method,
                request.path,
                attempt.lease.idempotency_key,
                detail=f"lease not renewed: {error}; " + self._lease_left(attempt.lease),
                level=logging.WARNING,
            )
        return True

    def _lease_left(self, lease: DataRecord) -> str:
        expiry_ms = lease.in_progress_expiry_timestamp or 0
        remaining = max(0.0, expiry_ms / 1000 - self.persistence_layer.clock())
        return f"it runs out in {remaining:.1f} s unless a later renewal succeeds"

    # Finish -------------------------------------------------------------------------------

    def stores(self, status: int) -> bool:
        """Whether a response with this status is stored (else the key is released): a
        transient status never is, a 5xx only with ``store_server_errors``.
        """
        if status in self._transient_statuses:
            return False
        return status < 500 or self.config.store_server_errors

    def _complete_steps(self, attempt: Proceed, response: StoredResponse) -> Steps[None]:
        """Persist the app's response before the adapter sends it; a 5xx (by default) releases
        the key instead. Never raises: the response goes out whatever the store says.
        """
        if not self.stores(response.status):
            yield from self._release_steps(attempt, response.status)
            return
        request = attempt.request
        kept = self._kept(response)
        try:
            yield from self.persistence_layer.save_success_steps(
                attempt.lease, kept, expires_after_seconds=self._expires_after_seconds
            )
        except IdempotencyLeaseLostError:
            self._lease_lost(attempt)
        except IdempotencyPersistenceLayerError as error:
            self._emit(
                "store_error",
                request.method,
                request.path,
                attempt.lease.idempotency_key,
                status=response.status,
                detail=f"response not stored: {error}; " + self._after_lease(attempt.lease),
                level=logging.ERROR,
            )
        else:
            self._emit(
                "completed",
                request.method,
                request.path,
                attempt.lease.idempotency_key,
                status=response.status,
            )

    def _kept(self, response: StoredResponse) -> StoredResponse:
        """The response as stored: no excluded header, no body over the stored-size limit."""
        excluded = self._excluded_headers
        headers = [header for header in response.headers if header[0].lower() not in excluded]
        if not self.sizes.stores_body(len(response.body)):
            return StoredResponse(
                response.status, tuple(headers), b"", body_omitted=True, reason=response.reason
            )
        if len(headers) == len(response.headers):
            return response  # immutable, and already what is to be stored
        return StoredResponse(
            response.status,
            tuple(headers),
            response.body,
            body_omitted=response.body_omitted,
            reason=response.reason,
        )

    def _release_steps(self, attempt: Proceed, status: int | None = None) -> Steps[None]:
        """Delete the record so a retry runs the app again (the app raised or returned 5xx).
        Never raises.
        """
        request = attempt.request
        try:
            yield from self.persistence_layer.delete_record_steps(attempt.lease)
        except IdempotencyLeaseLostError:
            self._lease_lost(attempt)
        except IdempotencyPersistenceLayerError as error:
            self._emit(
                "store_error",
                request.method,
                request.path,
                attempt.lease.idempotency_key,
                status=status,
                detail=f"key not released: {error}; " + self._after_lease(attempt.lease),
                level=logging.ERROR,
            )
        else:
            self._emit(
                "released", request.method, request.path, attempt.lease.idempotency_key, status
            )

    def _after_lease(self, lease: DataRecord) -> str:
        """What a write that finally failed means for the client's retry."""
        expiry_ms = lease.in_progress_expiry_timestamp
        remaining = (
            max(0, round(expiry_ms / 1000 - self.persistence_layer.clock()))
            if expiry_ms is not None
            else self.config.in_progress_expires_after_seconds
        )
        return (
            f"the key stays in progress until its lease runs out (in about {remaining} s): "
            "retries get 409 until then, and a retry after the lease will run the handler again"
        )

    # Outcomes -----------------------------------------------------------------------------

    def _reject(
        self,
        request: IdempotencyRequest,
        error: IdempotencyHTTPError,
        key: str | None = None,
        *,
        event: EventName = "rejected",
    ) -> Respond:
        return self._refuse(request.method, request.path, error, key, event=event)

    def _refuse(
        self,
        method: str,
        path: str,
        error: IdempotencyHTTPError,
        key: str | None = None,
        *,
        event: EventName = "rejected",
    ) -> Respond:
        self._emit(event, method, path, key, status=error.status, detail=error.code)
        return Respond(problem_response(error))

    def _key_reused(self, request: IdempotencyRequest, key: str) -> Respond:
        reused = IdempotencyValidationError(
            "this idempotency key was already used with a different request "
            "(method, path, query or body)"
        )
        return self._reject(request, reused, key, event="mismatch")

    def _store_unavailable(
        self, request: IdempotencyRequest, error: IdempotencyPersistenceLayerError, key: str | None
    ) -> Decision:
        passthrough = self.config.on_store_error == "passthrough"
        self._emit(
            "store_error",
            request.method,
            request.path,
            key,
            status=None if passthrough else IdempotencyStoreUnavailableError.status,
            detail=f"{'running un-deduplicated' if passthrough else 'rejected'}: {error}",
            level=logging.WARNING,
        )
        if passthrough:
            return PASS_THROUGH
        # The log has the cause; the client learns only that it should retry later.
        return Respond(
            problem_response(
                IdempotencyStoreUnavailableError(
                    "the idempotency store is unavailable; retry after the delay given"
                )
            )
        )

    def _lease_lost(self, attempt: Proceed) -> None:
        self._emit(
            "lease_lost",
            attempt.request.method,
            attempt.request.path,
            attempt.lease.idempotency_key,
            detail="the lease ran out and another request took the key over; its record was kept",
            level=logging.WARNING,
        )

    def _observed(self) -> bool:
        """Whether the events of a store step are read: by ``on_event``, or by the log with the
        per-request decisions on (DEBUG). Store trouble logged at WARNING or ERROR alone does
        not pay for timing every request's store calls.
        """
        return self.config.on_event is not None or logger.isEnabledFor(logging.DEBUG)

    def _emit(
        self,
        name: EventName,
        method: str,
        path: str,
        key: str | None = None,
        status: int | None = None,
        *,
        detail: str | None = None,
        level: int = logging.DEBUG,
    ) -> None:
        """Tell ``on_event`` and the log of a decision. Per-request decisions log at DEBUG (a
        busy service makes thousands a second); store trouble at WARNING or ERROR.
        """
        on_event = self.config.on_event
        log = logger.isEnabledFor(level)
        if on_event is None and not log:
            return
        # Set while a store step runs (claim, poll, renew, complete, release): its store time.
        timer = store_timer()
        seconds = None if timer is None else timer.seconds
        event = IdempotencyEvent(name, method, path, key, status, detail, seconds)
        if log:
            logger.log(
                level,
                "idempotency %s method=%s path=%s key=%s status=%s%s%s",
                name,
                method,
                path,
                key,
                status,
                "" if seconds is None else f" store_seconds={seconds:.6f}",
                f" detail={detail!r}" if detail else "",
                extra={"idempotency": event},
            )
        if on_event is not None:
            try:
                on_event(event)
            except Exception:
                # A broken metrics hook must not turn a served request into a 500.
                logger.exception("idempotency on_event hook raised")


def _compile_globs(patterns: tuple[str, ...] | None) -> re.Pattern[str] | None:
    """One regex (for ``fullmatch``) for a tuple of globs and route templates, so each request
    pays one match; see :mod:`idem_middleware.routes`. An empty tuple matches nothing.
    """
    return None if patterns is None else compile_paths(patterns)


def _all_cases(methods: frozenset[str]) -> frozenset[str]:
    """Every spelling of each method (``post``, ``Post``, ...): covering a method in any case
    then costs one set lookup. At most 2**7 spellings per method (``OPTIONS``, ``CONNECT``).
    """
    return frozenset(
        "".join(letters)
        for method in methods
        for letters in itertools.product(*((c.upper(), c.lower()) for c in method))
    )


def _warn_unscoped(config: IdempotencyConfig) -> None:
    # Once per middleware, at startup: a per-request warning would flood the log.
    header = f"another client's {config.header_name}"
    body = "the same body to the same route as another client"
    sends = {"header": header, "body": body}.get(config.key_source, f"{header}, or {body},")
    logger.warning(
        "IdempotencyConfig.scope is not set: a client that sends %s gets that client's stored "
        "response, headers included. Set scope to a callable returning the authenticated "
        "principal (user or tenant id) so that each principal's keys name its own records.",
        sends,
    )
