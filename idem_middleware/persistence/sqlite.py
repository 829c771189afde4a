"""SQLitePersistenceLayer: one file on one host, shared by every worker process.

The standard library's ``sqlite3`` in WAL mode: readers never block the writer, and the claim
is a single ``INSERT ... ON CONFLICT DO UPDATE ... WHERE <the existing record is dead>`` inside a
``BEGIN IMMEDIATE`` transaction, so across threads and processes exactly one request wins a key
and a loser reads the record that beat it under the same write lock. Completion, lease renewal
and release are fenced on the lease (``lease_id`` and ``in_progress_expiration``), as in the
DynamoDB layer, whose attribute names the columns mirror. A table made before lease ids existed
gains the ``lease_id`` column on first connection; its rows keep working, fenced on
``in_progress_expiration`` alone.

Speed without giving up ``synchronous=FULL``: each process writes through one connection
(:class:`_Writer`), and every write waiting for it is committed in one transaction (group
commit: one fsync for many claims and completions) instead of threads queueing for the file's
write lock in SQLite's sleeping busy handler. A claim first reads the key on a connection of the
calling thread, which takes no lock in WAL mode: a live record (the replay, the conflict) is
answered from there, and only a key that is free goes to the writer, which decides again inside
its ``BEGIN IMMEDIATE`` transaction, so the claim stays atomic across processes. Replays are
even served before any store call, from the engine's local-cache lookup (``inline_replays``).
Expired records are purged by a thread of their own, in batches queued like writes.

Under ASGI the writes one turn of the event loop makes (the claims and completions of every
request it advances) are committed together on the loop, on a connection that never waits for
the lock (when the writer is busy or another process holds the lock they queue as above). With
``synchronous="FULL"`` that commit skips SQLite's own fsync; a completion then waits until a
worker thread has fsynced the WAL past it, one fsync for every write committed meanwhile and
outside the write lock, so the next turns commit during it.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
import os
import re
import sqlite3
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any, Literal, TypeVar

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
from idem_middleware.persistence.record import STATUS_COMPLETED, STATUS_INPROGRESS, DataRecord
from idem_middleware.persistence.sql_params import (
    completion_params,
    release_params,
    renewal_params,
)

logger = logging.getLogger(__name__)

Synchronous = Literal["OFF", "NORMAL", "FULL", "EXTRA"]

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SQLITE_BUSY, _SQLITE_LOCKED = 5, 6  # primary result codes
#: ``INSERT ... ON CONFLICT DO UPDATE`` (upsert) arrived in SQLite 3.24.0.
_MIN_SQLITE = (3, 24, 0)
#: How long the writer's idle purge waits for the write lock before leaving it for later: the
#: writes that arrive meanwhile wait behind it.
_PURGE_BUSY_TIMEOUT_MS = 50
#: Most writes committed in one transaction: bounds how long the first of them waits for the
#: last, and the work redone when one write of a batch fails.
_MAX_BATCH = 256
#: Commits between two WAL checkpoints run by the purge thread (SQLite's own default is one
#: every 1000 WAL pages, about as many as this many small commits write).
_CHECKPOINT_EVERY_COMMITS = 300
#: How often the purge thread wakes up to see whether a purge is due (or its layer is gone).
_WRITER_WAKE_SECONDS = 30.0

T = TypeVar("T")
Write = Callable[[sqlite3.Connection], Any]


class _Connection(sqlite3.Connection):
    """A connection that remembers its process and can be referenced weakly."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.owner_pid = os.getpid()


class _Peeked(threading.local):
    """The last record this thread read for a key that ``get_cached_record`` did not serve."""

    key: str | None = None
    record: DataRecord | None = None


class _ThreadConnection(threading.local):
    """This thread's connection and the process that opened it."""

    pid: int = -1
    connection: sqlite3.Connection | None = None


class SQLitePersistenceLayer(BasePersistenceLayer):
    """Records in one table of an SQLite file: for apps served by several worker processes on
    one host (gunicorn, uvicorn ``--workers``) without a network store.

    Each thread of each process opens its own connections for reads on first use; each
    process opens one connection for its writes and starts its purge thread on its first
    write, so a layer built before the server forks its workers is safe to use in every
    worker. A write that waits more than ``busy_timeout_seconds`` for the file's write lock
    (held by another process) fails with :class:`IdempotencyPersistenceLayerError`. Expired
    records are deleted every ``purge_interval_seconds`` by the purge thread, at most
    ``purge_batch_size`` of them per transaction (batch after batch until the backlog is gone,
    each queued behind the writes waiting at that moment), so the file stays bounded by the
    records that are still live and no request runs a purge.

    The layer never creates the file's directory: a path in a missing directory is a
    :class:`StoreNotFoundError`, from :meth:`check` at startup and from every call.

    ``inline_replays`` (default) answers a replay from a read on the calling thread (the event
    loop under ASGI) that never waits for a lock: one row by primary key from a local file, in
    the OS page cache once the file is warm, costs less than the hop to a worker thread it
    saves. ``False`` makes every store call go through the adapter's worker threads.

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
        inline_replays: bool = True,
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
        self.inline_replays = inline_replays
        # Under ASGI, reads on the event loop and writes queued from it: no worker thread.
        self.native_async = inline_replays
        self._local = _ThreadConnection()
        self._quick = _ThreadConnection()
        self._peeked = _Peeked()
        # Every open connection of this process, for close(); weak, so the connection of a
        # thread that has ended is closed with the thread's local storage (servers that start
        # a thread per request would otherwise pile up open files).
        self._connections: weakref.WeakSet[_Connection] = weakref.WeakSet()
        self._connections_lock = threading.Lock()
        # Connections inherited through a fork() that bypassed the at-fork hook: kept
        # referenced and never used nor closed in the child (SQLite's rule for fork()).
        self._inherited: list[sqlite3.Connection] = []
        self._writer = _Writer(weakref.ref(self))
        # A layer dropped without close() stops its purge thread (which holds it only weakly).
        weakref.finalize(self, _Writer.shutdown, self._writer)
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
        write = self._claim_write(data_record)
        with self._store_errors("claim"):
            existing_row = self._write(write)
        self._claim_answer(existing_row)

    async def _aput_record(self, data_record: DataRecord) -> None:
        write = self._claim_write(data_record)
        with self._store_errors("claim"):
            # Not made durable before the handler runs: a claim lost to a power cut is what a
            # crash leaves behind once its lease runs out (the retry runs the handler again),
            # and the completion's fsync covers it (the WAL is written in order).
            existing_row = await self._awrite(write, durable=False)
        self._claim_answer(existing_row)

    def _claim_write(
        self, data_record: DataRecord
    ) -> Callable[[sqlite3.Connection], tuple[Any, ...] | None]:
        """Look at the key first; return the writer's claim when the look cannot answer."""
        now = self.clock()
        key = data_record.idempotency_key
        # A replay or a conflict needs no write: a live record is the answer. Anything else (no
        # record, a dead or unreadable one, a read that would wait) goes to the writer, which
        # decides under the write lock, as a claim always did.
        peeked = self._peeked
        if peeked.key == key:
            # save_inprogress asked get_cached_record a moment ago, on this thread: that read
            # is this one.
            existing, peeked.key = peeked.record, None
        else:
            existing = self._peek(key)
        if existing is not None and existing.blocks_claim(now):
            raise IdempotencyItemAlreadyExistsError(existing)
        params = {
            "id": key,
            "status": data_record.status,
            "expiration": data_record.expiry_timestamp,
            "in_progress_expiration": data_record.in_progress_expiry_timestamp,
            "validation": data_record.payload_hash,
            "lease_id": data_record.lease_id,
            "now": int(now),
            "now_ms": int(now * 1000),
            "inprogress": STATUS_INPROGRESS,
        }
        claim, select = self._sql_claim, self._sql_select

        def write(connection: sqlite3.Connection) -> tuple[Any, ...] | None:
            # Inside the writer's IMMEDIATE transaction: the record that wins the key is read
            # under the same write lock as the failed upsert, never one written in between.
            if connection.execute(claim, params).rowcount == 1:
                return None
            found: tuple[Any, ...] | None = connection.execute(select, (key,)).fetchone()
            return found or ()

        return write

    def _claim_answer(self, existing_row: tuple[Any, ...] | None) -> None:
        if existing_row is not None:
            raise IdempotencyItemAlreadyExistsError(
                self._row_to_record(existing_row) if existing_row else None
            )

    def local_lookup_reads_store(self) -> bool:
        """Whether :meth:`get_cached_record` reads the file (inline replays without an LRU)."""
        return self._cache is None and self.inline_replays

    def get_cached_record(self, idempotency_key: str) -> DataRecord | None:
        """Without an in-process LRU (``use_local_cache``) and with ``inline_replays``, the
        file is the local cache: the key's COMPLETED record, read by the calling thread without
        waiting for any lock. The engine calls this before any store call (on the event loop
        under ASGI), so a replay needs no worker thread. ``None`` sends the request on to the
        claim.
        """
        if self._cache is not None or not self.inline_replays:
            # An in-process LRU is configured: it alone is the local cache, bounded as asked.
            return super().get_cached_record(idempotency_key)
        record = self._peek(idempotency_key)
        if record is None or record.status != STATUS_COMPLETED or record.is_expired(self.clock()):
            peeked = self._peeked
            peeked.key, peeked.record = idempotency_key, record
            return None
        return record

    def _peek(self, idempotency_key: str) -> DataRecord | None:
        """The key's record, or ``None`` when there is none, it cannot be read, or reading it
        would wait for a lock (the connection's busy timeout is 0): the caller then takes the
        path that decides under the write lock.
        """
        try:
            row = self._connection(quick=True).execute(self._sql_select, (idempotency_key,))
            found = row.fetchone()
        except sqlite3.Error:
            return None
        if found is None:
            return None
        try:
            return _row_to_record(found)
        except (TypeError, ValueError, IdempotencyInvalidStatusError):
            return None

    async def _aget_record(self, idempotency_key: str) -> DataRecord:
        try:
            row = self._connection(quick=True).execute(self._sql_select, (idempotency_key,))
            found = row.fetchone()
        except sqlite3.Error:
            # The read would wait (or the file is in trouble): wait, and report, off the loop.
            import anyio.to_thread

            return await anyio.to_thread.run_sync(self._get_record, idempotency_key)
        if found is None:
            raise IdempotencyItemNotFoundError(idempotency_key)
        return self._row_to_record(found)

    def _get_record(self, idempotency_key: str) -> DataRecord:
        with self._store_errors("read"):
            row = self._connection().execute(self._sql_select, (idempotency_key,)).fetchone()
        if row is None:
            raise IdempotencyItemNotFoundError(idempotency_key)
        return self._row_to_record(row)

    def _update_record(self, data_record: DataRecord) -> None:
        self._fenced_write("completion", self._sql_complete, completion_params(data_record))

    async def _aupdate_record(self, data_record: DataRecord) -> None:
        await self._afenced_write("completion", self._sql_complete, completion_params(data_record))

    def _renew_record(self, lease: DataRecord, renewed: DataRecord) -> None:
        self._fenced_write("lease renewal", self._sql_renew, renewal_params(lease, renewed))

    async def _arenew_record(self, lease: DataRecord, renewed: DataRecord) -> None:
        await self._afenced_write("lease renewal", self._sql_renew, renewal_params(lease, renewed))

    def _delete_record(self, data_record: DataRecord) -> None:
        self._fenced_write("release", self._sql_release, release_params(data_record))

    async def _adelete_record(self, data_record: DataRecord) -> None:
        await self._afenced_write("release", self._sql_release, release_params(data_record))

    def _remove_record(self, idempotency_key: str) -> bool:
        sql = self._sql_remove
        with self._store_errors("delete"):
            count: int = self._write(lambda c: c.execute(sql, (idempotency_key,)).rowcount)
        return count == 1

    def _fenced_write(self, operation: str, sql: str, params: dict[str, Any]) -> None:
        with self._store_errors(operation):
            count: int = self._write(lambda c: c.execute(sql, params).rowcount)
        if count != 1:
            raise IdempotencyLeaseLostError(params["id"])

    async def _afenced_write(self, operation: str, sql: str, params: dict[str, Any]) -> None:
        with self._store_errors(operation):
            count: int = await self._awrite(lambda c: c.execute(sql, params).rowcount)
        if count != 1:
            raise IdempotencyLeaseLostError(params["id"])

    def _write(self, write: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``write`` in a transaction of this process's writer and return its result; its
        ``sqlite3.Error`` is raised here. Gives up (``database is locked``) when the write has
        not started within the busy timeout and another one: the file's lock is held elsewhere
        for longer than this layer may wait.
        """
        result: T = self._process_writer().run(write, 2 * self.busy_timeout_seconds + 1)
        return result

    async def _awrite(self, write: Callable[[sqlite3.Connection], T], *, durable: bool = True) -> T:
        """:meth:`_write` awaited on the event loop: the write joins the writer's queue, and
        the loop waits on a future instead of a worker thread waiting on a lock.
        """
        writer = self._process_writer()
        result: T = await writer.arun(write, 2 * self.busy_timeout_seconds + 1, durable=durable)
        return result

    def _process_writer(self) -> _Writer:
        writer = self._writer
        if writer.pid != os.getpid():
            # Forked without the at-fork hook: the parent's purge thread does not exist here,
            # and its connection must be neither used nor closed in this process.
            self._inherited += [
                c for c in (writer.connection, writer.inline_connection) if c is not None
            ]
            writer = self._writer = _Writer(weakref.ref(self))
        return writer

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

        Each batch is its own short transaction of this process's writer, so claims from other
        workers interleave with a large purge instead of waiting for it.
        """
        cutoff = int(self.clock() if now is None else now)
        deleted = 0
        batches = 0
        with self._store_errors("purge"):
            while max_batches is None or batches < max_batches:
                count = self._write(lambda c: self._purge_batch(c, cutoff))
                deleted += count
                batches += 1
                if count < self.purge_batch_size:
                    break
        return deleted

    def _purge_batch(self, connection: sqlite3.Connection, cutoff: int) -> int:
        count: int = connection.execute(self._sql_purge, (cutoff, self.purge_batch_size)).rowcount
        return count

    def _purge_is_due(self) -> bool:
        return self.clock() >= self._next_purge

    def _purge_once(self, writer: _Writer) -> None:
        """One batch, run by the purge thread in a transaction of its own, queued behind the
        writes waiting at that moment; while a backlog remains, the next batch follows.
        """
        now = self.clock()
        self._next_purge = now + self.purge_interval_seconds
        cutoff = int(now)
        try:
            with self._store_errors("purge"):
                deleted: int = writer.run(
                    lambda c: self._purge_batch(c, cutoff),
                    2 * self.busy_timeout_seconds + 1,
                    alone=True,
                )
        except (IdempotencyPersistenceLayerError, sqlite3.Error):
            # Another process holds the lock (or the file is unwritable, which the next write
            # reports to its request): retried at the next interval.
            logger.warning("purging expired idempotency records failed", exc_info=True)
            return
        if deleted >= self.purge_batch_size:
            self._next_purge = now  # a backlog: the next batch follows
        if deleted:
            logger.debug("purged %d expired idempotency records", deleted)

    def close(self) -> None:
        """Stop this process's purge thread and close the connections this process opened (the
        writer's once its current batch is committed), from any thread. Later calls reopen.

        Also runs in the parent just before ``os.fork()``, so that a child (a server worker)
        never inherits an open SQLite connection: SQLite's per-process lock bookkeeping would
        be copied into the child, which its documentation warns can corrupt the database.
        """
        pid = os.getpid()
        if self._writer.pid == pid:
            self._writer.stop()
        with self._connections_lock:
            connections = [c for c in self._connections if c.owner_pid == pid]
            self._local = _ThreadConnection()
            self._quick = _ThreadConnection()
        for connection in connections:
            connection.close()

    # Connections --------------------------------------------------------------------------

    def _connection(self, *, quick: bool = False) -> sqlite3.Connection:
        """This thread's connection; ``quick``: its connection for reads that never wait."""
        local = self._quick if quick else self._local
        pid = os.getpid()
        if local.connection is None or local.pid != pid:
            if local.connection is not None:
                self._inherited.append(local.connection)
            # The quick connection never waits, even to open: a file still being set up by
            # another process is a miss, and the caller takes the path that waits.
            connection = self._connect(0.0 if quick else self.busy_timeout_seconds)
            with self._connections_lock:
                self._connections.add(connection)
            local.connection = connection
            local.pid = pid
        return local.connection

    def _connect(self, busy_timeout_seconds: float | None = None) -> _Connection:
        timeout = (
            self.busy_timeout_seconds if busy_timeout_seconds is None else busy_timeout_seconds
        )
        connection = sqlite3.connect(
            self.path,
            factory=_Connection,
            timeout=timeout,
            isolation_level=None,  # autocommit; _put_record opens its own transaction
            check_same_thread=False,  # used by one thread only, but close() may run elsewhere
        )
        try:
            mode = self._enable_wal(connection, timeout)
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

    def _enable_wal(self, connection: sqlite3.Connection, timeout: float) -> Any:
        """Switch the file to WAL (a no-op once it is), waiting up to the busy timeout.

        The switch needs the file to itself and SQLite does not apply the busy handler to it,
        so workers that open a new file at the same moment would otherwise fail at once.
        """
        deadline = time.monotonic() + timeout
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
            # The parent's purge thread does not exist here, and its locks may have been held
            # at the fork: this process's first write starts a writer of its own.
            target._writer = _Writer(ref)

    os.register_at_fork(before=before, after_in_child=after_in_child)


_QUEUED, _RUNNING, _DONE, _LEAD, _CANCELLED = range(5)


class _Job:
    """One queued write and, once run, its outcome. A thread's write holds ``wake`` until the
    write is done or its caller is made the leader (a bare lock is the cheapest way to park a
    thread); an event loop's write (``settle``) is never made the leader: it is told when done.
    """

    __slots__ = ("alone", "error", "result", "settle", "state", "wake", "write")

    def __init__(
        self, write: Write, alone: bool = False, settle: Callable[[], None] | None = None
    ) -> None:
        self.write = write
        self.alone = alone
        self.settle = settle
        self.state = _QUEUED
        self.result: Any = None
        self.error: BaseException | None = None
        self.wake = threading.Lock()
        if settle is None:
            self.wake.acquire()

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        self.result, self.error, self.state = result, error, _DONE
        if self.settle is None:
            self.wake.release()
        else:
            self.settle()

    def outcome(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.result


class _Writer:
    """One process's writer for a layer: one connection, on which every write of the process
    runs, committed in batches (group commit).

    A thread that writes while nobody else does runs its write itself, at once: no hop to
    another thread. A thread that writes while another is committing queues its write and
    parks; when the commit ends, the leader hands the connection to the first parked thread,
    which commits everything queued meanwhile in one ``BEGIN IMMEDIATE`` transaction (one
    fsync for all of them) and wakes their threads. So writes of one process never wait for
    each other in SQLite's busy handler, which sleeps instead of waking when the lock is free;
    only writers of other processes do. A write that fails inside a batch is rolled back with
    the whole batch, then every write of that batch runs again alone, so the failure stays its
    own.

    The purge has a thread of its own, started on the first write of each process (so a layer
    built before ``fork()`` purges in every child): it queues its batch like a write and runs
    it alone, in its own short transaction, when its turn comes. It holds the layer only
    weakly, so a layer dropped without :meth:`SQLitePersistenceLayer.close` does not live on.
    """

    def __init__(self, layer: weakref.ref[SQLitePersistenceLayer]) -> None:
        self.pid = os.getpid()
        self.connection: sqlite3.Connection | None = None
        #: Transactions committed and writes they carried: for tests and tuning.
        self.commits = 0
        self.writes = 0
        self._layer = layer
        self._changed = threading.Condition(threading.Lock())
        self._queue: deque[_Job] = deque()
        self._leading = False
        # Held by the leader while it uses the connection, and by close().
        self._connection_lock = threading.Lock()
        self._purger: threading.Thread | None = None
        self._purge_wanted = threading.Event()
        self._purging = False
        self._stopping = False
        self._checkpoint_due = False
        self._checkpointed_at = 0
        # The purge thread's own connection, for checkpoints that never hold up the writer.
        self._checkpointer: sqlite3.Connection | None = None
        # The connection for writes committed on an event loop (:meth:`arun`): it never waits
        # for the write lock, and is used, like ``connection``, only by the leader.
        self.inline_connection: sqlite3.Connection | None = None
        target = layer()
        synchronous = "FULL" if target is None else target.synchronous
        self.inline_commits = synchronous in ("OFF", "NORMAL", "FULL")
        #: FULL: inline commits skip SQLite's fsync and wait for _sync_wal's instead.
        self.sync_inline = synchronous == "FULL"
        self.inline_seq = 0  # inline commits made
        self._sync_lock = threading.Lock()
        self._synced_seq = 0  # inline commits fsynced
        #: The fsync thread (:meth:`_sync_loop`), while it runs, and what wakes it.
        self._syncer: threading.Thread | None = None
        self._sync_wanted = threading.Event()
        self._sync_waiters: list[tuple[int, asyncio.Future[None], asyncio.AbstractEventLoop]] = []
        self._lent: set[asyncio.Future[None]] = set()  # strong references to lent threads
        #: Per event loop, the writes of its current turn, committed together at its end.
        self._turns: dict[
            asyncio.AbstractEventLoop,
            list[tuple[Write, asyncio.Future[tuple[bool, Any, int]]]],
        ] = {}

    def run(self, write: Write, timeout: float, *, alone: bool = False) -> Any:
        """Run ``write`` in a transaction of this writer and return its result (its exception
        is raised here). A write still queued after ``timeout`` seconds is withdrawn and fails
        with ``database is locked``; one already started is waited for.
        """
        job = _Job(write, alone)
        with self._changed:
            self._queue.append(job)
            lead = not self._leading
            self._leading = True
            if self._purger is None and not self._stopping:
                self._start_purger()
        deadline = time.monotonic() + timeout
        while True:
            if lead:
                self._lead(job)
            if job.state == _DONE:
                break
            if not job.wake.acquire(timeout=max(deadline - time.monotonic(), 0)):
                with self._changed:
                    if job.state == _QUEUED:
                        self._queue.remove(job)
                        job.state = _CANCELLED
                        raise sqlite3.OperationalError(
                            "database is locked (the write waited too long for its turn on "
                            "this process's SQLite writer)"
                        )
                job.wake.acquire()  # started or handed the lead meanwhile: soon released
            if job.state == _DONE:
                break
            lead = True  # job.state == _LEAD
        return job.outcome()

    async def arun(self, write: Write, timeout: float, *, durable: bool = True) -> Any:
        """:meth:`run` for a coroutine on an event loop. When no thread is writing, one worker
        thread is lent to lead; it commits this write and every write queued behind it by event
        loops, then goes back to its pool. The coroutine waits for its own write only, never
        for the lent thread: under load that thread goes on leading for as long as writes keep
        coming, and a request that waited for it waited for all of them.

        A write made while nobody is writing is committed at once on the calling (event loop)
        thread, without fsync: a few writes into the OS page cache, cheaper than handing it to
        a thread and back. Under ``synchronous="FULL"`` the coroutine then waits (unless the
        write need not be ``durable``) until a worker thread has fsynced the WAL past it: what
        FULL does inside every commit, done once for all the writes committed meanwhile, and
        outside the write lock, so the next writes commit during the fsync instead of queueing
        behind it (and behind the worker thread's turns at the GIL).
        """
        loop = asyncio.get_running_loop()
        if self.inline_commits:
            turn = self._turns.get(loop)
            if turn is None:
                # The writes made by the callbacks due in this turn of the loop (the claims
                # and completions of every request it advances) share one transaction.
                turn = self._turns[loop] = []
                loop.call_soon(self._flush_turn, loop)
            inline: asyncio.Future[tuple[bool, Any, int]] = loop.create_future()
            turn.append((write, inline))
            ran, result, seq = await inline
            if ran:
                if durable and self.sync_inline:
                    await self._durable(seq)
                return result
        done = loop.create_future()

        def settle() -> None:
            with suppress(RuntimeError):  # its loop is closed: nobody waits
                loop.call_soon_threadsafe(_settle, done)

        job = _Job(write, settle=settle)
        with self._changed:
            self._queue.append(job)
            lead = not self._leading
            self._leading = True
            if self._purger is None and not self._stopping:
                self._start_purger()
        if lead:
            self._lend_thread(job)
        try:
            await asyncio.wait_for(asyncio.shield(done), timeout)
        except TimeoutError:
            with self._changed:
                if job.state == _QUEUED:
                    self._queue.remove(job)
                    job.state = _CANCELLED
                    raise sqlite3.OperationalError(
                        "database is locked (the write waited too long for its turn on this "
                        "process's SQLite writer)"
                    ) from None
            await done  # started meanwhile: it ends within the busy timeout
        return job.outcome()

    def _flush_turn(self, loop: asyncio.AbstractEventLoop) -> None:
        """Commit the writes this turn of ``loop`` made, in one transaction on the loop's
        thread when nobody leads and the write lock is free at once; otherwise tell each
        caller to queue its write for the writer's thread.
        """
        turn = self._turns.pop(loop, [])
        try:
            outcomes = self._run_inline([write for write, _ in turn])
        except BaseException as exc:  # e.g. no thread for the purge: every caller hears it
            for _, future in turn:
                if not future.done():
                    future.set_exception(_copy(exc))
            return
        for index, (_, future) in enumerate(turn):
            if future.done():  # its caller was cancelled (its write ran all the same)
                continue
            if outcomes is None:
                future.set_result((False, None, 0))
                continue
            job, seq = outcomes[index]
            if job.error is not None:
                future.set_exception(job.error)
            else:
                future.set_result((True, job.result, seq))

    def _run_inline(self, writes: list[Write]) -> list[tuple[_Job, int]] | None:
        """Commit ``writes`` on this thread if nobody leads and the file's write lock is free
        at once (the inline connection never waits: another process holding the lock sends
        the writes to the queue): each write's finished job and its commit's number, or
        ``None`` when they did not run.
        """
        with self._changed:
            if self._leading or self._stopping:
                return None
            self._leading = True
            if self._purger is None:
                self._start_purger()
        done: list[tuple[_Job, int]] | None = None
        try:
            if self._connection_lock.acquire(blocking=False):  # only close() holds it now
                try:
                    done = self._commit_inline(writes)
                finally:
                    self._connection_lock.release()
        finally:
            with self._changed:
                head = self._queue[0] if self._queue else None
                if head is None or head.settle is None:
                    self._hand_over()
                    head = None
            if head is not None:
                self._lend_thread(head)  # another event loop queued meanwhile
        if done is not None:
            self._purge_if_due()
        return done

    def _commit_inline(self, writes: list[Write]) -> list[tuple[_Job, int]] | None:
        """Under ``_connection_lock``: ``writes`` in one transaction on the inline connection
        (each alone in its own when one of them fails, so the failure stays its own), or
        ``None`` when the write lock is taken (by another process) before any of them ran.
        """
        jobs = [_Job(write, settle=_nothing) for write in writes]
        try:
            if self.inline_connection is None:
                layer = self._layer()
                if layer is None:
                    raise sqlite3.OperationalError("the SQLite persistence layer was closed")
                opened = layer._connect(0.0)
                opened.execute("PRAGMA wal_autocheckpoint = 0")  # as the writer's
                mode = opened.execute("PRAGMA journal_mode").fetchone()
                if self.sync_inline and str(mode[0]).lower() != "wal":
                    self.sync_inline = False  # no WAL to fsync: SQLite's own FULL it is
                if self.sync_inline:
                    # FULL's fsync of the WAL is made by _sync_wal, after the commit.
                    opened.execute("PRAGMA synchronous = NORMAL")
                self.inline_connection = opened
            self.inline_connection.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if _is_busy(exc):
                return None
            for job in jobs:
                job.finish(error=_copy(exc))
            return [(job, 0) for job in jobs]
        except BaseException as exc:
            for job in jobs:
                job.finish(error=_copy(exc))
            return [(job, 0) for job in jobs]
        connection = self.inline_connection
        try:
            results = [job.write(connection) for job in jobs]
            connection.execute("COMMIT")
        except BaseException as exc:
            _rollback(connection)
            if len(jobs) == 1:
                jobs[0].finish(error=exc)
                return [(jobs[0], 0)]
            outcomes: list[tuple[_Job, int]] = []
            for write in writes:
                alone = self._commit_inline([write])
                if alone is None:  # another process took the lock meanwhile: report it busy
                    job = _Job(write, settle=_nothing)
                    job.finish(error=sqlite3.OperationalError("database is locked"))
                    alone = [(job, 0)]
                outcomes += alone
            return outcomes
        self._committed(len(jobs))
        self.inline_seq += 1
        for job, result in zip(jobs, results, strict=True):
            job.finish(result)
        return [(job, self.inline_seq) for job in jobs]

    async def _durable(self, seq: int) -> None:
        """Wait until the WAL is fsynced past inline commit ``seq``; the writer's fsync thread
        fsyncs for every coroutine waiting, again while commits keep arriving.
        """
        loop = asyncio.get_running_loop()
        with self._sync_lock:
            if self._synced_seq >= seq:
                return
            done: asyncio.Future[None] = loop.create_future()
            self._sync_waiters.append((seq, done, loop))
            if self._syncer is None:
                self._syncer = threading.Thread(
                    target=self._sync_loop, name="idem-middleware-sqlite-fsync", daemon=True
                )
                self._syncer.start()
        self._sync_wanted.set()
        await done

    def _sync_loop(self) -> None:
        """The fsync thread. The writer's own rather than one lent by an event loop: a loop
        that shuts down cancels what it lent before it starts, and the coroutines of every
        other loop would then wait for an fsync nobody makes. It ends after a second without
        waiters; :meth:`_durable` starts another when one is needed.
        """
        while True:
            woken = self._sync_wanted.wait(timeout=1.0)
            self._sync_wanted.clear()
            with self._sync_lock:
                if not woken and not self._sync_waiters:
                    self._syncer = None
                    return
            self._sync_wal()

    def _sync_wal(self) -> None:
        """fsync the WAL file until no coroutine waits: SQLite's FULL, one fsync for many."""
        layer = self._layer()
        path = None if layer is None else layer.path + "-wal"
        while True:
            target = self.inline_seq  # every commit made so far is in the WAL's page cache
            error: BaseException | None = None
            try:
                if path is None:
                    raise sqlite3.OperationalError("the SQLite persistence layer was closed")
                # Opened each time: the WAL is only ever this one file while the writer's
                # connections are open, but a reopened writer may follow a deleted one.
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                error = sqlite3.OperationalError(f"fsync of the SQLite WAL {path!r} failed: {exc}")
            except BaseException as exc:
                error = exc
            with self._sync_lock:
                if error is None:
                    self._synced_seq = max(self._synced_seq, target)
                waiting = self._sync_waiters
                ready = [w for w in waiting if error is not None or w[0] <= target]
                self._sync_waiters = [w for w in waiting if error is None and w[0] > target]
                finished = not self._sync_waiters
            for _, done, loop in ready:
                with suppress(RuntimeError):  # its loop is closed: nobody waits
                    loop.call_soon_threadsafe(
                        _settle, done, None if error is None else _copy(error)
                    )
            if finished:
                return

    def _lend_thread(self, job: _Job | Callable[[], None]) -> None:
        """Lend a worker thread to lead, starting with the queued event loop write ``job``
        (or to run a function); nothing waits for the thread (see :meth:`arun`).
        """
        import anyio.to_thread

        lent = _Lent(self._lead, job) if isinstance(job, _Job) else _Lent(job)
        task = asyncio.ensure_future(anyio.to_thread.run_sync(lent))
        self._lent.add(task)
        task.add_done_callback(functools.partial(self._lent_done, lent))

    def _lent_done(self, lent: _Lent, task: asyncio.Future[None]) -> None:
        self._lent.discard(task)
        if task.cancelled():
            if not lent.started:
                # Cancelled before a thread took it (its event loop is shutting down): the lead
                # it carries, and the writes queued behind it, go to a thread of their own.
                threading.Thread(target=lent, name="idem-middleware-sqlite-writer").start()
        elif task.exception() is not None:
            logger.error("SQLite writer thread failed", exc_info=task.exception())

    def _purge_if_due(self) -> None:
        layer = self._layer()
        if layer is not None and layer._purge_is_due() and not self._purging:
            self._purge_wanted.set()

    def _lead(self, own: _Job) -> None:
        """Commit batches until ``own`` is done (or a write that runs alone is next: its thread
        takes over) and no event loop's write is next, then hand the lead to the first queued
        write's thread.
        """
        with self._connection_lock:
            while True:
                with self._changed:
                    head = self._queue[0] if self._queue else None
                    lone_next = head is not None and head.alone and head is not own
                    if (own.state == _DONE or lone_next) and (head is None or head.settle is None):
                        if own.state != _DONE:
                            own.state = _QUEUED  # a lone write is first: own turn after it
                        self._hand_over()
                        break
                    batch = self._take_batch(own)
                self._commit(batch)
        self._purge_if_due()

    def _hand_over(self) -> None:
        """Under ``_changed``: make the first queued write's thread the leader, or stop
        leading when nothing is queued.
        """
        if self._queue:
            successor = self._queue[0]
            successor.state = _LEAD
            successor.wake.release()
        else:
            self._leading = False
            self._changed.notify_all()

    def _take_batch(self, own: _Job) -> list[_Job]:
        batch: list[_Job] = []
        queue = self._queue
        if queue and queue[0].alone:
            if queue[0] is not own:
                return batch
            batch.append(queue.popleft())
        else:
            while queue and len(batch) < _MAX_BATCH and not queue[0].alone:
                batch.append(queue.popleft())
        for job in batch:
            job.state = _RUNNING
        return batch

    def _connect(self) -> sqlite3.Connection:
        if self.connection is None:
            layer = self._layer()
            if layer is None:
                raise sqlite3.OperationalError("the SQLite persistence layer was closed")
            connection = layer._connect()
            # A checkpoint inside a commit stalls every write of its batch (with FULL, for two
            # fsyncs and the copy): the purge thread runs them instead (_checkpoint).
            connection.execute("PRAGMA wal_autocheckpoint = 0")
            self.connection = connection
        return self.connection

    def _commit(self, batch: list[_Job]) -> None:
        try:
            connection = self._connect()
            if batch[0].alone:
                connection.execute(f"PRAGMA busy_timeout = {_PURGE_BUSY_TIMEOUT_MS}")
                try:
                    connection.execute("BEGIN IMMEDIATE")
                finally:
                    layer = self._layer()
                    if layer is not None:
                        timeout_ms = int(layer.busy_timeout_seconds * 1000)
                        connection.execute(f"PRAGMA busy_timeout = {timeout_ms}")
            else:
                connection.execute("BEGIN IMMEDIATE")
        except BaseException as exc:
            # No lock (another process held it past the busy timeout) or no file: every write
            # of the batch fails alike.
            for job in batch:
                job.finish(error=_copy(exc))
            return
        try:
            results = [job.write(connection) for job in batch]
            connection.execute("COMMIT")
        except BaseException as exc:
            _rollback(connection)
            if len(batch) == 1:
                batch[0].finish(error=exc)
                return
            for job in batch:
                self._commit([job])
            return
        self._committed(len(batch))
        for job, result in zip(batch, results, strict=True):
            job.finish(result)

    def _committed(self, writes: int) -> None:
        self.commits += 1
        self.writes += writes
        if self.commits - self._checkpointed_at >= _CHECKPOINT_EVERY_COMMITS:
            self._checkpointed_at = self.commits
            self._checkpoint_due = True
            self._purge_wanted.set()

    # Purge --------------------------------------------------------------------------------

    def _start_purger(self) -> None:
        self._purger = threading.Thread(
            target=self._purge_loop, name=f"idem-sqlite-purge-{self.pid}", daemon=True
        )
        self._purger.start()

    def _purge_loop(self) -> None:
        try:
            while True:
                layer = self._layer()
                if layer is None or self._stopping:
                    return
                if self._checkpoint_due:
                    self._checkpoint_due = False
                    self._checkpoint(layer)
                wait = min(layer.purge_interval_seconds, _WRITER_WAKE_SECONDS)
                if layer._purge_is_due():
                    with self._changed:
                        self._purging = True
                    try:
                        layer._purge_once(self)
                    finally:
                        with self._changed:
                            self._purging = False
                            self._changed.notify_all()
                    continue
                del layer
                self._purge_wanted.wait(max(wait, 0.001))
                self._purge_wanted.clear()
        finally:
            checkpointer, self._checkpointer = self._checkpointer, None
            if checkpointer is not None:
                checkpointer.close()
            with self._changed:
                if self._purger is threading.current_thread():
                    self._purger = None
                self._changed.notify_all()

    def _checkpoint(self, layer: SQLitePersistenceLayer) -> None:
        """Copy the WAL into the file as far as readers allow (PASSIVE: it never waits for a
        writer nor makes one wait), on a connection of this thread, beside the writer's.
        """
        try:
            if self._checkpointer is None:
                self._checkpointer = layer._connect()
            self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error:
            logger.debug("SQLite WAL checkpoint failed; the next one retries", exc_info=True)

    def stop(self) -> None:
        """End the purge thread and close the connection once the current leader is done."""
        with self._changed:
            self._stopping = True
            purger = self._purger
        self._purge_wanted.set()
        if purger is not None and purger is not threading.current_thread():
            purger.join()
        with self._connection_lock:
            for connection in (self.connection, self.inline_connection):
                if connection is not None:
                    connection.close()
            self.connection = self.inline_connection = None
        with self._changed:
            self._stopping = False
            self._purge_wanted.clear()

    def shutdown(self) -> None:
        """End the purge thread without waiting: the layer is gone."""
        if self.pid == os.getpid():
            self._stopping = True
            self._purge_wanted.set()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is queued, running or due to purge (tests use it to see a purge's
        result); returns whether it got there in time.
        """
        deadline = time.monotonic() + timeout
        while True:
            with self._changed:
                idle = self._changed.wait_for(
                    lambda: not self._leading and not self._queue and not self._purging,
                    max(deadline - time.monotonic(), 0),
                )
            layer = self._layer()
            if not idle or layer is None or self._purger is None or not layer._purge_is_due():
                return idle
            del layer
            self._purge_wanted.set()
            time.sleep(0.001)  # the purge thread takes it from here


class _Lent:
    """A call lent to a worker thread, which says whether a thread has started it."""

    __slots__ = ("args", "function", "started")

    def __init__(self, function: Callable[..., None], *args: Any) -> None:
        self.function = function
        self.args = args
        self.started = False

    def __call__(self) -> None:
        self.started = True
        self.function(*self.args)


def _nothing() -> None:
    """The ``settle`` of a write committed inline: its caller is already there."""


def _settle(done: asyncio.Future[None], error: BaseException | None = None) -> None:
    if not done.done():
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)


def _copy(exc: BaseException) -> BaseException:
    """One exception object per waiting caller: each raises it in its own thread, and raising
    one object in several threads at once would tangle their tracebacks.
    """
    try:
        return copy.copy(exc)
    except Exception:
        return exc


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
