"""The SQLite layer's fast paths (issue 11): replays and conflicts answered by a read that takes
no write lock (and replays served before any store call), one writer connection per process
committing waiting writes together, the purge on a thread of its own instead of a request's, and
the writer's own failure handling.
"""

from __future__ import annotations

import gc
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from idem_middleware import IdempotencyConfig
from idem_middleware.exceptions import (
    IdempotencyItemAlreadyExistsError,
    IdempotencyItemNotFoundError,
    IdempotencyLeaseLostError,
    IdempotencyPersistenceLayerError,
)
from idem_middleware.persistence import SQLitePersistenceLayer
from idem_middleware.persistence.record import STATUS_COMPLETED, STATUS_INPROGRESS, DataRecord
from idem_middleware.responses import StoredResponse
from tests.support.backends import FakeClock

START = 1_700_000_000.25
CONFIG = IdempotencyConfig(expires_after_seconds=3600, in_progress_expires_after_seconds=30)
RESPONSE = StoredResponse(status=201, headers=(("Content-Type", "application/json"),), body=b"{}")


class Statements:
    """Every statement the layer's connections run, with the connection and the thread that
    ran it.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: list[tuple[int, int, str]] = []

    def recorder(self, connection: sqlite3.Connection) -> Callable[[str], None]:
        def record(sql: str) -> None:
            with self.lock:
                self.seen.append((id(connection), threading.get_ident(), sql))

        return record

    def connections_running(self, *prefixes: str) -> set[int]:
        with self.lock:
            return {c for c, _, sql in self.seen if sql.lstrip().startswith(prefixes)}

    def threads_running(self, *prefixes: str) -> set[int]:
        with self.lock:
            return {t for _, t, sql in self.seen if sql.lstrip().startswith(prefixes)}

    def count(self, prefix: str) -> int:
        with self.lock:
            return sum(1 for _, _, sql in self.seen if sql.lstrip().startswith(prefix))


def traced_layer(
    path: Path, clock: FakeClock, statements: Statements, **options: Any
) -> SQLitePersistenceLayer:
    layer = SQLitePersistenceLayer(path, **options)
    layer.configure(CONFIG)
    layer.clock = clock
    connect = layer._connect

    def traced_connect(*args: Any) -> Any:
        connection = connect(*args)
        connection.set_trace_callback(statements.recorder(connection))
        return connection

    layer._connect = traced_connect  # type: ignore[method-assign]
    return layer


def idle_writer(layer: SQLitePersistenceLayer) -> None:
    """Start the writer and let it finish its first purge, so what a test queues next is the
    writer's next batch.
    """
    layer.remove_record(layer.build_idempotency_key("warm-up"))
    assert layer._writer.wait_idle(5)


class HeldWriter:
    """A thread whose write holds the process's writer until released: what other threads
    write meanwhile queues behind it.
    """

    def __init__(self, layer: SQLitePersistenceLayer) -> None:
        self.started, self.release = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=layer._write, args=(self.hold,))
        self.thread.start()
        assert self.started.wait(5)

    def hold(self, connection: sqlite3.Connection) -> None:
        self.started.set()
        self.release.wait(10)

    def end(self) -> None:
        self.release.set()
        self.thread.join(10)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "idempotency.sqlite3"


@pytest.fixture
def layer(db_path: Path, clock: FakeClock) -> Iterator[SQLitePersistenceLayer]:
    layer = SQLitePersistenceLayer(db_path, busy_timeout_seconds=2)
    layer.configure(CONFIG)
    layer.clock = clock
    yield layer
    layer.close()


@pytest.fixture
def write_lock(db_path: Path) -> Iterator[sqlite3.Connection]:
    """Another process's view: a connection that can take the file's write lock."""
    connection = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    yield connection
    if connection.in_transaction:
        connection.execute("ROLLBACK")
    connection.close()


# Replays and conflicts read without the write lock ----------------------------------------------


def test_a_replay_is_answered_while_another_process_holds_the_write_lock(
    layer: SQLitePersistenceLayer, write_lock: sqlite3.Connection
) -> None:
    done_key = layer.build_idempotency_key("done")
    layer.save_success(layer.save_inprogress(done_key, "hash-a"), RESPONSE)
    running_key = layer.build_idempotency_key("running")
    layer.save_inprogress(running_key, "hash-b")

    write_lock.execute("BEGIN IMMEDIATE")
    started = time.monotonic()
    with pytest.raises(IdempotencyItemAlreadyExistsError) as replay:
        layer.save_inprogress(done_key, "hash-a")
    with pytest.raises(IdempotencyItemAlreadyExistsError) as conflict:
        layer.save_inprogress(running_key, "hash-b")
    # Before: both claims waited the 2 s busy timeout for the lock, then failed with a store
    # error instead of answering.
    assert time.monotonic() - started < 1
    assert replay.value.old_data_record is not None
    assert replay.value.old_data_record.status == STATUS_COMPLETED
    assert replay.value.old_data_record.response == RESPONSE
    assert conflict.value.old_data_record is not None
    assert conflict.value.old_data_record.status == STATUS_INPROGRESS


def test_a_dead_record_read_first_is_claimed_by_the_writer(
    layer: SQLitePersistenceLayer, clock: FakeClock
) -> None:
    key = layer.build_idempotency_key("order-1")
    layer.save_inprogress(key, "first")
    clock.advance(31)  # the first lease ran out: the read finds a dead record, not an answer
    lease = layer.save_inprogress(key, "second")
    assert layer.get_record(key).holds_same_lease(lease)
    assert layer.get_record(key).payload_hash == "second"


# One writer per process, group commit -----------------------------------------------------------


def test_writes_of_every_thread_run_on_one_connection(db_path: Path, clock: FakeClock) -> None:
    statements = Statements()
    layer = traced_layer(db_path, clock, statements)

    def work(n: int) -> None:
        for i in range(5):
            lease = layer.save_inprogress(layer.build_idempotency_key(f"{n}-{i}"), "h")
            if i % 2:
                layer.delete_record(lease)
            else:
                layer.save_success(lease, RESPONSE)

    try:
        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        # Before: each of the 8 threads wrote on its own connection, and they queued for the
        # file's lock in SQLite's busy handler.
        assert len(statements.connections_running("INSERT", "UPDATE", "DELETE", "BEGIN")) == 1
        assert layer._writer.wait_idle(5)
        assert layer._writer.writes == 8 * 5 * 2 + 1  # and the purge when the layer started
    finally:
        layer.close()


def until(condition: Callable[[], bool], timeout: float = 30) -> None:
    """Poll ``condition`` (a state other threads reach) until it holds; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def test_writes_waiting_together_are_committed_in_one_transaction(
    db_path: Path, clock: FakeClock, write_lock: sqlite3.Connection
) -> None:
    statements = Statements()
    layer = traced_layer(db_path, clock, statements, busy_timeout_seconds=10)
    try:
        idle_writer(layer)  # and its first purge done: no purge is due in this test
        begun = statements.count("BEGIN IMMEDIATE")
        write_lock.execute("BEGIN IMMEDIATE")  # every claim now waits
        leases: list[DataRecord] = []
        threads = [
            threading.Thread(
                target=lambda n=n: leases.append(
                    layer.save_inprogress(layer.build_idempotency_key(f"order-{n}"), "h")
                )
            )
            for n in range(16)
        ]
        for thread in threads:
            thread.start()
        # All 16 are waiting: the first in its transaction (with at most one more), the others
        # queued behind it; polled, as a loaded machine may start the threads late.
        until(lambda: len(layer._writer._queue) >= 14)
        write_lock.execute("COMMIT")
        for thread in threads:
            thread.join(10)
        assert len(leases) == 16
        # Before: one transaction per claim (16). Now the first claim's transaction waits for
        # the lock alone and the 15 others queue behind it, then commit together.
        assert statements.count("BEGIN IMMEDIATE") - begun <= 3
    finally:
        layer.close()


def test_a_failing_write_in_a_batch_fails_alone(layer: SQLitePersistenceLayer) -> None:
    idle_writer(layer)
    held = HeldWriter(layer)
    results: dict[str, Any] = {}

    def claim(name: str) -> None:
        results[name] = layer.save_inprogress(layer.build_idempotency_key(name), "h")

    def broken(connection: sqlite3.Connection) -> None:
        connection.execute("INSERT INTO no_such_table VALUES (1)")

    def write_broken() -> None:
        try:
            layer._write(broken)
        except sqlite3.Error as exc:
            results["broken"] = exc

    threads = [
        threading.Thread(target=claim, args=("a",)),
        threading.Thread(target=write_broken),
        threading.Thread(target=claim, args=("b",)),
    ]
    for queued, thread in enumerate(threads, start=1):
        thread.start()
        until(lambda n=queued: len(layer._writer._queue) == n)  # queued in this order
    commits_before = layer._writer.commits
    held.end()
    for thread in threads:
        thread.join(10)
    assert isinstance(results["broken"], sqlite3.OperationalError)
    assert "no such table" in str(results["broken"])
    for name in ("a", "b"):
        assert layer.get_record(layer.build_idempotency_key(name)).holds_same_lease(results[name])
    # The held write, then a and b each alone: their batch with the broken write was undone.
    assert layer._writer.commits - commits_before == 3


def test_a_write_that_never_got_its_turn_is_given_up_and_never_runs(
    db_path: Path, clock: FakeClock
) -> None:
    layer = SQLitePersistenceLayer(db_path, busy_timeout_seconds=0.1)
    layer.configure(CONFIG)
    layer.clock = clock
    try:
        idle_writer(layer)
        held = HeldWriter(layer)
        key = layer.build_idempotency_key("order-1")
        started = time.monotonic()
        with pytest.raises(IdempotencyPersistenceLayerError) as caught:
            layer.save_inprogress(key, "h")
        assert 1.0 <= time.monotonic() - started < 5  # twice the busy timeout, and a second
        assert "locked" in str(caught.value)
        held.end()
        assert layer._writer.wait_idle(5)
        # The caller was told the claim failed: it must not land behind its back.
        with pytest.raises(IdempotencyItemNotFoundError):
            layer.get_record(key)
        layer.save_inprogress(key, "h")  # the writer works on
    finally:
        layer.close()


# Purge ------------------------------------------------------------------------------------------


def test_the_purge_runs_on_the_writer_thread_not_on_a_request(
    db_path: Path, clock: FakeClock
) -> None:
    statements = Statements()
    layer = traced_layer(db_path, clock, statements, purge_interval_seconds=600)
    try:
        for i in range(20):
            layer.save_inprogress(layer.build_idempotency_key(f"old-{i}"), "old")
        clock.advance(3601)
        layer.save_inprogress(layer.build_idempotency_key("new"), "new")
        deadline = time.monotonic() + 5
        while statements.count("DELETE FROM idempotency_records WHERE rowid") == 0:
            assert time.monotonic() < deadline, "no purge ran"
            time.sleep(0.01)
        purgers = statements.threads_running("DELETE FROM idempotency_records WHERE rowid")
        # Before: the claim that found the purge due ran it before returning.
        assert threading.get_ident() not in purgers
        assert layer._writer.wait_idle(5)
        with sqlite3.connect(db_path) as check:
            assert check.execute("SELECT validation FROM idempotency_records").fetchall() == [
                ("new",)
            ]
    finally:
        layer.close()


# Lifecycle: close, garbage collection, fork -----------------------------------------------------


def test_close_stops_the_purge_thread_and_closes_the_writer_connection(
    layer: SQLitePersistenceLayer,
) -> None:
    lease = layer.save_inprogress(layer.build_idempotency_key("order-1"), "h")
    purger = layer._writer._purger
    connection = layer._writer.connection
    assert purger is not None
    assert purger.is_alive()
    assert connection is not None
    layer.close()
    assert not purger.is_alive()
    with pytest.raises(sqlite3.ProgrammingError):
        connection.execute("SELECT 1")
    layer.save_success(lease, RESPONSE)  # reopens, and starts a purge thread again
    assert layer._writer._purger is not None
    assert layer._writer._purger is not purger
    assert layer.get_record(lease.idempotency_key).status == STATUS_COMPLETED


def test_a_dropped_layer_ends_its_purge_thread(db_path: Path) -> None:
    layer = SQLitePersistenceLayer(db_path)
    layer.configure(CONFIG)
    layer.save_inprogress(layer.build_idempotency_key("order-1"), "h")
    purger = layer._writer._purger
    assert purger is not None
    ref = weakref.ref(layer)
    del layer
    # The purge thread holds the layer while a purge runs (the first one may be under way):
    # the layer goes once that purge ends.
    until(lambda: gc.collect() >= 0 and ref() is None)
    purger.join(5)
    assert not purger.is_alive()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_layer_writing_before_fork_writes_in_the_child(layer: SQLitePersistenceLayer) -> None:
    parent_lease = layer.save_inprogress(layer.build_idempotency_key("parent"), "parent")
    parent_purger = layer._writer._purger
    assert parent_purger is not None
    child_key = layer.build_idempotency_key("child")

    pid = os.fork()
    if pid == 0:  # child: report through the exit status only
        code = 1
        try:
            lease = layer.save_inprogress(child_key, "child")
            layer.save_success(lease, RESPONSE)
            purger = layer._writer._purger
            code = 0 if purger is not None and purger.is_alive() else 2
            layer.close()
        except BaseException:
            code = 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)

    assert os.waitstatus_to_exitcode(status) == 0
    assert not parent_purger.is_alive()  # stopped before the fork; restarted on next write
    layer.save_success(parent_lease, RESPONSE)
    assert layer.get_record(child_key).status == STATUS_COMPLETED
    assert layer.get_record(child_key).response == RESPONSE
    assert layer.get_record(parent_lease.idempotency_key).status == STATUS_COMPLETED


# Lease renewal goes through the writer and is fenced --------------------------------------------


def test_renewal_is_fenced_on_the_lease(layer: SQLitePersistenceLayer, clock: FakeClock) -> None:
    key = layer.build_idempotency_key("order-1")
    lease = layer.save_inprogress(key, "h")
    assert lease.in_progress_expiry_timestamp is not None
    renewed = DataRecord(
        idempotency_key=key,
        status=STATUS_INPROGRESS,
        expiry_timestamp=lease.expiry_timestamp,
        in_progress_expiry_timestamp=lease.in_progress_expiry_timestamp + 10_000,
        payload_hash=lease.payload_hash,
        lease_id=lease.lease_id,
    )
    layer._renew_record(lease, renewed)
    assert layer.get_record(key).holds_same_lease(renewed)
    with pytest.raises(IdempotencyLeaseLostError):
        layer._renew_record(lease, renewed)  # the old lease no longer holds the record
    layer.save_success(renewed, RESPONSE)
    assert layer.get_record(key).status == STATUS_COMPLETED


# Inline replays: the file is the local cache -----------------------------------------------------


def test_over_asgi_only_writes_borrow_a_worker_thread(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import anyio.to_thread

    from tests.support.harness import Harness

    layer = SQLitePersistenceLayer(db_path)
    harness = Harness("asgi", layer, IdempotencyConfig())
    thread_calls: list[str] = []
    run_sync = anyio.to_thread.run_sync

    async def counted(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        lent = getattr(function, "function", function)  # the writer's _Lent wraps its call
        thread_calls.append(getattr(lent, "__name__", repr(lent)))
        return await run_sync(function, *args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counted)
    try:
        headers = [("Idempotency-Key", "order-1")]
        first = harness.request("POST", "/orders", headers=headers, json_body={"sku": "a"})
        assert first.status == 201
        # The claim and the completion ran on the event loop; a worker thread was at most lent
        # to commit their writes (before: the engine's claim and completion ran in worker
        # threads). FULL's fsync runs in the writer's own thread.
        assert set(thread_calls) <= {"_lead"}
        thread_calls.clear()

        replay = harness.request("POST", "/orders", headers=headers, json_body={"sku": "a"})
        assert replay.replayed
        assert replay.body == first.body
        # Before: the replay's claim went to a worker thread, which then read the record.
        assert thread_calls == []
        assert harness.calls["orders"] == 1
    finally:
        layer.close()


def test_only_completed_live_records_are_served_inline(
    layer: SQLitePersistenceLayer, clock: FakeClock, db_path: Path
) -> None:
    writer = SQLitePersistenceLayer(db_path)  # another worker process's layer
    writer.configure(CONFIG)
    writer.clock = clock
    try:
        done = layer.build_idempotency_key("done")
        writer.save_success(writer.save_inprogress(done, "h"), RESPONSE)
        running = layer.build_idempotency_key("running")
        writer.save_inprogress(running, "h")

        served = layer.get_cached_record(done)
        assert served is not None
        assert served.response == RESPONSE
        assert layer.get_cached_record(running) is None  # a claim decides what to do with it
        assert layer.get_cached_record(layer.build_idempotency_key("absent")) is None
        clock.advance(3601)
        assert layer.get_cached_record(done) is None  # expired
    finally:
        writer.close()


def test_inline_replays_can_be_switched_off(db_path: Path, clock: FakeClock) -> None:
    layer = SQLitePersistenceLayer(db_path, inline_replays=False)
    layer.configure(CONFIG)
    layer.clock = clock
    try:
        key = layer.build_idempotency_key("done")
        layer.save_success(layer.save_inprogress(key, "h"), RESPONSE)
        assert layer.get_cached_record(key) is None
        with pytest.raises(IdempotencyItemAlreadyExistsError):
            layer.save_inprogress(key, "h")  # still answered, by the claim
    finally:
        layer.close()


def test_an_inline_read_never_waits_for_a_lock(db_path: Path, clock: FakeClock) -> None:
    # A file another program holds locked, in the rollback-journal mode where even readers
    # wait: the inline read answers "not here" at once instead of holding up the event loop.
    with sqlite3.connect(db_path) as setup:
        setup.execute("CREATE TABLE other (x INTEGER)")
    blocker = sqlite3.connect(db_path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    layer = SQLitePersistenceLayer(db_path, busy_timeout_seconds=3)
    layer.configure(CONFIG)
    layer.clock = clock
    try:
        started = time.monotonic()
        assert layer.get_cached_record(layer.build_idempotency_key("order-1")) is None
        assert time.monotonic() - started < 1
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
        layer.close()


def test_a_claim_reads_the_key_once(db_path: Path, clock: FakeClock) -> None:
    statements = Statements()
    layer = traced_layer(db_path, clock, statements)
    try:
        idle_writer(layer)
        selects = statements.count("SELECT")
        layer.save_inprogress(layer.build_idempotency_key("order-1"), "h")
        # The local-cache lookup's read serves the claim's look before it goes to the writer.
        assert statements.count("SELECT") - selects == 1
        running = layer.build_idempotency_key("order-1")
        with pytest.raises(IdempotencyItemAlreadyExistsError):
            layer.save_inprogress(running, "h")  # a conflict: the same one read, no write
        assert statements.count("SELECT") - selects == 2
    finally:
        layer.close()


def test_the_wal_is_checkpointed_by_the_purge_thread_not_in_a_commit(
    db_path: Path, clock: FakeClock
) -> None:
    statements = Statements()
    layer = traced_layer(db_path, clock, statements)
    try:
        for i in range(320):  # more commits than between two checkpoints
            layer.save_inprogress(layer.build_idempotency_key(f"order-{i}"), "h")
        writer_connection = layer._writer.connection
        assert writer_connection is not None
        # Before: SQLite checkpointed inside a commit every 1000 WAL pages.
        assert writer_connection.execute("PRAGMA wal_autocheckpoint").fetchone() == (0,)
        deadline = time.monotonic() + 5
        while statements.count("PRAGMA wal_checkpoint") == 0:
            assert time.monotonic() < deadline, "no checkpoint ran"
            time.sleep(0.01)
        checkpointers = statements.threads_running("PRAGMA wal_checkpoint")
        assert checkpointers == {layer._writer._purger.ident if layer._writer._purger else -1}
    finally:
        layer.close()


# Writes from an event loop -------------------------------------------------------------------


def _lease_records(key: str, now: float) -> tuple[DataRecord, DataRecord]:
    lease = DataRecord(
        key,
        STATUS_INPROGRESS,
        int(now) + 3600,
        int(now * 1000) + 30_000,
        payload_hash="h",
        lease_id="lease-" + key,
    )
    done = DataRecord(
        key,
        STATUS_COMPLETED,
        int(now) + 3600,
        lease.in_progress_expiry_timestamp,
        payload_hash="h",
        response=RESPONSE,
        lease_id=lease.lease_id,
    )
    return lease, done


def test_a_write_that_lent_the_writer_a_thread_does_not_wait_for_that_thread(
    db_path: Path, clock: FakeClock
) -> None:
    # EXTRA never commits on the event loop: every write goes through a lent thread, which
    # leads for as long as event loop writes keep coming. The write that lent it returned only
    # when the thread stopped leading (under load: the new-key p99 of 755 ms), here never.
    import asyncio

    layer = SQLitePersistenceLayer(db_path, synchronous="EXTRA")
    layer.configure(CONFIG)
    layer.clock = clock
    idle_writer(layer)  # no purge is queued between the two writes: it would take the lead
    first_running, second_queued, second_may_finish = (threading.Event() for _ in range(3))

    def first(connection: sqlite3.Connection) -> str:
        first_running.set()
        second_queued.wait(10)
        return "first"

    def second(connection: sqlite3.Connection) -> str:
        second_may_finish.wait(10)
        return "second"

    async def scenario() -> list[str]:
        first_task = asyncio.ensure_future(layer._awrite(first))
        await asyncio.to_thread(first_running.wait, 10)
        second_task = asyncio.ensure_future(layer._awrite(second))
        await asyncio.sleep(0)  # the second write is queued behind the first
        second_queued.set()
        try:
            done, _ = await asyncio.wait({first_task}, timeout=10)
            order = ["first done" if first_task in done else "first still waiting"]
        finally:
            second_may_finish.set()
        order += [await first_task, await second_task]
        return order

    try:
        assert asyncio.run(scenario()) == ["first done", "first", "second"]
    finally:
        layer.close()


def test_full_commits_on_the_loop_and_fsyncs_the_wal_before_a_completion_returns(
    db_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from idem_middleware.persistence import sqlite as sqlite_module

    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(sqlite_module.os, "fsync", fsync)
    statements = Statements()
    layer = traced_layer(db_path, clock, statements)  # synchronous="FULL", the default
    idle_writer(layer)
    lease, done = _lease_records(layer.build_idempotency_key("order-1"), START)

    async def scenario() -> tuple[int, int, int]:
        loop_thread = threading.get_ident()
        await layer._aput_record(lease)
        after_claim = len(synced)
        await layer._aupdate_record(done)
        committers = statements.threads_running("INSERT", "UPDATE")
        assert committers == {loop_thread}
        return after_claim, len(synced), loop_thread

    try:
        after_claim, after_completion, _ = asyncio.run(scenario())
        assert after_claim == 0  # a claim needs no fsync (see _aput_record)
        assert after_completion >= 1
        assert all(path.endswith("-wal") for path in synced)
        assert Path(synced[0]).name == db_path.name + "-wal"
        # The loop's connection leaves FULL's fsync to the writer's own (above).
        assert statements.connections_running("PRAGMA synchronous = NORMAL")
        assert layer.get_record(done.idempotency_key).status == STATUS_COMPLETED
    finally:
        layer.close()


def test_a_failed_wal_fsync_fails_the_completion_as_a_store_error(
    db_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from idem_middleware.persistence import sqlite as sqlite_module

    def fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(sqlite_module.os, "fsync", fsync)
    layer = SQLitePersistenceLayer(db_path)
    layer.configure(CONFIG)
    layer.clock = clock
    idle_writer(layer)
    lease, done = _lease_records(layer.build_idempotency_key("order-1"), START)

    async def scenario() -> None:
        await layer._aput_record(lease)
        await layer._aupdate_record(done)

    try:
        with pytest.raises(IdempotencyPersistenceLayerError, match="fsync of the SQLite WAL"):
            asyncio.run(scenario())
    finally:
        layer.close()


def test_normal_commits_on_the_loop_without_a_thread(db_path: Path, clock: FakeClock) -> None:
    import asyncio

    statements = Statements()
    layer = traced_layer(db_path, clock, statements, synchronous="NORMAL")
    idle_writer(layer)
    lease, done = _lease_records(layer.build_idempotency_key("order-1"), START)

    async def scenario() -> int:
        await layer._aput_record(lease)
        await layer._aupdate_record(done)
        return threading.get_ident()

    try:
        loop_thread = asyncio.run(scenario())
        assert statements.threads_running("INSERT", "UPDATE") == {loop_thread}
        assert layer.get_record(done.idempotency_key).status == STATUS_COMPLETED
    finally:
        layer.close()


def test_a_loop_write_while_another_process_holds_the_lock_waits_off_the_loop(
    db_path: Path, clock: FakeClock
) -> None:
    import asyncio

    layer = SQLitePersistenceLayer(db_path, synchronous="NORMAL")
    layer.configure(CONFIG)
    layer.clock = clock
    layer.check()
    idle_writer(layer)
    blocker = sqlite3.connect(db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    lease, _ = _lease_records(layer.build_idempotency_key("order-1"), START)

    async def scenario() -> list[str]:
        steps: list[str] = []
        claim = asyncio.ensure_future(layer._aput_record(lease))
        await asyncio.sleep(0.05)
        # The loop was free meanwhile: the claim waits for the lock in the writer's thread.
        steps.append("claim waiting" if not claim.done() else "claim done")
        blocker.execute("ROLLBACK")
        await claim
        steps.append("claimed")
        return steps

    try:
        assert asyncio.run(scenario()) == ["claim waiting", "claimed"]
        assert layer.get_record(lease.idempotency_key).status == STATUS_INPROGRESS
    finally:
        blocker.close()
        layer.close()


def test_full_on_a_file_that_stays_out_of_wal_mode_commits_with_sqlites_own_fsync(
    db_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A file that cannot switch to WAL (the layer warns and goes on) has no -wal file to fsync:
    # the loop's connection keeps SQLite's FULL instead of failing every completion.
    import asyncio

    monkeypatch.setattr(
        SQLitePersistenceLayer, "_enable_wal", lambda self, connection, timeout: ("delete",)
    )
    statements = Statements()
    layer = traced_layer(db_path, clock, statements)
    idle_writer(layer)
    lease, done = _lease_records(layer.build_idempotency_key("order-1"), START)

    async def scenario() -> None:
        await layer._aput_record(lease)
        await layer._aupdate_record(done)

    try:
        asyncio.run(scenario())
        assert layer.get_record(done.idempotency_key).status == STATUS_COMPLETED
        assert not statements.connections_running("PRAGMA synchronous = NORMAL")
        assert not (db_path.parent / (db_path.name + "-wal")).exists()
    finally:
        layer.close()
