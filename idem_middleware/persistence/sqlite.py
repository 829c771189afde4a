"""SQLitePersistenceLayer: one file on one host, shared by every worker process.

The standard library's ``sqlite3`` in WAL mode: readers never block the writer, and the claim
is a single ``INSERT ... ON CONFLICT DO UPDATE ... WHERE <the existing record is dead>`` inside a
``BEGIN IMMEDIATE`` transaction, so across threads and processes exactly one request wins a key
and a loser reads the record that beat it under the same write lock. Completion, lease renewal
and release are fenced on the lease (``lease_id`` and ``in_progress_expiration``), as in the
DynamoDB layer, whose attribute names the columns mirror. A table made before lease ids existed
gains the ``lease_id`` column on first connection; its rows keep working, fenced on
``in_progress_expiration`` alone.
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

from idem_middleware.exceptions import (
    IdempotencyInvalidStatusError,
    IdempotencyItemAlreadyExistsError,
    IdempotencyItemNotFoundError,
    IdempotencyLeaseLostError,
    IdempotencyPersistenceLayerError,
    StoreNotAuthorisedError,
    StoreNotFoundError,
    StoreRecordUnreadableError,
)
from idem_middleware.persistence.base import BasePersistenceLayer
from idem_middleware.persistence.record import STATUS_INPROGRESS, DataRecord

logger = logging.getLogger(__name__)

Synchronous = Literal["OFF", "NORMAL", "FULL", "EXTRA"]

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SQLITE_BUSY, _SQLITE_LOCKED = 5, 6  # primary result codes
#: ``INSERT ... ON CONFLICT DO UPDATE`` (upsert) arrived in SQLite 3.24.0.
_MIN_SQLITE = (3, 24, 0)
#: How long a purge on the request path waits for the write lock before leaving it for later.
_PURGE_BUSY_TIMEOUT_MS = 50


class _Connection(sqlite3.Connection):
    """A connection that remembers its process and can be referenced weakly."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.owner_pid = os.getpid()


class _ThreadConnection(threading.local):
    """This thread's connection and the process that opened it."""

    pid: int = -1
    connection: sqlite3.Connection | None = None


class SQLitePersistenceLayer(BasePersistenceLayer):
    """Records in one table of an SQLite file: for apps served by several worker processes on
    one host (gunicorn, uvicorn ``--workers``) without a network store.

    Each thread of each process opens its own connection on first use, so a layer built before
    the server forks its workers is safe to use in every worker. A connection that waits more
    than ``busy_timeout_seconds`` for the write lock fails with
    :class:`IdempotencyPersistenceLayerError`. Expired records are deleted every
    ``purge_interval_seconds``, at most ``purge_batch_size`` of them by one claim (claims keep
    purging a batch each until the backlog is gone), so the file stays bounded by the records
    that are still live and no request pays for a large purge.

    The layer never creates the file's directory: a path in a missing directory is a
    :class:`StoreNotFoundError`, from :meth:`check` at startup and from every call.

    ``synchronous`` is SQLite's durability setting: ``"FULL"`` (default) keeps every completed
    record through a power cut; ``"NORMAL"`` is faster and may lose the last few on power loss
    (never on an application crash), which would let a retry run its handler again.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        table_name: str = "idempotency_records",
        busy_timeout_seconds: float = 5.0,
        purge_interval_seconds: float = 300.0,
        purge_batch_size: int = 1000,
        synchronous: Synchronous = "FULL",
    ) -> None:
        super().__init__()
        if sqlite3.sqlite_version_info < _MIN_SQLITE:
            raise RuntimeError(
                f"SQLitePersistenceLayer needs SQLite >= 3.24.0 (upsert); "
                f"this Python links SQLite {sqlite3.sqlite_version}"
            )
        self.path = os.fspath(path)
        if self.path in ("", ":memory:"):
            raise ValueError(
                "SQLitePersistenceLayer needs a file: an in-memory SQLite database is private to "
                "one connection (use InMemoryPersistenceLayer for a single process)"
            )
        if not _IDENTIFIER.match(table_name):
            raise ValueError(f"table_name must be a plain SQL identifier, got {table_name!r}")
        if busy_timeout_seconds < 0:
            raise ValueError("busy_timeout_seconds must be >= 0")
        if purge_batch_size < 1:
            raise ValueError("purge_batch_size must be >= 1")
        if synchronous not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"unknown synchronous setting {synchronous!r}")
        self.table_name = table_name
        self.busy_timeout_seconds = busy_timeout_seconds
        self.purge_interval_seconds = purge_interval_seconds
        self.purge_batch_size = purge_batch_size
        self.synchronous = synchronous
        self._local = _ThreadConnection()
        # Every open connection of this process, for close(); weak, so the connection of a
        # thread that has ended is closed with the thread's local storage (servers that start
        # a thread per request would otherwise pile up open files).
        self._connections: weakref.WeakSet[_Connection] = weakref.WeakSet()
        self._connections_lock = threading.Lock()
        # Connections inherited through a fork() that bypassed the at-fork hook: kept
        # referenced and never used nor closed in the child (SQLite's rule for fork()).
        self._inherited: list[sqlite3.Connection] = []
        _close_connections_at_fork(self)
        self._next_purge = 0.0

        self._sql_claim = self._sql(
            "INSERT INTO {t} "
            "(id, status, expiration, in_progress_expiration, data, validation, lease_id) "
            "VALUES (:id, :status, :expiration, :in_progress_expiration, NULL, :validation, "
            ":lease_id) "
            "ON CONFLICT(id) DO UPDATE SET "
            "status = excluded.status, expiration = excluded.expiration, "
            "in_progress_expiration = excluded.in_progress_expiration, "
            "data = NULL, validation = excluded.validation, lease_id = excluded.lease_id "
            "WHERE {t}.expiration < :now OR ({t}.status = :inprogress "
            "AND {t}.in_progress_expiration IS NOT NULL AND {t}.in_progress_expiration < :now_ms)"
        )
        self._sql_select = self._sql(
            "SELECT id, status, expiration, in_progress_expiration, data, validation, lease_id "
            "FROM {t} WHERE id = ?"
        )
        self._sql_complete = self._sql(
            "UPDATE {t} SET status = :status, expiration = :expiration, data = :data, "
            "validation = COALESCE(:validation, validation) "
            "WHERE id = :id AND status = :inprogress AND in_progress_expiration = :lease "
            "AND lease_id IS :lease_id"
        )
        self._sql_renew = self._sql(
            "UPDATE {t} SET in_progress_expiration = :renewed, expiration = :expiration "
            "WHERE id = :id AND status = :inprogress AND in_progress_expiration = :lease "
            "AND lease_id IS :lease_id"
        )
        self._sql_release = self._sql(
            "DELETE FROM {t} WHERE id = :id AND status = :inprogress "
            "AND in_progress_expiration = :lease AND lease_id IS :lease_id"
        )
        self._sql_remove = self._sql("DELETE FROM {t} WHERE id = ?")
        # By rowid, through the expiration index: each batch is one short write transaction.
        self._sql_purge = self._sql(
            "DELETE FROM {t} WHERE rowid IN (SELECT rowid FROM {t} WHERE expiration < ? LIMIT ?)"
        )

    def _sql(self, template: str) -> str:
        # The table name is the only text put into SQL, and __init__ has checked that it is a
        # plain identifier; every value is a bound parameter.
        return template.replace("{t}", self.table_name)

    # Primitives ---------------------------------------------------------------------------

    def _put_record(self, data_record: DataRecord) -> None:
        now = self.clock()
        params = {
            "id": data_record.idempotency_key,
            "status": data_record.status,
            "expiration": data_record.expiry_timestamp,
            "in_progress_expiration": data_record.in_progress_expiry_timestamp,
            "validation": data_record.payload_hash,
            "lease_id": data_record.lease_id,
            "now": int(now),
            "now_ms": int(now * 1000),
            "inprogress": STATUS_INPROGRESS,
        }
        with self._store_errors("claim"):
            connection = self._connection()
            # IMMEDIATE takes the write lock up front: the upsert and, on a collision, the read
            # of the record that won see the same state, and no other writer runs in between.
            connection.execute("BEGIN IMMEDIATE")
            try:
                claimed = connection.execute(self._sql_claim, params).rowcount == 1
                existing = (
                    None
                    if claimed
                    else connection.execute(
                        self._sql_select, (data_record.idempotency_key,)
                    ).fetchone()
                )
                connection.execute("COMMIT")
            except BaseException:
                _rollback(connection)
                raise
        self._purge_if_due(now)
        if not claimed:
            raise IdempotencyItemAlreadyExistsError(
                None if existing is None else self._row_to_record(existing)
            )

    def _get_record(self, idempotency_key: str) -> DataRecord:
        with self._store_errors("read"):
            row = self._connection().execute(self._sql_select, (idempotency_key,)).fetchone()
        if row is None:
            raise IdempotencyItemNotFoundError(idempotency_key)
        return self._row_to_record(row)

    def _update_record(self, data_record: DataRecord) -> None:
        with self._store_errors("completion"):
            cursor = self._connection().execute(
                self._sql_complete,
                {
                    "id": data_record.idempotency_key,
                    "status": data_record.status,
                    "expiration": data_record.expiry_timestamp,
                    "data": data_record.response_data,
                    "validation": data_record.payload_hash,
                    "inprogress": STATUS_INPROGRESS,
                    "lease": data_record.in_progress_expiry_timestamp,
                    "lease_id": data_record.lease_id,
                },
            )
        if cursor.rowcount != 1:
            raise IdempotencyLeaseLostError(data_record.idempotency_key)

    def _renew_record(self, lease: DataRecord, renewed: DataRecord) -> None:
        with self._store_errors("lease renewal"):
            cursor = self._connection().execute(
                self._sql_renew,
                {
                    "id": lease.idempotency_key,
                    "renewed": renewed.in_progress_expiry_timestamp,
                    "expiration": renewed.expiry_timestamp,
                    "inprogress": STATUS_INPROGRESS,
                    "lease": lease.in_progress_expiry_timestamp,
                    "lease_id": lease.lease_id,
                },
            )
        if cursor.rowcount != 1:
            raise IdempotencyLeaseLostError(lease.idempotency_key)

    def _delete_record(self, data_record: DataRecord) -> None:
        with self._store_errors("release"):
            cursor = self._connection().execute(
                self._sql_release,
                {
                    "id": data_record.idempotency_key,
                    "inprogress": STATUS_INPROGRESS,
                    "lease": data_record.in_progress_expiry_timestamp,
                    "lease_id": data_record.lease_id,
                },
            )
        if cursor.rowcount != 1:
            raise IdempotencyLeaseLostError(data_record.idempotency_key)

    def _remove_record(self, idempotency_key: str) -> bool:
        with self._store_errors("delete"):
            cursor = self._connection().execute(self._sql_remove, (idempotency_key,))
        return cursor.rowcount == 1

    def check(self) -> None:
        """Open the file (in a directory that must exist) and read the table, creating it in an
        existing file's first use as every call does; raise a typed store error naming the path
        otherwise.
        """
        with self._store_errors("check"):
            self._missing_directory()
            self._connection().execute(self._sql("SELECT 1 FROM {t} LIMIT 1")).fetchall()

    # Housekeeping -------------------------------------------------------------------------

    def purge_expired(self, now: float | None = None, *, max_batches: int | None = None) -> int:
        """Delete records past their expiry, in batches of ``purge_batch_size`` (every batch
        when ``max_batches`` is ``None``); returns how many were deleted.

        Each batch is its own short write transaction, so claims from other workers interleave
        with a large purge instead of waiting for it.
        """
        cutoff = int(self.clock() if now is None else now)
        deleted = 0
        batches = 0
        with self._store_errors("purge"):
            connection = self._connection()
            while max_batches is None or batches < max_batches:
                count = connection.execute(
                    self._sql_purge, (cutoff, self.purge_batch_size)
                ).rowcount
                deleted += count
                batches += 1
                if count < self.purge_batch_size:
                    break
        return deleted

    def _purge_if_due(self, now: float) -> None:
        """One batch on the request path, waiting only briefly for the write lock; while a
        backlog remains, the next claim purges the next batch.
        """
        if now < self._next_purge:
            return
        self._next_purge = now + self.purge_interval_seconds
        connection = self._connection()
        try:
            connection.execute(f"PRAGMA busy_timeout = {_PURGE_BUSY_TIMEOUT_MS}")
            try:
                deleted = self.purge_expired(now, max_batches=1)
            finally:
                connection.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_seconds * 1000)}")
        except (IdempotencyPersistenceLayerError, sqlite3.Error):
            # The claim itself succeeded; a purge that failed (the lock was busy) is retried at
            # the next interval.
            logger.warning("purging expired idempotency records failed", exc_info=True)
            return
        if deleted >= self.purge_batch_size:
            self._next_purge = now  # a backlog: the next claim takes the next batch
        if deleted:
            logger.debug("purged %d expired idempotency records", deleted)

    def close(self) -> None:
        """Close the connections this process opened, from any thread. Later calls reopen.

        Also runs in the parent just before ``os.fork()``, so that a child (a server worker)
        never inherits an open SQLite connection: SQLite's per-process lock bookkeeping would
        be copied into the child, which its documentation warns can corrupt the database.
        """
        pid = os.getpid()
        with self._connections_lock:
            connections = [c for c in self._connections if c.owner_pid == pid]
            self._local = _ThreadConnection()
        for connection in connections:
            connection.close()

    # Connections --------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        local = self._local
        pid = os.getpid()
        if local.connection is None or local.pid != pid:
            if local.connection is not None:
                self._inherited.append(local.connection)
            connection = self._connect()
            with self._connections_lock:
                self._connections.add(connection)
            local.connection = connection
            local.pid = pid
        return local.connection

    def _connect(self) -> _Connection:
        connection = sqlite3.connect(
            self.path,
            factory=_Connection,
            timeout=self.busy_timeout_seconds,
            isolation_level=None,  # autocommit; _put_record opens its own transaction
            check_same_thread=False,  # used by one thread only, but close() may run elsewhere
        )
        try:
            mode = self._enable_wal(connection)
            if mode is None or str(mode[0]).lower() != "wal":
                logger.warning(
                    "SQLite file %s could not switch to WAL mode (journal_mode=%s); "
                    "concurrent workers will serialise on it",
                    self.path,
                    None if mode is None else mode[0],
                )
            connection.execute(f"PRAGMA synchronous = {self.synchronous}")
            connection.execute(
                self._sql(
                    "CREATE TABLE IF NOT EXISTS {t} ("
                    "id TEXT PRIMARY KEY NOT NULL, "
                    "status TEXT NOT NULL, "
                    "expiration INTEGER, "
                    "in_progress_expiration INTEGER, "
                    "data TEXT, "
                    "validation TEXT, "
                    "lease_id TEXT)"
                )
            )
            connection.execute(
                self._sql("CREATE INDEX IF NOT EXISTS {t}_expiration ON {t} (expiration)")
            )
            self._add_lease_id_column(connection)
        except BaseException:
            connection.close()
            raise
        assert isinstance(connection, _Connection)
        return connection

    def _add_lease_id_column(self, connection: sqlite3.Connection) -> None:
        """Give a table made before lease ids existed its ``lease_id`` column (rows keep NULL)."""
        columns = connection.execute(self._sql("PRAGMA table_info({t})")).fetchall()
        if any(column[1] == "lease_id" for column in columns):
            return
        try:
            connection.execute(self._sql("ALTER TABLE {t} ADD COLUMN lease_id TEXT"))
        except sqlite3.OperationalError as exc:
            if "duplicate column" not in str(exc).lower():  # another worker added it first
                raise

    def _enable_wal(self, connection: sqlite3.Connection) -> Any:
        """Switch the file to WAL (a no-op once it is), waiting up to the busy timeout.

        The switch needs the file to itself and SQLite does not apply the busy handler to it,
        so workers that open a new file at the same moment would otherwise fail at once.
        """
        deadline = time.monotonic() + self.busy_timeout_seconds
        delay = 0.002
        while True:
            try:
                return connection.execute("PRAGMA journal_mode = WAL").fetchone()
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or time.monotonic() >= deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    @contextmanager
    def _store_errors(self, operation: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            self._missing_directory(exc)
            message = f"SQLite {operation} on {self.path!r} (table {self.table_name!r}) failed"
            text = str(exc).lower()
            if "readonly" in text or "permission" in text or "access permission" in text:
                raise StoreNotAuthorisedError(
                    f"{message}: {exc}; this process needs write access to the file and its "
                    "directory (SQLite writes a -wal and a -shm file beside it)"
                ) from exc
            if "no such table" in text:
                raise StoreNotFoundError(
                    f"{message}: {exc}; the table was dropped while in use, restart to recreate it"
                ) from exc
            raise IdempotencyPersistenceLayerError(f"{message}: {exc}") from exc

    def _missing_directory(self, cause: sqlite3.Error | None = None) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(directory):
            raise StoreNotFoundError(
                f"SQLite idempotency store {self.path!r}: directory {directory!r} does not exist; "
                "create it (the layer never creates directories) or fix the path"
            ) from cause

    def _row_to_record(self, row: tuple[Any, ...]) -> DataRecord:
        try:
            return _row_to_record(row)
        except (TypeError, ValueError, IdempotencyInvalidStatusError) as exc:
            # A record this version cannot read is a store fault (503), never a 500.
            raise StoreRecordUnreadableError(
                f"unreadable idempotency record in SQLite {self.path!r} "
                f"(table {self.table_name!r}): {exc}"
            ) from exc


def _close_connections_at_fork(layer: SQLitePersistenceLayer) -> None:
    """Close the layer's connections in the parent before ``os.fork()``; give the child a fresh
    lock. Only a weak reference is registered, so the layer can still be garbage collected.
    """
    if not hasattr(os, "register_at_fork"):
        return
    ref = weakref.ref(layer)

    def before() -> None:
        target = ref()
        if target is not None:
            try:
                target.close()
            except Exception:  # a failing hook must not break the fork
                logger.warning("closing SQLite connections before fork failed", exc_info=True)

    def after_in_child() -> None:
        target = ref()
        if target is not None:
            target._connections_lock = threading.Lock()

    os.register_at_fork(before=before, after_in_child=after_in_child)


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:
        return (code & 0xFF) in (_SQLITE_BUSY, _SQLITE_LOCKED)
    message = str(exc).lower()
    return "locked" in message or "busy" in message


def _rollback(connection: sqlite3.Connection) -> None:
    if connection.in_transaction:
        try:
            connection.execute("ROLLBACK")
        except sqlite3.Error:
            logger.debug("SQLite rollback failed", exc_info=True)


def _row_to_record(row: tuple[Any, ...]) -> DataRecord:
    key, status, expiration, in_progress, data, validation, lease_id = row
    if isinstance(data, bytes):
        data = data.decode("utf-8")
    return DataRecord(
        idempotency_key=key,
        status=status,
        expiry_timestamp=None if expiration is None else int(expiration),
        in_progress_expiry_timestamp=None if in_progress is None else int(in_progress),
        response_data=data,
        payload_hash=validation,
        lease_id=lease_id,
    )
