"""PostgresPersistenceLayer: records in one PostgreSQL table, through psycopg 3 and its pool.

The claim is one statement of three CTEs. The first reads the key's record: when a live one is
visible, it is the answer, with no write and no row lock, so a replay or a conflict is a
read-only transaction (nothing to flush at commit, nothing to queue behind). Otherwise
``INSERT ... ON CONFLICT (id) DO UPDATE ... WHERE <the existing record is dead>`` creates the
record or takes a dead one over; when the conflict update is refused (a live record committed
meanwhile), ``ON CONFLICT`` has locked that row, and the third CTE reads it ``FOR SHARE``: the
very version the claim was judged against, in the same round trip. One race remains: a row
committed after the statement's snapshot was taken is seen by the conflict check but by no read
in the same statement, which then returns neither a claim nor a record; it is simply run again,
with a snapshot that sees the row (or its absence).

Completion, lease renewal and release are fenced on the lease token (``in_progress_expiration``
and ``lease_id``), as in the DynamoDB layer, whose attribute names the columns mirror. Expired
rows are deleted in short batches by a background thread, at most every
``purge_interval_seconds``, never on a request.

Under ASGI the layer runs on the event loop through psycopg's asyncio connections
(``native_async``): the same statements, one ``AsyncConnectionPool`` per event loop, and no
worker thread per store call; WSGI, the CLI and the purge use the blocking pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import threading
import weakref
from collections.abc import Iterator, Mapping
from contextlib import AbstractAsyncContextManager, AbstractContextManager, contextmanager
from typing import Any, Protocol

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool, ConnectionPool, PoolTimeout

from idem_middleware.exceptions import (
    IdempotencyInvalidStatusError,
    IdempotencyItemAlreadyExistsError,
    IdempotencyItemNotFoundError,
    IdempotencyLeaseLostError,
    IdempotencyPersistenceLayerError,
    StoreNotAuthorisedError,
    StoreNotFoundError,
    StoreRecordUnreadableError,
    StoreUnreachableError,
)
from idem_middleware.persistence.base import BasePersistenceLayer
from idem_middleware.persistence.record import STATUS_INPROGRESS, DataRecord
from idem_middleware.persistence.sql_params import (
    completion_params,
    release_params,
    renewal_params,
)

logger = logging.getLogger(__name__)

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_COLUMNS = "id, status, expiration, in_progress_expiration, data, validation, lease_id"
_SET_STATEMENT_TIMEOUT = "SELECT set_config('statement_timeout', %s, false)"
#: A claim that finds neither a claim nor a record has met a row committed after its snapshot;
#: each rerun sees everything committed before it starts, so more than a few means a fault.
_CLAIM_ATTEMPTS = 10


class ConnectionSource(Protocol):
    """Anything that lends psycopg connections the way ``psycopg_pool.ConnectionPool`` does."""

    def connection(self) -> AbstractContextManager[psycopg.Connection[Any]]: ...


class AsyncConnectionSource(Protocol):
    """Anything that lends psycopg asyncio connections the way
    ``psycopg_pool.AsyncConnectionPool`` does.
    """

    def connection(self) -> AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]: ...


class PostgresPersistenceLayer(BasePersistenceLayer):
    """Records in a PostgreSQL table, for apps that already run PostgreSQL.

    Pass ``conninfo`` (a libpq connection string or ``postgresql://`` URL) and the layer opens its
    own ``psycopg_pool.ConnectionPool`` on first use, in each process (a layer built before the
    server forks its workers is safe to use in every worker), and under ASGI its own
    ``psycopg_pool.AsyncConnectionPool`` on each event loop it runs on, so the store calls are
    awaited there with no worker thread; :meth:`aclose` closes the running loop's. Or pass
    ``pool``: a connection pool you own and open (``psycopg_pool.ConnectionPool`` or anything
    with a ``connection()`` context manager lending ``psycopg.Connection`` objects), and for the
    asyncio path its counterpart as ``async_pool`` (an open ``AsyncConnectionPool`` on the
    server's event loop, or anything whose ``connection()`` is an async context manager lending
    ``psycopg.AsyncConnection`` objects), or the store calls run in worker threads; the layer
    never closes either.

    The layer's own connections are in autocommit mode, so every statement is its own
    transaction and no row lock outlives it; a supplied pool's connections should be too (or
    READ COMMITTED, each ``connection()`` block committing at its end). ``pool_timeout_seconds``
    bounds the wait for a pooled connection and ``statement_timeout_seconds`` every statement on
    the layer's own connections, so an unreachable or stuck database answers a request with a
    503 within seconds. The layer's own connections prepare each statement on its first use
    (``prepare_threshold``, as psycopg's connection option of that name; ``None`` for none, e.g.
    behind PgBouncer older than 1.22 in transaction mode).

    The table is created by :meth:`create_table` (once, at deploy time or startup), not on a
    request. Expired records are deleted by a background thread every ``purge_interval_seconds``,
    ``purge_batch_size`` rows per statement; :meth:`purge_expired` runs the same purge on demand.
    """

    def __init__(
        self,
        conninfo: str | None = None,
        *,
        pool: ConnectionSource | None = None,
        async_pool: AsyncConnectionSource | None = None,
        table_name: str = "idempotency_records",
        schema: str | None = None,
        min_pool_size: int = 1,
        max_pool_size: int = 10,
        pool_timeout_seconds: float = 2.0,
        connect_timeout_seconds: int = 2,
        statement_timeout_seconds: float | None = 5.0,
        purge_interval_seconds: float = 300.0,
        purge_batch_size: int = 1000,
        prepare_threshold: int | None = 0,
    ) -> None:
        super().__init__()
        if (conninfo is None) == (pool is None):
            raise ValueError("pass either conninfo or pool (exactly one)")
        if pool is not None and not callable(getattr(pool, "connection", None)):
            raise TypeError("pool must lend connections through a connection() context manager")
        if async_pool is not None:
            if pool is None:
                raise ValueError(
                    "async_pool comes with pool: the blocking pool serves WSGI, the CLI, "
                    "check(), create_table() and the purge"
                )
            if not callable(getattr(async_pool, "connection", None)):
                raise TypeError(
                    "async_pool must lend connections through an async connection() context manager"
                )
        if not isinstance(table_name, str) or not _IDENTIFIER.fullmatch(table_name):
            raise ValueError(f"table_name must be a plain SQL identifier, got {table_name!r}")
        if schema is not None and (
            not isinstance(schema, str) or not _IDENTIFIER.fullmatch(schema)
        ):
            raise ValueError(f"schema must be a plain SQL identifier, got {schema!r}")
        if not (
            _is_int(min_pool_size)
            and _is_int(max_pool_size)
            and min_pool_size >= 0
            and max_pool_size >= max(1, min_pool_size)
        ):
            raise ValueError(
                "need integers 0 <= min_pool_size <= max_pool_size and max_pool_size >= 1, "
                f"got min_pool_size={min_pool_size!r}, max_pool_size={max_pool_size!r}"
            )
        # Finite numbers only: nan passes every "<= 0" check, then fails or disables each use.
        if not _is_finite(pool_timeout_seconds) or pool_timeout_seconds <= 0:
            raise ValueError("pool_timeout_seconds must be > 0")
        if not _is_finite(connect_timeout_seconds) or connect_timeout_seconds < 1:
            raise ValueError("connect_timeout_seconds must be >= 1")
        if statement_timeout_seconds is not None and (
            not _is_finite(statement_timeout_seconds) or statement_timeout_seconds <= 0
        ):
            raise ValueError("statement_timeout_seconds must be > 0 (or None for no limit)")
        if not _is_finite(purge_interval_seconds) or purge_interval_seconds <= 0:
            raise ValueError("purge_interval_seconds must be > 0")
        if not _is_int(purge_batch_size) or purge_batch_size < 1:
            raise ValueError("purge_batch_size must be >= 1")
        if prepare_threshold is not None and (
            not _is_int(prepare_threshold) or prepare_threshold < 0
        ):
            raise ValueError("prepare_threshold must be an integer >= 0 (or None for none)")

        self.conninfo = conninfo
        self.table_name = table_name
        self.schema = schema
        self.min_pool_size = min_pool_size
        self.max_pool_size = max_pool_size
        self.pool_timeout_seconds = pool_timeout_seconds
        self.connect_timeout_seconds = connect_timeout_seconds
        self.statement_timeout_seconds = statement_timeout_seconds
        self.purge_interval_seconds = purge_interval_seconds
        self.purge_batch_size = purge_batch_size
        self.prepare_threshold = prepare_threshold

        if conninfo is not None:
            try:
                params = conninfo_to_dict(conninfo)
            except psycopg.Error:
                # Not chained: libpq's message may quote the string, password included.
                raise ValueError(
                    "conninfo is not a valid PostgreSQL connection string or URL"
                ) from None
            self.location = _describe(params)
        else:
            self.location = "the PostgreSQL database of the supplied pool"
            pool_conninfo = getattr(pool, "conninfo", None)
            if isinstance(pool_conninfo, str):
                with contextlib.suppress(psycopg.Error):
                    self.location = _describe(conninfo_to_dict(pool_conninfo))
        self._user_pool = pool
        self._user_async_pool = async_pool
        #: Whether store calls can run on the event loop (an asyncio pool is at hand).
        self.native_async = async_pool is not None or conninfo is not None
        # An asyncio pool serves the event loop it was opened on: one per loop, dropped with its
        # loop. The last one used is kept at hand, as a server runs one loop.
        self._async_by_loop: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, AsyncConnectionPool[Any]
        ] = weakref.WeakKeyDictionary()
        # Each pool's closer task, referenced here so that it lives as long as its loop.
        self._closers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Task[None]] = (
            weakref.WeakKeyDictionary()
        )
        self._last_async: tuple[asyncio.AbstractEventLoop | None, AsyncConnectionSource | None] = (
            None,
            None,
        )
        self._pool: ConnectionPool[Any] | None = None
        self._pool_pid = -1
        self._pool_lock = threading.Lock()
        # Pools inherited through fork(): kept referenced and never used in the child, whose
        # copies of the parent's sockets must not be closed nor written to.
        self._inherited: list[ConnectionPool[Any]] = []
        _reset_locks_at_fork(self)
        self._next_purge = 0.0
        self._purge_thread: threading.Thread | None = None

        table = sql.Identifier(table_name) if schema is None else sql.Identifier(schema, table_name)
        self.qualified_name = table_name if schema is None else f"{schema}.{table_name}"

        columns = sql.SQL(_COLUMNS)
        # Whether the record aliased ``r`` no longer blocks a claim (see DataRecord.blocks_claim).
        dead = sql.SQL(
            "(r.expiration < %(now)s"
            " OR (r.status = %(inprogress)s AND r.in_progress_expiration < %(now_ms)s))"
        )

        def render(template: str, **names: sql.Composable) -> bytes:
            # The table and index names are the only text put into SQL, validated above and
            # quoted as identifiers; every value is a bound parameter.
            return (
                sql.SQL(template)
                .format(t=table, columns=columns, dead=dead, **names)
                .as_bytes(None)
            )

        self._sql_claim = render(
            # A live record visible at once is answered from the read alone: no row lock, so a
            # replay or a conflict is a read-only transaction with no commit to flush.
            "WITH live AS ("
            " SELECT {columns} FROM {t} AS r WHERE r.id = %(id)s AND {dead} IS NOT TRUE"
            "), claim AS ("
            " INSERT INTO {t} AS r ({columns})"
            " SELECT %(id)s, %(status)s, %(expiration)s, %(lease)s, NULL, %(validation)s,"
            " %(lease_id)s"
            " WHERE NOT EXISTS (SELECT 1 FROM live)"
            " ON CONFLICT (id) DO UPDATE SET"
            " status = EXCLUDED.status, expiration = EXCLUDED.expiration,"
            " in_progress_expiration = EXCLUDED.in_progress_expiration, data = NULL,"
            " validation = EXCLUDED.validation, lease_id = EXCLUDED.lease_id"
            " WHERE {dead}"
            " RETURNING 1"
            "), existing AS ("
            # The row the conflict check locked: FOR SHARE reads its latest version.
            " SELECT {columns} FROM {t}"
            " WHERE id = %(id)s AND NOT EXISTS (SELECT 1 FROM live)"
            " AND NOT EXISTS (SELECT 1 FROM claim) FOR SHARE"
            ") "
            "SELECT EXISTS (SELECT 1 FROM claim), found.* FROM (VALUES (1)) AS one (x) "
            "LEFT JOIN (SELECT * FROM live UNION ALL SELECT * FROM existing) AS found ON true"
        )
        self._sql_select = render("SELECT {columns} FROM {t} WHERE id = %s")
        self._sql_complete = render(
            "UPDATE {t} SET status = %(status)s, expiration = %(expiration)s, data = %(data)s,"
            " validation = COALESCE(%(validation)s, validation)"
            " WHERE id = %(id)s AND status = %(inprogress)s AND in_progress_expiration = %(lease)s"
            " AND lease_id IS NOT DISTINCT FROM %(lease_id)s"
        )
        self._sql_renew = render(
            "UPDATE {t} SET in_progress_expiration = %(renewed)s, expiration = %(expiration)s"
            " WHERE id = %(id)s AND status = %(inprogress)s AND in_progress_expiration = %(lease)s"
            " AND lease_id IS NOT DISTINCT FROM %(lease_id)s"
        )
        self._sql_release = render(
            "DELETE FROM {t}"
            " WHERE id = %(id)s AND status = %(inprogress)s AND in_progress_expiration = %(lease)s"
            " AND lease_id IS NOT DISTINCT FROM %(lease_id)s"
        )
        self._sql_remove = render("DELETE FROM {t} WHERE id = %s")
        # SKIP LOCKED: rows a claim is taking over are left to it; the purge never waits.
        self._sql_purge = render(
            "DELETE FROM {t} WHERE expiration < %(cutoff)s AND id IN ("
            " SELECT id FROM {t} WHERE expiration < %(cutoff)s"
            " LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
        )
        self._sql_probe = render("SELECT {columns} FROM {t} LIMIT 0")
        self._sql_create = [
            render(
                "CREATE TABLE IF NOT EXISTS {t} ("
                "id TEXT PRIMARY KEY, "
                "status TEXT NOT NULL, "
                "expiration BIGINT, "
                "in_progress_expiration BIGINT, "
                "data TEXT, "
                "validation TEXT, "
                "lease_id TEXT)"
            ),
            render(
                "CREATE INDEX IF NOT EXISTS {index} ON {t} (expiration)",
                index=sql.Identifier(f"{table_name}_expiration_idx"[:63]),
            ),
        ]

    # Primitives: each builds its parameters, runs its statement blocking or awaited, and reads
    # the answer -------------------------------------------------------------------------------

    def _put_record(self, data_record: DataRecord) -> None:
        now = self.clock()
        params = self._claim_params(data_record, now)
        row: tuple[Any, ...] | None = None
        with self._store_errors("claim"), self._connection() as connection:
            for _attempt in range(_CLAIM_ATTEMPTS):
                row = connection.execute(self._sql_claim, params).fetchone()
                if _settled(row):
                    break
        self._claimed(row, now)

    async def _aput_record(self, data_record: DataRecord) -> None:
        now = self.clock()
        params = self._claim_params(data_record, now)
        row: tuple[Any, ...] | None = None
        with self._store_errors("claim"):
            async with await self._aconnection() as connection:
                for _attempt in range(_CLAIM_ATTEMPTS):
                    row = await (await _aexecute(connection, self._sql_claim, params)).fetchone()
                    if _settled(row):
                        break
        self._claimed(row, now)

    def _claim_params(self, data_record: DataRecord, now: float) -> dict[str, Any]:
        return {
            "id": data_record.idempotency_key,
            "status": data_record.status,
            "expiration": data_record.expiry_timestamp,
            "lease": data_record.in_progress_expiry_timestamp,
            "lease_id": data_record.lease_id,
            "validation": data_record.payload_hash,
            "now": int(now),
            "now_ms": int(now * 1000),
            "inprogress": STATUS_INPROGRESS,
        }

    def _claimed(self, row: tuple[Any, ...] | None, now: float) -> None:
        if not _settled(row):
            raise IdempotencyPersistenceLayerError(
                f"PostgreSQL claim on {self.location} (table {self.qualified_name}) found "
                f"neither a free key nor its record in {_CLAIM_ATTEMPTS} attempts"
            )
        self._purge_soon(now)
        assert row is not None
        if not row[0]:
            raise IdempotencyItemAlreadyExistsError(self._to_record(row[1:]))

    def _get_record(self, idempotency_key: str) -> DataRecord:
        with self._store_errors("read"), self._connection() as connection:
            row = connection.execute(self._sql_select, (idempotency_key,)).fetchone()
        return self._read(idempotency_key, row)

    async def _aget_record(self, idempotency_key: str) -> DataRecord:
        with self._store_errors("read"):
            async with await self._aconnection() as connection:
                cursor = await _aexecute(connection, self._sql_select, (idempotency_key,))
                row = await cursor.fetchone()
        return self._read(idempotency_key, row)

    def _read(self, idempotency_key: str, row: tuple[Any, ...] | None) -> DataRecord:
        if row is None:
            raise IdempotencyItemNotFoundError(idempotency_key)
        return self._to_record(row)

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

    def _fenced_write(self, operation: str, statement: bytes, params: dict[str, Any]) -> None:
        """A write fenced on the lease: exactly one row changes, or the lease is lost."""
        with self._store_errors(operation), self._connection() as connection:
            changed = connection.execute(statement, params).rowcount
        if changed != 1:
            raise IdempotencyLeaseLostError(params["id"])

    async def _afenced_write(
        self, operation: str, statement: bytes, params: dict[str, Any]
    ) -> None:
        with self._store_errors(operation):
            async with await self._aconnection() as connection:
                changed = (await _aexecute(connection, statement, params)).rowcount
        if changed != 1:
            raise IdempotencyLeaseLostError(params["id"])

    def _remove_record(self, idempotency_key: str) -> bool:
        with self._store_errors("delete"), self._connection() as connection:
            deleted = connection.execute(self._sql_remove, (idempotency_key,)).rowcount
        return deleted == 1

    # Schema and health --------------------------------------------------------------------

    def create_table(self) -> None:
        """Create the table and its expiry index unless they exist; safe to run concurrently
        from several processes (a transaction-level advisory lock serialises them).
        """
        with (
            self._store_errors("create_table"),
            self._connection() as connection,
            connection.transaction(),
        ):
            connection.execute(
                "SELECT pg_advisory_xact_lock(hashtext(%s))",
                (f"idem_middleware:{self.qualified_name}",),
            )
            for statement in self._sql_create:
                connection.execute(statement)

    def check(self) -> None:
        """Raise :class:`IdempotencyPersistenceLayerError` unless the database answers and the
        table exists with the expected columns and the privileges the layer needs.

        With ``conninfo`` it opens a short-lived connection of its own rather than waiting on the
        pool, so an unreachable server fails at once and the message names the cause (refused,
        authentication, unknown database) instead of a pool timeout.
        """
        with self._store_errors("check"), self._check_connection() as connection:
            connection.execute(self._sql_probe)
            row = connection.execute(
                "SELECT bool_and(has_table_privilege(to_regclass(%s), p))"
                " FROM unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE']) AS p",
                (self._regclass_name(),),
            ).fetchone()
        if row is None or not row[0]:
            raise StoreNotAuthorisedError(
                f"the PostgreSQL role on {self.location} may not use table "
                f"{self.qualified_name}: GRANT SELECT, INSERT, UPDATE, DELETE ON it"
            )

    def _check_connection(self) -> AbstractContextManager[psycopg.Connection[Any]]:
        if self.conninfo is None:
            return self._connection()
        try:
            return psycopg.connect(self.conninfo, **self._connect_kwargs())
        except psycopg.OperationalError as exc:
            raise _connection_error_type(exc)(
                f"cannot connect to PostgreSQL {self.location}: {exc} "
                "(check the conninfo's host, port, dbname and user, and that the server runs)"
            ) from exc

    # Housekeeping -------------------------------------------------------------------------

    def purge_expired(self, now: float | None = None) -> int:
        """Delete every record past its expiry; returns how many were deleted.

        Each batch of ``purge_batch_size`` rows is its own statement on a connection borrowed
        for that batch only, so requests interleave with a large purge instead of waiting.
        """
        cutoff = int(self.clock() if now is None else now)
        params = {"cutoff": cutoff, "limit": self.purge_batch_size}
        deleted = 0
        while True:
            with self._store_errors("purge"), self._connection() as connection:
                count = connection.execute(self._sql_purge, params).rowcount
            deleted += count
            if count < self.purge_batch_size:
                return deleted

    def _purge_soon(self, now: float) -> None:
        """Start a background purge when one is due and none is running."""
        if now < self._next_purge:
            return
        with self._pool_lock:
            running = self._purge_thread is not None and self._purge_thread.is_alive()
            if now < self._next_purge or running:
                return
            self._next_purge = now + self.purge_interval_seconds
            self._purge_thread = threading.Thread(
                target=self._purge_in_background,
                args=(now,),
                name="idem-middleware-postgres-purge",
                daemon=True,
            )
            self._purge_thread.start()

    def _purge_in_background(self, now: float) -> None:
        try:
            deleted = self.purge_expired(now)
        except IdempotencyPersistenceLayerError:
            logger.warning("purging expired idempotency records failed", exc_info=True)
        else:
            if deleted:
                logger.debug("purged %d expired idempotency records", deleted)

    def close(self) -> None:
        """Close the pool this layer opened (never a supplied one); later calls reopen it."""
        purge = self._purge_thread
        if purge is not None:
            # First, so that a purge between two batches cannot open a new pool.
            purge.join(timeout=self.pool_timeout_seconds + 1)
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None and self._pool_pid == os.getpid():
            pool.close()

    # Connections --------------------------------------------------------------------------

    def _connection(self) -> AbstractContextManager[psycopg.Connection[Any]]:
        if self._user_pool is not None:
            return self._user_pool.connection()
        pool = self._pool
        if pool is None or self._pool_pid != os.getpid():
            pool = self._open_pool()
        return pool.connection()

    def _open_pool(self) -> ConnectionPool[Any]:
        with self._pool_lock:
            pid = os.getpid()
            if self._pool is not None and self._pool_pid == pid:
                return self._pool
            if self._pool is not None:
                self._inherited.append(self._pool)
            pool: ConnectionPool[Any] = ConnectionPool(
                self.conninfo or "",
                kwargs=self._connect_kwargs(),
                min_size=self.min_pool_size,
                max_size=self.max_pool_size,
                timeout=self.pool_timeout_seconds,
                configure=self._configure_connection,
                name="idem-middleware",
                open=False,
            )
            pool.open(wait=False)
            self._pool, self._pool_pid = pool, pid
            return pool

    async def _aconnection(self) -> AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]:
        """An asyncio connection of the running loop's pool, for one ``async with`` block."""
        pool = await self._async_pool()
        if pool is self._user_async_pool or not isinstance(pool, AsyncConnectionPool):
            # A supplied pool's connections may not be in autocommit mode: its connection()
            # block commits at its end.
            return pool.connection()
        return _Borrowed(pool)

    async def _async_pool(self) -> AsyncConnectionSource:
        """The asyncio pool for the running event loop, opened on it at first use."""
        if self._user_async_pool is not None:
            return self._user_async_pool
        loop = asyncio.get_running_loop()
        last_loop, last = self._last_async
        if last_loop is loop and last is not None:
            return last
        pool = self._async_by_loop.get(loop)
        if pool is None:
            if self.conninfo is None:
                raise RuntimeError("this PostgresPersistenceLayer has no asyncio pool")
            pool = AsyncConnectionPool[_LayerConnection](
                self.conninfo,
                kwargs=self._connect_kwargs(),
                min_size=self.min_pool_size,
                max_size=self.max_pool_size,
                timeout=self.pool_timeout_seconds,
                configure=self._aconfigure_connection,
                connection_class=_LayerConnection,
                name="idem-middleware-asyncio",
                open=False,
            )
            self._async_by_loop[loop] = pool
            self._closers[loop] = loop.create_task(_close_at_shutdown(pool))
        # Safe to run concurrently: the pool opens once, behind its own lock.
        await pool.open(wait=False)
        self._last_async = (loop, pool)
        return pool

    async def aclose(self) -> None:
        """Close the asyncio pool this layer opened on the running event loop, if any (a pool
        passed in as ``async_pool`` is its owner's to close).
        """
        loop = asyncio.get_running_loop()
        pool = self._async_by_loop.pop(loop, None)
        closer = self._closers.pop(loop, None)
        if self._last_async[0] is loop:
            self._last_async = (None, None)
        if pool is not None:
            await pool.close()
        if closer is not None:
            closer.cancel()

    def _connect_kwargs(self) -> dict[str, Any]:
        # Autocommit: every statement is its own transaction, so no lock outlives it.
        kwargs: dict[str, Any] = {
            "autocommit": True,
            "prepare_threshold": self.prepare_threshold,
        }
        if "connect_timeout" not in conninfo_to_dict(self.conninfo or ""):
            kwargs["connect_timeout"] = self.connect_timeout_seconds
        return kwargs

    def _configure_connection(self, connection: psycopg.Connection[Any]) -> None:
        if self.statement_timeout_seconds is not None:
            connection.execute(_SET_STATEMENT_TIMEOUT, (self._statement_timeout(),))

    async def _aconfigure_connection(self, connection: psycopg.AsyncConnection[Any]) -> None:
        if self.statement_timeout_seconds is not None:
            await connection.execute(_SET_STATEMENT_TIMEOUT, (self._statement_timeout(),))

    def _statement_timeout(self) -> str:
        assert self.statement_timeout_seconds is not None
        # At least 1 ms: PostgreSQL reads "0ms" as no timeout at all.
        return f"{max(1, math.ceil(self.statement_timeout_seconds * 1000))}ms"

    @contextmanager
    def _store_errors(self, operation: str) -> Iterator[None]:
        try:
            yield
        except pg_errors.UndefinedTable as exc:
            raise StoreNotFoundError(
                f"table {self.qualified_name} does not exist in {self.location}: "
                "run PostgresPersistenceLayer.create_table() once"
            ) from exc
        except (pg_errors.UndefinedColumn, pg_errors.DatatypeMismatch) as exc:
            raise IdempotencyPersistenceLayerError(
                f"table {self.qualified_name} in {self.location} is not an idempotency table "
                f"(expected columns {_COLUMNS}): {exc}"
            ) from exc
        except (
            pg_errors.InsufficientPrivilege,
            pg_errors.InvalidAuthorizationSpecification,
        ) as exc:
            raise StoreNotAuthorisedError(
                f"PostgreSQL {operation} on {self.location} (table {self.qualified_name}) was "
                f"refused: grant the role SELECT, INSERT, UPDATE and DELETE on it: {exc}"
            ) from exc
        except PoolTimeout as exc:
            raise StoreUnreachableError(
                f"PostgreSQL {operation} on {self.location} failed: no pooled connection within "
                f"the pool timeout (server down or unreachable, or every connection busy; "
                f"check() names the cause): {exc}"
            ) from exc
        except psycopg.Error as exc:
            if _is_connection_failure(exc):
                raise StoreUnreachableError(
                    f"PostgreSQL {operation} on {self.location} failed to connect or lost its "
                    f"connection: {exc}"
                ) from exc
            raise IdempotencyPersistenceLayerError(
                f"PostgreSQL {operation} on {self.location} "
                f"(table {self.qualified_name}) failed: {exc}"
            ) from exc

    def _regclass_name(self) -> str:
        quoted = sql.Identifier(self.table_name).as_string(None)
        if self.schema is None:
            return quoted
        return f"{sql.Identifier(self.schema).as_string(None)}.{quoted}"

    def _to_record(self, row: tuple[Any, ...]) -> DataRecord:
        key, status, expiration, in_progress, data, validation, lease_id = row
        try:
            return DataRecord(
                idempotency_key=key,
                status=status,
                expiry_timestamp=None if expiration is None else int(expiration),
                in_progress_expiry_timestamp=None if in_progress is None else int(in_progress),
                response_data=data,
                payload_hash=validation,
                lease_id=lease_id,
            )
        except (IdempotencyInvalidStatusError, TypeError, ValueError) as exc:
            raise StoreRecordUnreadableError(
                f"the record {key!r} in table {self.qualified_name} is unreadable: {exc}"
            ) from exc


class _LayerConnection(psycopg.AsyncConnection[tuple[Any, ...]]):
    """A connection of the layer's own asyncio pool, which keeps one cursor for the layer's
    statements: ``connection.execute`` makes a cursor (and its adapters) per statement, which
    costs about a third of a short statement's CPU time with psycopg's pure-Python
    implementation (measured: 145 against 100 µs per round trip).
    """

    layer_cursor: psycopg.AsyncCursor[tuple[Any, ...]] | None = None


async def _aexecute(
    connection: psycopg.AsyncConnection[Any], statement: bytes, params: Any
) -> psycopg.AsyncCursor[Any]:
    """Run ``statement`` on ``connection``; the cursor holds its result until the next one."""
    if isinstance(connection, _LayerConnection):
        cursor = connection.layer_cursor
        if cursor is None or cursor.closed:
            cursor = connection.layer_cursor = connection.cursor()
        return await cursor.execute(statement, params)
    return await connection.execute(statement, params)


class _Borrowed:
    """A connection of the layer's own asyncio pool for one block, returned at its end.

    ``AsyncConnectionPool.connection()`` also ends the block with a commit on the connection
    (nothing to commit in autocommit mode, but a lock and a wait all the same) and keeps usage
    statistics; ``getconn`` / ``putconn`` alone cost about a tenth less CPU per store call
    (measured in-process: 253 against 293 µs per replayed claim, 462 against 520 per new key).
    A connection returned broken is replaced by the pool, as with ``connection()``.
    """

    __slots__ = ("_connection", "_pool")

    def __init__(self, pool: AsyncConnectionPool[Any]) -> None:
        self._pool = pool
        self._connection: psycopg.AsyncConnection[Any] | None = None

    async def __aenter__(self) -> psycopg.AsyncConnection[Any]:
        self._connection = await self._pool.getconn()
        return self._connection

    async def __aexit__(self, *exc_info: object) -> None:
        if self._connection is not None:
            connection, self._connection = self._connection, None
            await self._pool.putconn(connection)


async def _close_at_shutdown(pool: AsyncConnectionPool[Any]) -> None:
    """Close ``pool`` when its event loop shuts down, which cancels every task left (as
    ``asyncio.run`` and uvicorn do): a pool left open there hangs the shutdown whenever one of
    its workers is opening a connection, as psycopg_pool's workers outlive that cancellation.
    """
    try:
        await asyncio.get_running_loop().create_future()  # never done: waits for the cancel
    finally:
        await pool.close()


def _settled(row: tuple[Any, ...] | None) -> bool:
    """Whether a claim's answer is a claim or a record (else it met a row committed after its
    snapshot, and runs again).
    """
    return row is not None and (bool(row[0]) or row[1] is not None)


def _is_connection_failure(exc: psycopg.Error) -> bool:
    # Client-side connection errors carry no SQLSTATE; the server's are class 08, and a server
    # ending the session (an operator's pg_terminate_backend, a shutdown, a failover) says 57P0x.
    return isinstance(exc, psycopg.OperationalError) and (
        exc.sqlstate is None or exc.sqlstate.startswith("08") or exc.sqlstate in _SESSION_ENDED
    )


#: admin_shutdown, crash_shutdown, cannot_connect_now: the server ended or refused the session.
_SESSION_ENDED = frozenset({"57P01", "57P02", "57P03"})


def _connection_error_type(exc: psycopg.OperationalError) -> type[IdempotencyPersistenceLayerError]:
    """What a failed connection says of the store: a refused role or password, a database that
    does not exist, or no answer at all.

    libpq reports a failed connection without its SQLSTATE, so the server's message is read;
    a server set to another language for ``lc_messages`` is then told apart less finely, as
    unreachable, its own message still in the error.
    """
    sqlstate = exc.sqlstate or ""
    message = str(exc)
    if sqlstate.startswith("28") or any(sign in message for sign in _REFUSED_LOGIN):
        return StoreNotAuthorisedError
    if sqlstate == "3D000" or ('FATAL:  database "' in message and "does not exist" in message):
        return StoreNotFoundError
    return StoreUnreachableError


_REFUSED_LOGIN = (
    "password authentication failed",
    'FATAL:  role "',
    "no pg_hba.conf entry",
    "authentication failed",
)


def _describe(params: Mapping[str, Any]) -> str:
    """Where the connection goes, for messages: host, port and database, never the password."""
    host = params.get("host") or params.get("hostaddr") or os.environ.get("PGHOST") or "localhost"
    port = params.get("port") or os.environ.get("PGPORT") or "5432"
    dbname = (
        params.get("dbname")
        or os.environ.get("PGDATABASE")
        or params.get("user")
        or os.environ.get("PGUSER")
        or "(default)"
    )
    return f"database {dbname!r} at {host}:{port}"


def _reset_locks_at_fork(layer: PostgresPersistenceLayer) -> None:
    """Give the child of ``os.fork()`` a fresh pool lock: another thread of the parent may have
    held it at the fork. Only a weak reference is registered, so the layer can be collected.
    """
    if not hasattr(os, "register_at_fork"):
        return
    ref = weakref.ref(layer)

    def after_in_child() -> None:
        target = ref()
        if target is not None:
            target._pool_lock = threading.Lock()
            target._purge_thread = None
            target._next_purge = 0.0

    os.register_at_fork(after_in_child=after_in_child)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
