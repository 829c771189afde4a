"""What the example apps share: the idempotency store, the per-user scope and the payments ledger.

The idempotency store is named by one URL (:func:`idem_middleware.persistence.from_url`), so one
app runs unchanged on a laptop (``memory://``), on one host with several worker processes
(``sqlite:///idempotency.sqlite3``) or in a fleet (``dynamodb://…``, ``redis://…``):

================================ ===========================================================
``IDEM_STORE_URL``               ``memory://`` (default), ``sqlite:///idempotency.sqlite3``,
                                 ``dynamodb://idempotency?region=eu-west-1`` (DynamoDB Local:
                                 ``&endpoint_url=http://localhost:8000``),
                                 ``redis://localhost:6379/0``
``IDEM_ON_STORE_ERROR``          ``reject`` (default: 503) or ``passthrough`` (run, warn)
``IDEM_CONFLICT_WAIT_SECONDS``   how long a duplicate of a request in flight waits for its
                                 answer (default ``0``: 409 at once)
``EXAMPLE_LEDGER_PATH``          SQLite file of payments (unset: in memory, one process)
``EXAMPLE_CHARGE_DELAY_SECONDS`` simulated card-processor latency (default ``0``)
``EXAMPLE_EXPORT_LINE_DELAY_SECONDS`` pause between two lines of a streamed export (default
                                 ``0``)
``LOG_LEVEL``                    ``DEBUG`` logs every decision of the middleware
================================ ===========================================================

``memory://`` deduplicates within one process only: with several workers, pick another store.
A payment request should not wait a minute on an unreachable store: give DynamoDB short client
timeouts in the URL (``&connect_timeout=1&read_timeout=3&max_attempts=2``).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, cast

from idem_middleware import IdempotencyRequest
from idem_middleware.config import StoreErrorPolicy
from idem_middleware.persistence import BasePersistenceLayer, from_url

# Idempotency store --------------------------------------------------------------------------


def persistence_layer_from_env(env: Mapping[str, str] = os.environ) -> BasePersistenceLayer:
    """The idempotency store ``IDEM_STORE_URL`` names. Optional backends are imported only when
    named, so ``memory://`` needs neither boto3 nor redis.
    """
    url = env.get("IDEM_STORE_URL", "memory://")
    try:
        return from_url(url)
    except ValueError as exc:
        raise ValueError(f"IDEM_STORE_URL: {exc}") from None


def on_store_error_from_env(env: Mapping[str, str] = os.environ) -> StoreErrorPolicy:
    """``IDEM_ON_STORE_ERROR``: what to do when the store is unreachable."""
    policy = env.get("IDEM_ON_STORE_ERROR", "reject")
    if policy not in ("reject", "passthrough"):
        raise ValueError(f"IDEM_ON_STORE_ERROR={policy!r}: expected reject or passthrough")
    return cast(StoreErrorPolicy, policy)


def conflict_wait_seconds_from_env(env: Mapping[str, str] = os.environ) -> float:
    """``IDEM_CONFLICT_WAIT_SECONDS``: how long a duplicate of a request still in flight waits
    for its answer (``IdempotencyConfig.conflict_wait_seconds``); 0, the default, answers 409.
    """
    value = env.get("IDEM_CONFLICT_WAIT_SECONDS", "0")
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < 3600:  # also refuses nan and inf
        raise ValueError(f"IDEM_CONFLICT_WAIT_SECONDS={value!r}: expected seconds, from 0")
    return seconds


# Authentication (demo) ----------------------------------------------------------------------


def authenticated_user(authorization: str | None) -> str | None:
    """The user named by ``Authorization: Bearer <user>``.

    Demo simplification: the token *is* the user id. A real app verifies the token (a JWT, a
    session) and takes the user from it.
    """
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def user_scope(request: IdempotencyRequest) -> str:
    """Idempotency scope: one user's key never replays another user's payment."""
    user = authenticated_user(request.headers.get("authorization"))
    return f"user:{user}" if user is not None else "anonymous"


def configure_logging() -> None:
    """Print the middleware's warnings (store errors) to stderr and, with ``LOG_LEVEL=DEBUG``,
    every decision it takes. Leaves logging alone when the root logger is already configured.
    """
    logger = logging.getLogger("idem_middleware")
    if logging.getLogger().handlers or logger.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(
        logging.Formatter("%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s")
    )
    logger.addHandler(handler)
    logger.setLevel(os.environ.get("LOG_LEVEL", "WARNING").upper())


# Payments ledger ----------------------------------------------------------------------------

CURRENCIES = frozenset({"AUD", "CAD", "CHF", "EUR", "GBP", "JPY", "USD"})
MAX_AMOUNT = 1_000_000_00  # in minor units (cents)


class InvalidRequest(ValueError):
    """The request body does not describe a valid payment or refund."""


class PaymentNotFound(LookupError):
    """No payment with this id belongs to this user."""


class RefundExceedsPayment(ValueError):
    """The refund is larger than what is left of the payment."""


@dataclass(frozen=True)
class NewPayment:
    amount: int
    currency: str
    description: str | None = None


def parse_payment(data: object) -> NewPayment:
    """Validate a ``POST /payments`` body: ``{"amount": 1250, "currency": "EUR"}``."""
    if not isinstance(data, dict):
        raise InvalidRequest("the body must be a JSON object")
    amount = data.get("amount")
    currency = data.get("currency")
    description = data.get("description")
    if not isinstance(amount, int) or isinstance(amount, bool) or not 0 < amount <= MAX_AMOUNT:
        raise InvalidRequest(f"amount must be an integer from 1 to {MAX_AMOUNT} (minor units)")
    if currency not in CURRENCIES:
        raise InvalidRequest(f"currency must be one of {', '.join(sorted(CURRENCIES))}")
    if description is not None and (not isinstance(description, str) or len(description) > 200):
        raise InvalidRequest("description must be a string of at most 200 characters")
    return NewPayment(amount=amount, currency=currency, description=description)


def parse_refund(data: object) -> int | None:
    """Validate a ``POST /payments/{id}/refunds`` body; ``None`` refunds what is left."""
    if data is None:
        return None
    if not isinstance(data, dict):
        raise InvalidRequest("the body must be a JSON object")
    amount = data.get("amount")
    if amount is None:
        return None
    if not isinstance(amount, int) or isinstance(amount, bool) or amount <= 0:
        raise InvalidRequest("amount must be a positive integer (minor units)")
    return amount


def charge_card(payment: NewPayment) -> None:
    """Stand-in for the card processor: the slow, non-idempotent side effect worth protecting."""
    delay = float(os.environ.get("EXAMPLE_CHARGE_DELAY_SECONDS", "0"))
    if delay > 0:
        time.sleep(delay)


def stream_lines(lines: list[str]) -> Iterator[bytes]:
    """A streamed export: each line as soon as it is ready, the next after
    ``EXAMPLE_EXPORT_LINE_DELAY_SECONDS`` (a slow query, a large report).
    """
    delay = float(os.environ.get("EXAMPLE_EXPORT_LINE_DELAY_SECONDS", "0"))
    for index, line in enumerate(lines):
        if index and delay > 0:
            time.sleep(delay)
        yield line.encode()


_SCHEMA = """
CREATE TABLE IF NOT EXISTS payments (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, amount INTEGER NOT NULL, currency TEXT NOT NULL,
    description TEXT, created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS refunds (
    id TEXT PRIMARY KEY, payment_id TEXT NOT NULL REFERENCES payments(id),
    amount INTEGER NOT NULL, created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS exports (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, created TEXT NOT NULL
);
"""


class Ledger:
    """Payments and refunds in SQLite.

    With a file path, every worker process sees the same ledger (so tests can count how many
    times a handler really ran, whichever process ran it); ``":memory:"`` lives in one process.
    Thread-safe: one connection per process, used under a lock.
    """

    def __init__(self, path: str = ":memory:") -> None:
        self.path = path
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None
        self._pid = 0

    @classmethod
    def from_env(cls) -> Ledger:
        return cls(os.environ.get("EXAMPLE_LEDGER_PATH") or ":memory:")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._connection is None or self._pid != os.getpid():  # first use, or forked
                self._connection = sqlite3.connect(
                    self.path, timeout=30, isolation_level=None, check_same_thread=False
                )
                self._connection.row_factory = sqlite3.Row
                self._connection.executescript(_SCHEMA)
                self._pid = os.getpid()
            connection = self._connection
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")

    def create_payment(self, owner: str, payment: NewPayment) -> dict[str, Any]:
        record = {
            "id": f"pay_{uuid.uuid4().hex[:24]}",
            "owner": owner,
            "amount": payment.amount,
            "currency": payment.currency,
            "description": payment.description,
            "created": _now(),
        }
        with self._transaction() as db:
            db.execute(
                "INSERT INTO payments VALUES (:id, :owner, :amount, :currency, :description, "
                ":created)",
                record,
            )
        return _payment_view(record, refunded=0)

    def get_payment(self, owner: str, payment_id: str) -> dict[str, Any]:
        with self._transaction() as db:
            row = self._payment_row(db, owner, payment_id)
            refunded = self._refunded(db, payment_id)
        return _payment_view(dict(row), refunded)

    def create_refund(self, owner: str, payment_id: str, amount: int | None) -> dict[str, Any]:
        with self._transaction() as db:
            payment = self._payment_row(db, owner, payment_id)
            remaining = payment["amount"] - self._refunded(db, payment_id)
            amount = remaining if amount is None else amount
            if amount <= 0 or amount > remaining:
                raise RefundExceedsPayment(
                    f"{remaining} (minor units) of this payment can still be refunded"
                )
            refund = {
                "id": f"re_{uuid.uuid4().hex[:24]}",
                "payment_id": payment_id,
                "amount": amount,
                "created": _now(),
            }
            db.execute("INSERT INTO refunds VALUES (:id, :payment_id, :amount, :created)", refund)
        return {"object": "refund", "currency": payment["currency"], **refund}

    def create_export(self, owner: str) -> tuple[str, list[str]]:
        """A new export of the owner's payments: its id, and its CSV lines (newline-ended)."""
        export_id = f"exp_{uuid.uuid4().hex[:24]}"
        created = _now()
        with self._transaction() as db:
            db.execute("INSERT INTO exports VALUES (?, ?, ?)", (export_id, owner, created))
            rows = db.execute(
                "SELECT id, amount, currency, created FROM payments WHERE owner = ? "
                "ORDER BY created, id",
                (owner,),
            ).fetchall()
        lines = [
            f"# export {export_id}, created {created}\n",
            "payment_id,amount,currency,created\n",
            *(f"{r['id']},{r['amount']},{r['currency']},{r['created']}\n" for r in rows),
            f"# end of export {export_id}: {len(rows)} payments\n",
        ]
        return export_id, lines

    def stats(self) -> dict[str, int]:
        """How many payments, refunds and exports were ever created: how often the handlers
        ran.
        """
        with self._transaction() as db:
            payments = db.execute("SELECT COUNT(*) FROM payments").fetchone()[0]
            refunds = db.execute("SELECT COUNT(*) FROM refunds").fetchone()[0]
            exports = db.execute("SELECT COUNT(*) FROM exports").fetchone()[0]
        return {
            "payments_created": payments,
            "refunds_created": refunds,
            "exports_created": exports,
        }

    @staticmethod
    def _payment_row(db: sqlite3.Connection, owner: str, payment_id: str) -> sqlite3.Row:
        row: sqlite3.Row | None = db.execute(
            "SELECT * FROM payments WHERE id = ? AND owner = ?", (payment_id, owner)
        ).fetchone()
        if row is None:
            raise PaymentNotFound(payment_id)
        return row

    @staticmethod
    def _refunded(db: sqlite3.Connection, payment_id: str) -> int:
        total: int = db.execute(
            "SELECT COALESCE(SUM(amount), 0) FROM refunds WHERE payment_id = ?", (payment_id,)
        ).fetchone()[0]
        return total


def _payment_view(record: dict[str, Any], refunded: int) -> dict[str, Any]:
    return {
        "id": record["id"],
        "object": "payment",
        "amount": record["amount"],
        "currency": record["currency"],
        "description": record["description"],
        "status": "refunded" if refunded >= record["amount"] else "succeeded",
        "amount_refunded": refunded,
        "created": record["created"],
    }


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")
