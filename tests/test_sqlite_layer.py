"""SQLitePersistenceLayer against real SQLite files: claim, collision, fencing, expiry, purge,
store errors and concurrency between threads (processes: test_sqlite_multiprocess.py).
"""

from __future__ import annotations

import gc
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from idem_middleware import IdempotencyConfig
from idem_middleware.exceptions import (
    IdempotencyItemAlreadyExistsError,
    IdempotencyPersistenceLayerError,
)
from idem_middleware.persistence import SQLitePersistenceLayer
from idem_middleware.persistence.record import STATUS_INPROGRESS, DataRecord
from idem_middleware.responses import StoredResponse
from tests.support.backends import FakeClock

START = 1_700_000_000.25
CONFIG = IdempotencyConfig(expires_after_seconds=3600, in_progress_expires_after_seconds=30)
BINARY_BODY = bytes(range(256)) + b"\x00\xff\xfe" + "é☃".encode()
RESPONSE = StoredResponse(
    status=201,
    headers=(("Content-Type", "application/octet-stream"), ("X-Trace", "caf\xe9")),
    body=BINARY_BODY,
)


def make_layer(path: Path, clock: FakeClock, **options: Any) -> SQLitePersistenceLayer:
    layer = SQLitePersistenceLayer(path, **options)
    layer.configure(CONFIG)
    layer.clock = clock
    return layer


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "idempotency.sqlite3"


@pytest.fixture
def layer(db_path: Path, clock: FakeClock) -> Iterator[SQLitePersistenceLayer]:
    layer = make_layer(db_path, clock)
    yield layer
    layer.close()


def raw_rows(path: Path, table: str = "idempotency_records") -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as connection:
        return connection.execute(
            f"SELECT id, status, expiration, in_progress_expiration, data, validation "
            f"FROM {table} ORDER BY id"
        ).fetchall()


# Claim and collision --------------------------------------------------------------------------


def test_claim_stores_an_inprogress_record(
    layer: SQLitePersistenceLayer, db_path: Path, clock: FakeClock
) -> None:
    key = layer.build_idempotency_key("order-1")
    lease = layer.save_inprogress(key, "hash-a")

    assert lease.status == STATUS_INPROGRESS
    assert lease.expiry_timestamp == int(START) + 3600
    assert lease.in_progress_expiry_timestamp == int((START + 30) * 1000)
    assert raw_rows(db_path) == [
        (key, STATUS_INPROGRESS, int(START) + 3600, int((START + 30) * 1000), None, "hash-a")
    ]
    stored = layer.get_record(key)
    assert (stored.status, stored.payload_hash) == (STATUS_INPROGRESS, "hash-a")
    assert stored.in_progress_expiry_timestamp == lease.in_progress_expiry_timestamp


def test_collision_returns_the_existing_record_from_the_claim_itself(
    layer: SQLitePersistenceLayer, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = layer.build_idempotency_key("order-1")
    first = layer.save_inprogress(key, "hash-a")

    def no_second_read(idempotency_key: str) -> DataRecord:
        raise AssertionError("the collision must not need a separate read")

    monkeypatch.setattr(layer, "_get_record", no_second_read)
    with pytest.raises(IdempotencyItemAlreadyExistsError) as caught:
        layer.save_inprogress(key, "hash-b")

    existing = caught.value.old_data_record
    assert existing is not None
    assert existing.idempotency_key == key
    assert existing.status == STATUS_INPROGRESS
    assert existing.payload_hash == "hash-a"
    assert existing.in_progress_expiry_timestamp == first.in_progress_expiry_timestamp


# Completion ------------------------------------------------------------------------------------


# Expiry and lease takeover ---------------------------------------------------------------------


# Purge -----------------------------------------------------------------------------------------


def test_purge_expired_deletes_only_expired_rows_in_batches(
    db_path: Path, clock: FakeClock
) -> None:
    # No purge of the writer's own in between (it would take some of the rows first).
    layer = make_layer(db_path, clock, purge_batch_size=3, purge_interval_seconds=10**6)
    try:
        old_keys = [layer.build_idempotency_key(f"old-{i}") for i in range(10)]
        for key in old_keys:
            layer.save_inprogress(key, "old")
        clock.advance(1800)
        fresh_key = layer.build_idempotency_key("fresh")
        layer.save_inprogress(fresh_key, "fresh")
        clock.advance(1801)  # old records past expiry, the fresh one still live

        assert layer.purge_expired() == 10
        assert [row[0] for row in raw_rows(db_path)] == [fresh_key]
        assert layer.purge_expired() == 0
    finally:
        layer.close()


def test_the_writer_purges_expired_rows_every_interval(db_path: Path, clock: FakeClock) -> None:
    layer = make_layer(db_path, clock, purge_interval_seconds=600)
    try:
        for i in range(20):
            layer.save_inprogress(layer.build_idempotency_key(f"old-{i}"), "old")
        assert layer._writer.wait_idle(5)
        assert len(raw_rows(db_path)) == 20

        clock.advance(3601)  # all 20 have expired; the last purge ran at START
        layer.save_inprogress(layer.build_idempotency_key("new-1"), "new")
        assert layer._writer.wait_idle(5)  # the purge runs after the claim, when idle
        assert [row[5] for row in raw_rows(db_path)] == ["new"]

        clock.advance(3601)
        layer.save_inprogress(layer.build_idempotency_key("new-2"), "new-2")
        assert layer._writer.wait_idle(5)
        clock.advance(60)  # before the next interval: no purge yet
        layer.save_inprogress(layer.build_idempotency_key("new-3"), "new-3")
        assert layer._writer.wait_idle(5)
        assert sorted(row[5] for row in raw_rows(db_path)) == ["new-2", "new-3"]
    finally:
        layer.close()


# Schema and options ----------------------------------------------------------------------------


def test_schema_mirrors_dynamodb_attributes_and_uses_wal(
    layer: SQLitePersistenceLayer, db_path: Path
) -> None:
    layer.save_inprogress(layer.build_idempotency_key("x"), "h")
    with sqlite3.connect(db_path) as connection:
        columns = [row[1] for row in connection.execute("PRAGMA table_info(idempotency_records)")]
        mode = connection.execute("PRAGMA journal_mode").fetchone()[0]
    assert columns == [
        "id",
        "status",
        "expiration",
        "in_progress_expiration",
        "data",
        "validation",
        "lease_id",
    ]
    assert mode == "wal"


def test_tables_in_one_file_are_independent(db_path: Path, clock: FakeClock) -> None:
    first = make_layer(db_path, clock, table_name="orders_idem")
    second = make_layer(db_path, clock, table_name="payments_idem")
    try:
        key = first.build_idempotency_key("same-key")
        first.save_inprogress(key, "orders")
        second.save_inprogress(key, "payments")
        assert [row[5] for row in raw_rows(db_path, "orders_idem")] == ["orders"]
        assert [row[5] for row in raw_rows(db_path, "payments_idem")] == ["payments"]
    finally:
        first.close()
        second.close()


@pytest.mark.parametrize(
    ("args", "options"),
    [
        ((":memory:",), {}),
        (("",), {}),
        (("x.db",), {"table_name": "records; DROP TABLE users"}),
        (("x.db",), {"busy_timeout_seconds": -1}),
        (("x.db",), {"purge_batch_size": 0}),
        (("x.db",), {"synchronous": "SOMETIMES"}),
    ],
)
def test_invalid_options_are_rejected(args: tuple[str], options: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SQLitePersistenceLayer(*args, **options)  # type: ignore[arg-type]


def test_close_then_reuse_reopens(layer: SQLitePersistenceLayer) -> None:
    key = layer.build_idempotency_key("order-1")
    layer.save_inprogress(key, "hash-a")
    layer.close()
    assert layer.get_record(key).payload_hash == "hash-a"


# Store errors ----------------------------------------------------------------------------------


def test_missing_directory_is_a_persistence_error(tmp_path: Path, clock: FakeClock) -> None:
    layer = make_layer(tmp_path / "no-such-dir" / "idem.sqlite3", clock)
    key = layer.build_idempotency_key("order-1")
    lease = DataRecord(key, STATUS_INPROGRESS, int(START) + 10, int(START * 1000) + 10)

    for operation in (
        lambda: layer.save_inprogress(key, "hash-a"),
        lambda: layer.get_record(key),
        lambda: layer.save_success(lease, RESPONSE),
        lambda: layer.delete_record(lease),
        layer.purge_expired,
    ):
        with pytest.raises(IdempotencyPersistenceLayerError) as caught:
            operation()
        assert isinstance(caught.value.__cause__, sqlite3.OperationalError)


def test_write_lock_held_past_busy_timeout_is_a_persistence_error(
    db_path: Path, clock: FakeClock
) -> None:
    layer = make_layer(db_path, clock, busy_timeout_seconds=0.2)
    key = layer.build_idempotency_key("order-1")
    lease = layer.save_inprogress(key, "hash-a")

    blocker = sqlite3.connect(db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        with pytest.raises(IdempotencyPersistenceLayerError) as caught:
            layer.save_inprogress(layer.build_idempotency_key("order-2"), "hash-b")
        waited = time.monotonic() - started
        assert isinstance(caught.value.__cause__, sqlite3.OperationalError)
        assert "locked" in str(caught.value.__cause__)
        assert 0.15 <= waited < 3
        with pytest.raises(IdempotencyPersistenceLayerError):
            layer.save_success(lease, RESPONSE)
        # WAL: readers are not blocked by the writer.
        assert layer.get_record(key).status == STATUS_INPROGRESS
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()

    # The lock is gone: the same layer (and its connection) works again.
    layer.save_success(lease, RESPONSE)
    assert layer.get_record(key).response == RESPONSE
    layer.close()


def test_failed_purge_does_not_fail_the_claim(
    layer: SQLitePersistenceLayer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken_purge(connection: sqlite3.Connection, cutoff: int) -> int:
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(layer, "_purge_batch", broken_purge)
    lease = layer.save_inprogress(layer.build_idempotency_key("order-1"), "hash-a")
    assert lease.payload_hash == "hash-a"
    assert layer._writer.wait_idle(5)
    assert "purging expired idempotency records failed" in caplog.text
    # The writer lives on: the next writes land.
    layer.save_success(lease, RESPONSE)
    assert layer.get_record(lease.idempotency_key).response == RESPONSE


# Concurrency -----------------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_fork_never_hands_an_open_connection_to_the_child(
    layer: SQLitePersistenceLayer,
) -> None:
    parent_key = layer.build_idempotency_key("parent")
    layer.save_inprogress(parent_key, "parent")
    layer.get_record(parent_key)  # the parent now holds a reader connection
    parent_connection = layer._local.connection
    assert parent_connection is not None
    child_key = layer.build_idempotency_key("child")

    pid = os.fork()
    if pid == 0:  # child: report through the exit status only
        code = 1
        try:
            inherited = layer._local.connection
            layer.save_inprogress(child_key, "child")
            layer.get_record(child_key)
            fresh = layer._local.connection
            if inherited is not None:
                code = 2
            elif fresh is None or fresh is parent_connection or layer._local.pid != os.getpid():
                code = 3
            else:
                code = 0
        except BaseException:
            code = 4
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)

    assert os.waitstatus_to_exitcode(status) == 0
    # The parent closed its connection just before the fork and reopens on next use.
    with pytest.raises(sqlite3.ProgrammingError):
        parent_connection.execute("SELECT 1")
    assert layer.get_record(child_key).payload_hash == "child"
    assert layer.get_record(parent_key).payload_hash == "parent"
    assert layer._local.connection is not parent_connection


def test_connection_of_an_ended_thread_is_closed(layer: SQLitePersistenceLayer) -> None:
    key = layer.build_idempotency_key("order-1")
    layer.save_inprogress(key, "hash-a")
    opened: list[weakref.ref[sqlite3.Connection]] = []

    def read() -> None:
        layer.get_record(key)
        assert layer._local.connection is not None
        opened.append(weakref.ref(layer._local.connection))

    for _ in range(20):  # a server that starts one thread per request
        thread = threading.Thread(target=read)
        thread.start()
        thread.join()
    gc.collect()

    assert len(opened) == 20
    assert [ref() for ref in opened] == [None] * 20  # released, hence closed
    assert len(layer._connections) == 1  # the main thread's


def test_close_closes_the_connections_of_every_thread(layer: SQLitePersistenceLayer) -> None:
    key = layer.build_idempotency_key("order-1")
    layer.save_inprogress(key, "hash-a")
    layer.get_record(key)
    ready, done = threading.Event(), threading.Event()
    seen: list[sqlite3.Connection] = []

    def worker() -> None:
        layer.get_record(key)
        assert layer._local.connection is not None
        seen.append(layer._local.connection)
        ready.set()
        done.wait(10)

    thread = threading.Thread(target=worker)
    thread.start()
    ready.wait(10)
    main_connection = layer._local.connection
    assert main_connection is not None
    layer.close()
    try:
        for connection in (main_connection, seen[0]):
            with pytest.raises(sqlite3.ProgrammingError):
                connection.execute("SELECT 1")
    finally:
        done.set()
        thread.join()
    assert layer.get_record(key).payload_hash == "hash-a"


def test_switch_to_wal_waits_for_a_writer_of_a_rollback_journal_file(
    db_path: Path, clock: FakeClock
) -> None:
    # A file created by something else in the default (rollback journal) mode, with a writer in
    # the middle of a transaction. SQLite fails the switch to WAL at once in this case (its busy
    # handler is skipped to avoid a deadlock); the layer must wait for the writer instead.
    with sqlite3.connect(db_path) as setup:
        setup.execute("CREATE TABLE other (x INTEGER)")
    writer = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO other VALUES (1)")
    release = threading.Timer(0.3, lambda: writer.execute("COMMIT"))
    release.start()
    layer = make_layer(db_path, clock, busy_timeout_seconds=5)
    try:
        started = time.monotonic()
        layer.save_inprogress(layer.build_idempotency_key("order-1"), "hash-a")
        assert time.monotonic() - started >= 0.25
    finally:
        release.join()
        writer.close()
        layer.close()
    with sqlite3.connect(db_path) as check:
        assert check.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_switch_to_wal_blocked_past_busy_timeout_is_a_persistence_error(
    db_path: Path, clock: FakeClock
) -> None:
    with sqlite3.connect(db_path) as setup:
        setup.execute("CREATE TABLE other (x INTEGER)")
    writer = sqlite3.connect(db_path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO other VALUES (1)")
    layer = make_layer(db_path, clock, busy_timeout_seconds=0.2)
    try:
        started = time.monotonic()
        with pytest.raises(IdempotencyPersistenceLayerError) as caught:
            layer.save_inprogress(layer.build_idempotency_key("order-1"), "hash-a")
        assert 0.15 <= time.monotonic() - started < 3
        assert isinstance(caught.value.__cause__, sqlite3.OperationalError)
    finally:
        writer.execute("COMMIT")
        writer.close()
    layer.save_inprogress(layer.build_idempotency_key("order-1"), "hash-a")  # lock gone
    layer.close()
