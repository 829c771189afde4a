"""PostgresPersistenceLayer beyond the contract suite: the one-statement claim under real
concurrency (threads and processes), the purge, check(), fencing done by the database, and store
faults surfacing as IdempotencyPersistenceLayerError, against the session's PostgreSQL server.
"""

from __future__ import annotations

import multiprocessing
import queue
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from multiprocessing.synchronize import Barrier
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import ConnectionPool

from idem_middleware import IdempotencyConfig
from idem_middleware.exceptions import (
    IdempotencyItemAlreadyExistsError,
    IdempotencyItemNotFoundError,
    IdempotencyLeaseLostError,
    IdempotencyPersistenceLayerError,
    StoreNotAuthorisedError,
    StoreNotFoundError,
    StoreUnreachableError,
)
from idem_middleware.persistence import PostgresPersistenceLayer
from idem_middleware.persistence.record import STATUS_COMPLETED, STATUS_INPROGRESS, DataRecord
from idem_middleware.responses import StoredResponse
from tests.support.backends import FakeClock

pytestmark = pytest.mark.postgres

CONFIG = IdempotencyConfig(expires_after_seconds=3600, in_progress_expires_after_seconds=60)
HASH = "a" * 64
RESPONSE = StoredResponse(201, (("Content-Type", "application/json"),), b'{"id":1}')

MakeLayer = Callable[..., PostgresPersistenceLayer]


@pytest.fixture
def table() -> str:
    return f"idem_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def make_layer(postgres_conninfo: str, table: str) -> Iterator[MakeLayer]:
    """Build configured layers on the session database (a fresh table per test); closes them."""
    layers: list[PostgresPersistenceLayer] = []

    def make(
        *, create: bool = True, clock: FakeClock | None = None, **options: Any
    ) -> PostgresPersistenceLayer:
        options.setdefault("table_name", table)
        if "pool" not in options:
            options.setdefault("conninfo", postgres_conninfo)
        layer = PostgresPersistenceLayer(**options)
        layers.append(layer)
        layer.configure(CONFIG)
        if clock is not None:
            layer.clock = clock
        if create:
            layer.create_table()
        return layer

    yield make
    for layer in layers:
        layer.close()


@pytest.fixture
def admin(postgres_conninfo: str) -> Iterator[psycopg.Connection[Any]]:
    """A connection of the test's own, to look at and tamper with the table behind the layer."""
    with psycopg.connect(postgres_conninfo, autocommit=True) as connection:
        yield connection


def count_rows(admin: psycopg.Connection[Any], table: str) -> int:
    row = admin.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))).fetchone()
    assert row is not None
    return int(row[0])


# The one-statement claim ----------------------------------------------------------------------


class CountingPool:
    """A caller-supplied pool that counts the statements the layer sends through it from the
    test's thread (the background purge has its own).
    """

    def __init__(self, pool: ConnectionPool[Any]) -> None:
        self.pool = pool
        self.thread = threading.get_ident()
        self.statements = 0

    @contextmanager
    def _lend(self) -> Iterator[Any]:
        with self.pool.connection() as connection:
            yield _CountingConnection(connection, self)

    def connection(self) -> AbstractContextManager[Any]:
        return self._lend()


class _CountingConnection:
    def __init__(self, connection: psycopg.Connection[Any], owner: CountingPool) -> None:
        self._connection = connection
        self._owner = owner

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() == self._owner.thread:
            self._owner.statements += 1
        return self._connection.execute(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._connection, name)


def test_a_claim_and_a_collision_are_one_statement_each(
    make_layer: MakeLayer, postgres_conninfo: str
) -> None:
    with ConnectionPool(
        postgres_conninfo, min_size=1, max_size=2, kwargs={"autocommit": True}, open=True
    ) as pool:
        counting = CountingPool(pool)
        layer = make_layer(pool=counting)
        key = layer.build_idempotency_key("header:one-statement")

        counting.statements = 0
        lease = layer.save_inprogress(key, HASH)
        assert counting.statements == 1

        counting.statements = 0
        with pytest.raises(IdempotencyItemAlreadyExistsError) as info:
            layer.save_inprogress(key, "b" * 64)
        assert counting.statements == 1, "the collision carries the record, with no second read"
        existing = info.value.old_data_record
        assert existing is not None
        assert existing.payload_hash == HASH
        assert existing.in_progress_expiry_timestamp == lease.in_progress_expiry_timestamp

        counting.statements = 0
        layer.save_success(lease, RESPONSE)
        assert counting.statements == 1
        layer.close()
        assert not pool.closed, "a caller-supplied pool is the caller's to close"


def test_a_supplied_pool_without_autocommit_commits_every_operation(
    make_layer: MakeLayer, postgres_conninfo: str, admin: psycopg.Connection[Any], table: str
) -> None:
    with ConnectionPool(postgres_conninfo, min_size=1, max_size=2, open=True) as pool:
        layer = make_layer(pool=pool)
        key = layer.build_idempotency_key("header:transactional")
        lease = layer.save_inprogress(key, HASH)
        status = sql.SQL("SELECT status FROM {} WHERE id = %s").format(sql.Identifier(table))
        assert admin.execute(status, (key,)).fetchone() == (STATUS_INPROGRESS,)

        layer.save_success(lease, RESPONSE)

        assert admin.execute(status, (key,)).fetchone() == (STATUS_COMPLETED,)
        with pytest.raises(IdempotencyItemAlreadyExistsError):
            layer.save_inprogress(key, HASH)
        layer.check()


def _race(layer: PostgresPersistenceLayer, key: str, threads: int) -> tuple[list[str], list[Any]]:
    barrier = threading.Barrier(threads)
    winners: list[str] = []
    seen: list[Any] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def claim(index: int) -> None:
        payload_hash = f"{index:064x}"
        barrier.wait()
        try:
            layer.save_inprogress(key, payload_hash)
        except IdempotencyItemAlreadyExistsError as exc:
            with lock:
                seen.append(exc.old_data_record)
        except BaseException as exc:
            with lock:
                errors.append(exc)
        else:
            with lock:
                winners.append(payload_hash)

    workers = [threading.Thread(target=claim, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert not errors, errors
    return winners, seen


def test_fifty_threads_on_fifty_connections_claiming_one_key_make_one_lease(
    make_layer: MakeLayer, admin: psycopg.Connection[Any], table: str
) -> None:
    """Fifty connections really send their claims at once, round after round: rows committed
    after a losing statement's snapshot are the case the claim must rerun for.
    """
    layer = make_layer(min_pool_size=50, max_pool_size=50, pool_timeout_seconds=30)
    for round_ in range(5):
        key = layer.build_idempotency_key(f"header:race-{round_}")

        winners, seen = _race(layer, key, 50)

        assert len(winners) == 1
        assert len(seen) == 49
        assert {record.payload_hash for record in seen} == set(winners)
        assert layer.get_record(key).payload_hash == winners[0]
    assert count_rows(admin, table) == 5


# Fencing is the database's: no read-then-write ----------------------------------------------


def test_completion_is_refused_when_another_process_took_the_lease_over(
    make_layer: MakeLayer, admin: psycopg.Connection[Any], table: str
) -> None:
    layer = make_layer()
    key = layer.build_idempotency_key("header:fenced")
    lease = layer.save_inprogress(key, HASH)
    assert lease.in_progress_expiry_timestamp is not None
    newer = lease.in_progress_expiry_timestamp + 1
    admin.execute(
        sql.SQL("UPDATE {} SET in_progress_expiration = %s WHERE id = %s").format(
            sql.Identifier(table)
        ),
        (newer, key),
    )

    with pytest.raises(IdempotencyLeaseLostError):
        layer.save_success(lease, RESPONSE)
    with pytest.raises(IdempotencyLeaseLostError):
        layer.delete_record(lease)

    stored = layer.get_record(key)
    assert stored.status == STATUS_INPROGRESS
    assert stored.in_progress_expiry_timestamp == newer
    assert stored.response_data is None


# Purge ---------------------------------------------------------------------------------------


def test_purge_deletes_expired_records_in_batches_and_keeps_live_ones(
    make_layer: MakeLayer, admin: psycopg.Connection[Any], table: str
) -> None:
    clock = FakeClock()
    layer = make_layer(clock=clock, purge_batch_size=2, purge_interval_seconds=10**9)
    for index in range(5):
        layer.save_inprogress(layer.build_idempotency_key(f"header:old-{index}"), HASH)
    clock.advance(1800)
    live = layer.build_idempotency_key("header:live")
    layer.save_success(layer.save_inprogress(live, HASH), RESPONSE)
    clock.advance(1801)  # the first five have expired, the live one has not

    assert layer.purge_expired() == 5

    assert count_rows(admin, table) == 1
    assert layer.get_record(live).status == STATUS_COMPLETED
    assert layer.purge_expired() == 0


def _wait_for_rows(admin: psycopg.Connection[Any], table: str, expected: int) -> int:
    """The table's row count once it is ``expected`` (a background purge ran), or after 10 s."""
    deadline = time.monotonic() + 10
    while True:
        count = count_rows(admin, table)
        if count == expected or time.monotonic() > deadline:
            return count
        time.sleep(0.02)


def test_claims_start_a_background_purge_at_most_every_interval(
    make_layer: MakeLayer, admin: psycopg.Connection[Any], table: str
) -> None:
    clock = FakeClock()
    start = clock.now
    layer = make_layer(clock=clock, purge_interval_seconds=7200)
    layer.save_inprogress(layer.build_idempotency_key("header:a"), HASH)  # purges (nothing)

    clock.now = start + 3601  # a has expired, the next purge is due at start + 7200
    layer.save_inprogress(layer.build_idempotency_key("header:b"), HASH)
    time.sleep(0.3)
    assert count_rows(admin, table) == 2, "no purge before the interval is over"

    clock.now = start + 7201  # due: a goes, b (expiring at start + 7201) stays
    layer.save_inprogress(layer.build_idempotency_key("header:c"), HASH)
    assert _wait_for_rows(admin, table, 2) == 2
    with pytest.raises(IdempotencyItemNotFoundError):
        layer.get_record(layer.build_idempotency_key("header:a"))
    assert layer.get_record(layer.build_idempotency_key("header:b")).status == STATUS_INPROGRESS


def test_purge_skips_a_row_a_claim_holds_instead_of_waiting(
    make_layer: MakeLayer, postgres_conninfo: str, table: str
) -> None:
    clock = FakeClock()
    layer = make_layer(clock=clock, purge_interval_seconds=10**9)
    held = layer.build_idempotency_key("header:held")
    layer.save_inprogress(held, HASH)
    layer.save_inprogress(layer.build_idempotency_key("header:free"), HASH)
    clock.advance(3601)

    with row_locked(postgres_conninfo, table, held):
        started = time.monotonic()
        assert layer.purge_expired() == 1
        assert time.monotonic() - started < 2
    assert layer.purge_expired() == 1


# Faults --------------------------------------------------------------------------------------


@contextmanager
def row_locked(conninfo: str, table: str, key: str) -> Iterator[None]:
    """Another session holds the record's row lock (a claim or purge in the middle of it)."""
    with psycopg.connect(conninfo) as other, other.transaction():
        other.execute(
            sql.SQL("SELECT 1 FROM {} WHERE id = %s FOR UPDATE").format(sql.Identifier(table)),
            (key,),
        )
        yield


def test_a_collision_with_a_live_record_reads_it_without_waiting_for_its_row_lock(
    make_layer: MakeLayer, postgres_conninfo: str, table: str
) -> None:
    """Replays and conflicts take no row lock: they neither queue behind a writer nor make a
    transaction whose commit must be flushed.
    """
    layer = make_layer(statement_timeout_seconds=1)
    key = layer.build_idempotency_key("header:live")
    lease = layer.save_inprogress(key, HASH)

    with row_locked(postgres_conninfo, table, key):
        started = time.monotonic()
        with pytest.raises(IdempotencyItemAlreadyExistsError) as info:
            layer.save_inprogress(key, HASH)
        assert time.monotonic() - started < 0.5
    assert info.value.old_data_record is not None
    assert info.value.old_data_record.in_progress_expiry_timestamp == (
        lease.in_progress_expiry_timestamp
    )


def test_a_takeover_blocked_past_the_statement_timeout_is_a_store_error(
    make_layer: MakeLayer, postgres_conninfo: str, table: str
) -> None:
    clock = FakeClock()
    layer = make_layer(clock=clock, statement_timeout_seconds=0.2)
    key = layer.build_idempotency_key("header:locked")
    layer.save_inprogress(key, HASH)
    clock.advance(61)  # the lease has run out: the next claim must lock the row to take it over

    with row_locked(postgres_conninfo, table, key):
        started = time.monotonic()
        with pytest.raises(IdempotencyPersistenceLayerError, match="statement timeout"):
            layer.save_inprogress(key, HASH)
        assert time.monotonic() - started < 3


def test_a_record_with_an_unknown_status_is_a_store_error(
    make_layer: MakeLayer, admin: psycopg.Connection[Any], table: str
) -> None:
    layer = make_layer()
    key = layer.build_idempotency_key("header:odd")
    admin.execute(
        sql.SQL("INSERT INTO {} (id, status, expiration) VALUES (%s, 'PAUSED', %s)").format(
            sql.Identifier(table)
        ),
        (key, int(time.time()) + 3600),
    )

    with pytest.raises(IdempotencyPersistenceLayerError, match="PAUSED"):
        layer.get_record(key)
    with pytest.raises(IdempotencyPersistenceLayerError, match="PAUSED"):
        layer.save_inprogress(key, HASH)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"port": "closed"}, StoreUnreachableError),
        ({"user": "no_such_role"}, StoreNotAuthorisedError),
        ({"dbname": "no_such_database"}, StoreNotFoundError),
    ],
)
def test_check_names_why_it_cannot_connect(
    make_layer: MakeLayer,
    postgres_conninfo: str,
    change: dict[str, str],
    expected: type[IdempotencyPersistenceLayerError],
    closed_port: int,
) -> None:
    params = conninfo_to_dict(postgres_conninfo)
    params.update({k: str(closed_port) if v == "closed" else v for k, v in change.items()})
    layer = make_layer(conninfo=make_conninfo(**params), create=False)

    with pytest.raises(expected):
        layer.check()


def test_a_closed_port_is_a_store_error_naming_host_and_database_not_password(
    make_layer: MakeLayer, closed_port: int
) -> None:
    port = closed_port
    layer = make_layer(
        conninfo=f"host=127.0.0.1 port={port} user=postgres password=hunter2 dbname=shop",
        create=False,
        pool_timeout_seconds=0.3,
    )

    started = time.monotonic()
    with pytest.raises(IdempotencyPersistenceLayerError) as info:
        layer.check()
    assert time.monotonic() - started < 2, "check() does not wait out the pool timeout"
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message
    assert "'shop'" in message
    assert "refused" in message.lower()
    assert "hunter2" not in message

    with pytest.raises(IdempotencyPersistenceLayerError) as claim:
        layer.save_inprogress(layer.build_idempotency_key("header:x"), HASH)
    assert "hunter2" not in str(claim.value)
    with pytest.raises(IdempotencyPersistenceLayerError):
        layer.get_record(layer.build_idempotency_key("header:x"))


def test_check_on_a_missing_table_says_to_run_create_table(
    make_layer: MakeLayer, postgres_conninfo: str, table: str
) -> None:
    layer = make_layer(create=False)

    with pytest.raises(IdempotencyPersistenceLayerError) as info:
        layer.check()
    message = str(info.value)
    assert table in message
    assert "create_table()" in message
    dbname = psycopg.conninfo.conninfo_to_dict(postgres_conninfo)["dbname"]
    assert f"'{dbname}'" in message
    with pytest.raises(IdempotencyPersistenceLayerError, match=r"create_table\(\)"):
        layer.save_inprogress(layer.build_idempotency_key("header:x"), HASH)

    layer.create_table()
    layer.check()


def test_check_on_a_table_of_another_shape_names_the_expected_columns(
    make_layer: MakeLayer, admin: psycopg.Connection[Any], table: str
) -> None:
    admin.execute(sql.SQL("CREATE TABLE {} (id TEXT PRIMARY KEY)").format(sql.Identifier(table)))
    layer = make_layer(create=False)

    with pytest.raises(IdempotencyPersistenceLayerError, match="in_progress_expiration"):
        layer.check()


def test_check_without_write_privileges_says_what_to_grant(
    make_layer: MakeLayer, admin: psycopg.Connection[Any], postgres_conninfo: str, table: str
) -> None:
    make_layer()  # creates the table as the session's role
    role = f"reader_{uuid.uuid4().hex[:8]}"
    admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        admin.execute(
            sql.SQL("GRANT SELECT ON {} TO {}").format(sql.Identifier(table), sql.Identifier(role))
        )
        reader = make_layer(conninfo=f"{postgres_conninfo} user={role}", create=False)

        with pytest.raises(IdempotencyPersistenceLayerError, match="GRANT SELECT, INSERT"):
            reader.check()
        reader.close()
    finally:
        admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


# Schema --------------------------------------------------------------------------------------


def test_create_table_is_idempotent_and_safe_to_race(
    make_layer: MakeLayer, admin: psycopg.Connection[Any], table: str
) -> None:
    layers = [make_layer(create=False) for _ in range(4)]
    barrier = threading.Barrier(len(layers))
    errors: list[BaseException] = []

    def create(layer: PostgresPersistenceLayer) -> None:
        barrier.wait()
        try:
            layer.create_table()
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=create, args=(layer,)) for layer in layers]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=30)
    assert errors == []
    layers[0].create_table()

    indexes = admin.execute(
        "SELECT indexdef FROM pg_indexes WHERE tablename = %s", (table,)
    ).fetchall()
    assert any("(expiration)" in row[0] for row in indexes), indexes
    layers[0].check()


def test_schema_qualified_table(make_layer: MakeLayer, admin: psycopg.Connection[Any]) -> None:
    schema = f"s_{uuid.uuid4().hex[:8]}"
    admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    layer = make_layer(schema=schema)
    layer.check()
    key = layer.build_idempotency_key("header:schema")
    layer.save_success(layer.save_inprogress(key, HASH), RESPONSE)

    assert layer.get_record(key).response == RESPONSE
    assert layer.qualified_name.startswith(f"{schema}.")


# Configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        pytest.param({}, "conninfo or pool", id="neither"),
        pytest.param({"conninfo": "dbname=x", "pool": object()}, "conninfo or pool", id="both"),
        pytest.param({"conninfo": "dbname=x", "table_name": "a;drop"}, "table_name", id="table"),
        pytest.param({"conninfo": "dbname=x", "schema": "a b"}, "schema", id="schema"),
        pytest.param({"conninfo": "dbname=x", "max_pool_size": 0}, "max_pool_size", id="pool"),
        pytest.param(
            {"conninfo": "dbname=x", "purge_batch_size": 0}, "purge_batch_size", id="batch"
        ),
        pytest.param(
            {"conninfo": "dbname=x", "statement_timeout_seconds": 0},
            "statement_timeout_seconds",
            id="statement-timeout",
        ),
    ],
)
def test_bad_configuration_is_a_value_error_naming_the_field(
    arguments: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        PostgresPersistenceLayer(**arguments)


def test_an_unparsable_conninfo_is_a_value_error_that_does_not_echo_it() -> None:
    with pytest.raises(ValueError, match="conninfo") as info:
        PostgresPersistenceLayer("host=db password=hunter2 nonsense")
    assert "hunter2" not in str(info.value)
    assert info.value.__cause__ is None


def test_a_pool_without_connection_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="pool"):
        PostgresPersistenceLayer(pool=object())  # type: ignore[arg-type]


# Processes -----------------------------------------------------------------------------------

PROCESSES = 4
KEYS = [f"order-{i}" for i in range(8)]
Outcome = tuple[str, int, str, str | None]  # key, worker, "won"/"lost"/"error", seen hash


def claim_worker(
    conninfo: str,
    table: str,
    worker: int,
    barrier: Barrier,
    results: multiprocessing.Queue[Outcome],
) -> None:
    """Runs in a spawned process: a layer of its own, then one claim per key, all workers
    released together by the barrier before each claim.
    """
    layer = PostgresPersistenceLayer(conninfo, table_name=table)
    layer.configure(CONFIG)
    for name in KEYS:
        key = layer.build_idempotency_key(name)
        barrier.wait(timeout=60)
        try:
            layer.save_inprogress(key, f"worker-{worker}")
        except IdempotencyItemAlreadyExistsError as exc:
            record = exc.old_data_record
            results.put((name, worker, "lost", None if record is None else record.payload_hash))
        except Exception as exc:
            results.put((name, worker, "error", repr(exc)))
        else:
            results.put((name, worker, "won", f"worker-{worker}"))
    layer.close()


def test_spawned_processes_claiming_the_same_keys_make_one_winner_each(
    make_layer: MakeLayer, postgres_conninfo: str, table: str
) -> None:
    reader = make_layer()
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(PROCESSES)
    results: multiprocessing.Queue[Outcome] = context.Queue()
    workers = [
        context.Process(
            target=claim_worker, args=(postgres_conninfo, table, worker, barrier, results)
        )
        for worker in range(PROCESSES)
    ]
    for process in workers:
        process.start()
    outcomes: list[Outcome] = []
    try:
        for _ in range(PROCESSES * len(KEYS)):
            outcomes.append(results.get(timeout=60))
    except queue.Empty:
        pass
    for process in workers:
        process.join(timeout=30)
        if process.is_alive():
            process.kill()

    assert [process.exitcode for process in workers] == [0] * PROCESSES
    assert [o for o in outcomes if o[2] == "error"] == []
    assert len(outcomes) == PROCESSES * len(KEYS)
    by_key: dict[str, list[Outcome]] = defaultdict(list)
    for outcome in outcomes:
        by_key[outcome[0]].append(outcome)
    for name, claims in by_key.items():
        winners = [claim for claim in claims if claim[2] == "won"]
        assert len(winners) == 1, f"{name}: {claims}"
        assert {claim[3] for claim in claims if claim[2] == "lost"} == {winners[0][3]}
        assert reader.get_record(reader.build_idempotency_key(name)).payload_hash == (winners[0][3])


def _use_after_fork(layer: PostgresPersistenceLayer, results: multiprocessing.Queue[str]) -> None:
    try:
        lease = layer.save_inprogress(layer.build_idempotency_key("header:child"), HASH)
        layer.save_success(lease, RESPONSE)
        results.put("ok")
    except BaseException as exc:
        results.put(repr(exc))


def test_a_layer_used_before_fork_works_in_the_child_and_still_in_the_parent(
    make_layer: MakeLayer,
) -> None:
    layer = make_layer()
    parent_key = layer.build_idempotency_key("header:parent")
    layer.save_inprogress(parent_key, HASH)  # the parent's pool is open
    context = multiprocessing.get_context("fork")
    results: multiprocessing.Queue[str] = context.Queue()
    child = context.Process(target=_use_after_fork, args=(layer, results))
    child.start()
    outcome = results.get(timeout=30)
    child.join(timeout=30)

    assert outcome == "ok"
    assert child.exitcode == 0
    assert layer.get_record(layer.build_idempotency_key("header:child")).response == RESPONSE
    assert layer.get_record(parent_key).status == STATUS_INPROGRESS


def test_every_operation_on_a_missing_table_is_a_store_error_naming_the_fix(
    make_layer: MakeLayer,
) -> None:
    layer = make_layer(create=False)
    key = layer.build_idempotency_key("header:x")
    lease = DataRecord(key, STATUS_INPROGRESS, 2_000_000_000, 2_000_000_000_000, None, HASH)

    operations: list[Callable[[], object]] = [
        lambda: layer.save_inprogress(key, HASH),
        lambda: layer.get_record(key),
        lambda: layer.save_success(lease, RESPONSE),
        lambda: layer.delete_record(lease),
        lambda: layer.remove_record(key),
        layer.purge_expired,
    ]
    for operation in operations:
        with pytest.raises(IdempotencyPersistenceLayerError, match=r"create_table\(\)"):
            operation()


# Over HTTP -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
def test_a_retry_over_http_replays_the_stored_response_once_executed(
    make_layer: MakeLayer, kind: str
) -> None:
    from tests.support.harness import Harness

    schema_owner = make_layer()  # creates the table; the middleware configures its own layer
    layer = PostgresPersistenceLayer(schema_owner.conninfo, table_name=schema_owner.table_name)
    harness = Harness(kind, layer, IdempotencyConfig())
    try:
        headers = [("Idempotency-Key", f"order-{kind}")]
        first = harness.request("POST", "/orders", headers=headers, json_body={"sku": "x"})
        retry = harness.request("POST", "/orders", headers=headers, json_body={"sku": "x"})
        reused = harness.request("POST", "/orders", headers=headers, json_body={"sku": "y"})
    finally:
        layer.close()

    assert first.status == 201
    assert not first.replayed
    assert retry.status == 201
    assert retry.replayed
    assert retry.body == first.body
    assert harness.calls["orders"] == 1
    assert reused.status == 422


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
def test_an_unreachable_database_is_a_503_over_http_and_the_handler_does_not_run(
    kind: str, closed_port: int
) -> None:
    from tests.support.harness import Harness

    layer = PostgresPersistenceLayer(
        f"host=127.0.0.1 port={closed_port} user=postgres dbname=shop", pool_timeout_seconds=0.3
    )
    harness = Harness(kind, layer, IdempotencyConfig())
    try:
        reply = harness.request(
            "POST", "/orders", headers=[("Idempotency-Key", "k")], json_body={"sku": "x"}
        )
    finally:
        layer.close()

    assert reply.status == 503
    assert reply.json()["code"] == "idempotency_store_unavailable"
    assert reply.header("retry-after") is not None
    assert harness.calls["orders"] == 0
