"""One SQLite layer used from event loops that end: a loop that shuts down while the writer
works for it must leave the writer working for the next loop (tests, and apps that run a loop
per test or per thread, share one layer across loops).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio.to_thread
import pytest

from idem_middleware import IdempotencyConfig
from idem_middleware.persistence import SQLitePersistenceLayer
from idem_middleware.persistence.record import STATUS_COMPLETED, STATUS_INPROGRESS, DataRecord
from idem_middleware.responses import StoredResponse

RESPONSE = StoredResponse(status=201, headers=(), body=b"{}")


@pytest.fixture
def layer(tmp_path: Path) -> Iterator[SQLitePersistenceLayer]:
    layer = SQLitePersistenceLayer(tmp_path / "store.sqlite3", busy_timeout_seconds=2)
    layer.configure(IdempotencyConfig())
    yield layer
    layer.close()


def lease(key: str, layer: SQLitePersistenceLayer) -> DataRecord:
    now = int(layer.clock())
    return DataRecord(
        key, STATUS_INPROGRESS, now + 3600, (now + 60) * 1000, lease_id=f"lease-{key}"
    )


def completed(claim: DataRecord) -> DataRecord:
    return DataRecord(
        claim.idempotency_key,
        STATUS_COMPLETED,
        claim.expiry_timestamp,
        claim.in_progress_expiry_timestamp,
        RESPONSE.encode(),
        lease_id=claim.lease_id,
    )


async def until(condition: Callable[[], bool]) -> None:
    """Let the loop run until ``condition`` holds (bounded: ten seconds)."""
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        await asyncio.sleep(0.001)


async def never_started(function: Callable[..., object], *args: object, **kwargs: object) -> None:
    """A worker thread the loop ends before it starts (anyio's ``run_sync`` cancelled first)."""
    await asyncio.Event().wait()


def store_and_complete(layer: SQLitePersistenceLayer, key: str) -> None:
    async def run() -> None:
        claim = lease(key, layer)
        await layer._aput_record(claim)
        await layer._aupdate_record(completed(claim))

    asyncio.run(asyncio.wait_for(run(), 15))
    assert layer.get_record(key).status == STATUS_COMPLETED


def test_a_loop_that_ends_while_its_completion_waits_for_fsync_leaves_fsync_working(
    layer: SQLitePersistenceLayer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hung forever before: the fsync was lent to the ending loop, which cancelled it before a
    thread started it, and every later completion waited for an fsync nobody made.
    """
    assert layer.synchronous == "FULL"

    async def leave_while_completing() -> None:
        claim = lease("first", layer)
        await layer._aput_record(claim)
        completion = asyncio.create_task(layer._aupdate_record(completed(claim)))
        await until(lambda: bool(layer._writer._sync_waiters) or completion.done())
        # asyncio.run now cancels the completion (committed, waiting for its fsync) and all
        # the loop lent, and closes the loop.

    store_and_complete(layer, "warm")
    with monkeypatch.context() as patch:
        patch.setattr(anyio.to_thread, "run_sync", never_started)
        asyncio.run(leave_while_completing())
    store_and_complete(layer, "second")


def test_a_loop_that_ends_with_its_write_lent_to_a_thread_leaves_the_writer_working(
    layer: SQLitePersistenceLayer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: the lead lent to the ending loop was cancelled before a thread took it, the
    writer stayed "led" by nobody, and every later write failed with database is locked.
    """
    store_and_complete(layer, "warm")
    other_process = sqlite3.connect(tmp_path / "store.sqlite3", isolation_level=None)
    other_process.execute("BEGIN IMMEDIATE")  # the write lock: the next write queues and lends

    async def leave_while_writing() -> None:
        write = asyncio.create_task(layer._aput_record(lease("queued", layer)))
        await until(lambda: bool(layer._writer._lent) or write.done())
        assert not write.done()

    try:
        with monkeypatch.context() as patch:
            patch.setattr(anyio.to_thread, "run_sync", never_started)
            asyncio.run(leave_while_writing())
    finally:
        other_process.execute("ROLLBACK")
        other_process.close()
    store_and_complete(layer, "next")


def test_a_turn_that_cannot_be_committed_fails_its_writes_instead_of_hanging_them(
    layer: SQLitePersistenceLayer, monkeypatch: pytest.MonkeyPatch
) -> None:
    store_and_complete(layer, "warm")

    def no_thread(writes: object) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(layer._writer, "_run_inline", no_thread)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        asyncio.run(asyncio.wait_for(layer._aput_record(lease("stuck", layer)), 10))
