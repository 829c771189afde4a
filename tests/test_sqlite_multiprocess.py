"""Several worker processes (spawned, like gunicorn/uvicorn workers that do not share memory)
claim the same keys on the same SQLite file at the same moment: exactly one wins each key.
Then many threads in many processes (spawned, or forked from a parent whose layer has already
written, as a pre-fork server does) claim, complete and replay the same keys: still one winner
and one stored response per key.
"""

from __future__ import annotations

import multiprocessing
import queue
import random
import threading
from collections import defaultdict
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from idem_middleware import IdempotencyConfig
from idem_middleware.exceptions import IdempotencyItemAlreadyExistsError
from idem_middleware.persistence.record import STATUS_COMPLETED
from idem_middleware.responses import StoredResponse

if TYPE_CHECKING:
    from idem_middleware.persistence import SQLitePersistenceLayer

PROCESSES = 4
KEYS = [f"order-{i}" for i in range(8)]
CONFIG = IdempotencyConfig(expires_after_seconds=3600, in_progress_expires_after_seconds=60)

Outcome = tuple[str, int, str, str | None]  # key, worker, "won"/"lost"/"error", seen hash


def claim_worker(
    path: str, worker: int, barrier: Barrier, results: multiprocessing.Queue[Outcome]
) -> None:
    """Runs in a spawned process: a layer of its own, then one claim per key, all workers
    released together by the barrier before each claim.
    """
    from idem_middleware.persistence import SQLitePersistenceLayer

    layer = SQLitePersistenceLayer(path, busy_timeout_seconds=10)
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


def test_spawned_processes_claiming_the_same_keys_make_one_winner_each(tmp_path: Path) -> None:
    # A fresh file: the first claims also race to create the schema and switch to WAL.
    path = str(tmp_path / "shared.sqlite3")
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(PROCESSES)
    results: multiprocessing.Queue[Outcome] = context.Queue()
    workers = [
        context.Process(target=claim_worker, args=(path, worker, barrier, results))
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
    assert sorted(by_key) == sorted(KEYS)
    for name, claims in by_key.items():
        winners = [claim for claim in claims if claim[2] == "won"]
        assert len(winners) == 1, f"{name}: {claims}"
        winner_hash = winners[0][3]
        # Every loser was handed the winner's record by its own claim.
        assert {claim[3] for claim in claims if claim[2] == "lost"} == {winner_hash}
        assert sorted(claim[1] for claim in claims) == list(range(PROCESSES))

    from idem_middleware.persistence import SQLitePersistenceLayer

    reader = SQLitePersistenceLayer(path)
    reader.configure(CONFIG)
    try:
        for name, claims in by_key.items():
            winner_hash = next(claim[3] for claim in claims if claim[2] == "won")
            assert reader.get_record(reader.build_idempotency_key(name)).payload_hash == (
                winner_hash
            )
    finally:
        reader.close()


# Many writers: processes x threads, claim + complete + replay ---------------------------------

WRITER_PROCESSES = 6
WRITER_THREADS = 8
SHARED_KEYS = [f"payment-{i}" for i in range(24)]

Report = tuple[str, str, str, str | None]  # key, "p<process>-t<thread>", outcome, detail


def _response(worker: str) -> StoredResponse:
    return StoredResponse(status=201, headers=(("X-Worker", worker),), body=worker.encode())


def many_writers_worker(
    path: str,
    process: int,
    barrier: Barrier,
    results: multiprocessing.Queue[list[Report]],
    layer: SQLitePersistenceLayer | None = None,
) -> None:
    """One process: ``WRITER_THREADS`` threads sharing one layer each claim every key (in an
    order of their own), complete what they win and record what they were handed otherwise.
    """
    from idem_middleware.persistence import SQLitePersistenceLayer

    if layer is None:
        layer = SQLitePersistenceLayer(path, busy_timeout_seconds=20)
        layer.configure(CONFIG)
    reports: list[Report] = []
    reports_lock = threading.Lock()
    start = threading.Barrier(WRITER_THREADS)

    def thread_main(thread: int) -> None:
        worker = f"p{process}-t{thread}"
        names = list(SHARED_KEYS)
        random.Random(worker).shuffle(names)
        mine: list[Report] = []
        if thread == 0:
            barrier.wait(timeout=120)  # every process is ready
        start.wait(timeout=120)
        for name in names:
            key = layer.build_idempotency_key(name)
            try:
                lease = layer.save_inprogress(key, worker)
                layer.save_success(lease, _response(worker))
            except IdempotencyItemAlreadyExistsError as exc:
                record = exc.old_data_record
                mine.append((name, worker, "lost", None if record is None else record.payload_hash))
            except Exception as exc:
                mine.append((name, worker, "error", repr(exc)))
            else:
                mine.append((name, worker, "won", worker))
        with reports_lock:
            reports.extend(mine)

    threads = [threading.Thread(target=thread_main, args=(t,)) for t in range(WRITER_THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    layer.close()
    results.put(reports)


@pytest.mark.parametrize("start_method", ["spawn", "fork"])
def test_many_writer_threads_in_many_processes_store_one_response_per_key(
    tmp_path: Path, start_method: str
) -> None:
    if start_method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"no {start_method} on this platform")
    from idem_middleware.persistence import SQLitePersistenceLayer

    path = str(tmp_path / "shared.sqlite3")
    context = multiprocessing.get_context(start_method)
    barrier = context.Barrier(WRITER_PROCESSES)
    results: multiprocessing.Queue[list[Report]] = context.Queue()
    inherited = None
    if start_method == "fork":
        # Built and written through before the fork: each child must start its own writer.
        inherited = SQLitePersistenceLayer(path, busy_timeout_seconds=20)
        inherited.configure(CONFIG)
        inherited.save_inprogress(inherited.build_idempotency_key("before-fork"), "parent")
    workers = [
        context.Process(
            target=many_writers_worker, args=(path, process, barrier, results, inherited)
        )
        for process in range(WRITER_PROCESSES)
    ]
    for process in workers:
        process.start()
    reports: list[Report] = []
    try:
        for _ in range(WRITER_PROCESSES):
            reports.extend(results.get(timeout=180))
    except queue.Empty:
        pass
    for process in workers:
        process.join(timeout=30)
        if process.is_alive():
            process.kill()

    assert [process.exitcode for process in workers] == [0] * WRITER_PROCESSES
    assert [r for r in reports if r[2] == "error"] == []
    assert len(reports) == WRITER_PROCESSES * WRITER_THREADS * len(SHARED_KEYS)
    by_key: dict[str, list[Report]] = defaultdict(list)
    for report in reports:
        by_key[report[0]].append(report)

    reader = SQLitePersistenceLayer(path)
    reader.configure(CONFIG)
    try:
        for name in SHARED_KEYS:
            claims = by_key[name]
            winners = [claim[1] for claim in claims if claim[2] == "won"]
            assert len(winners) == 1, f"{name}: {sorted(winners)}"
            # Every loser was handed the winner's record (in progress or completed).
            assert {claim[3] for claim in claims if claim[2] == "lost"} == {winners[0]}
            record = reader.get_record(reader.build_idempotency_key(name))
            assert record.status == STATUS_COMPLETED
            assert record.response == _response(winners[0])
    finally:
        reader.close()
        if inherited is not None:
            inherited.close()


# Event loops: writes committed on the loop, in one transaction per turn -------------------------

LOOP_COROUTINES = 16


def event_loop_worker(
    path: str,
    process: int,
    synchronous: str,
    barrier: Barrier,
    results: multiprocessing.Queue[list[Report]],
) -> None:
    """One process, one event loop: ``LOOP_COROUTINES`` coroutines claim every key through
    the layer's asyncio primitives (as under ASGI) and complete what they win.
    """
    import asyncio
    import time

    from idem_middleware.persistence import SQLitePersistenceLayer
    from idem_middleware.persistence.record import STATUS_INPROGRESS, DataRecord

    layer = SQLitePersistenceLayer(path, busy_timeout_seconds=20, synchronous=synchronous)  # type: ignore[arg-type]
    layer.configure(CONFIG)

    async def claimer(coroutine: int) -> list[Report]:
        worker = f"p{process}-c{coroutine}"
        names = list(SHARED_KEYS)
        random.Random(worker).shuffle(names)
        mine: list[Report] = []
        for name in names:
            key = layer.build_idempotency_key(name)
            now = time.time()
            lease = DataRecord(
                key,
                STATUS_INPROGRESS,
                int(now) + 3600,
                int(now * 1000) + 60_000,
                payload_hash=worker,
                lease_id=worker,
            )
            try:
                await layer._aput_record(lease)
                done = DataRecord(
                    key,
                    STATUS_COMPLETED,
                    int(now) + 3600,
                    lease.in_progress_expiry_timestamp,
                    payload_hash=worker,
                    response=_response(worker),
                    lease_id=worker,
                )
                await layer._aupdate_record(done)
            except IdempotencyItemAlreadyExistsError as exc:
                record = exc.old_data_record
                mine.append((name, worker, "lost", None if record is None else record.payload_hash))
            except Exception as exc:
                mine.append((name, worker, "error", repr(exc)))
            else:
                mine.append((name, worker, "won", worker))
        return mine

    async def main() -> list[Report]:
        barrier.wait(timeout=120)
        parts = await asyncio.gather(*(claimer(c) for c in range(LOOP_COROUTINES)))
        return [report for part in parts for report in part]

    reports = asyncio.run(main())
    layer.close()
    results.put(reports)


@pytest.mark.parametrize("synchronous", ["FULL", "NORMAL"])
def test_event_loops_in_many_processes_store_one_response_per_key(
    tmp_path: Path, synchronous: str
) -> None:
    from idem_middleware.persistence import SQLitePersistenceLayer

    path = str(tmp_path / "shared.sqlite3")
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(WRITER_PROCESSES)
    results: multiprocessing.Queue[list[Report]] = context.Queue()
    workers = [
        context.Process(
            target=event_loop_worker, args=(path, process, synchronous, barrier, results)
        )
        for process in range(WRITER_PROCESSES)
    ]
    for process in workers:
        process.start()
    reports: list[Report] = []
    try:
        for _ in range(WRITER_PROCESSES):
            reports.extend(results.get(timeout=180))
    except queue.Empty:
        pass
    for process in workers:
        process.join(timeout=30)
        if process.is_alive():
            process.kill()

    assert [process.exitcode for process in workers] == [0] * WRITER_PROCESSES
    assert [r for r in reports if r[2] == "error"] == []
    assert len(reports) == WRITER_PROCESSES * LOOP_COROUTINES * len(SHARED_KEYS)
    by_key: dict[str, list[Report]] = defaultdict(list)
    for report in reports:
        by_key[report[0]].append(report)
    reader = SQLitePersistenceLayer(path)
    reader.configure(CONFIG)
    try:
        for name in SHARED_KEYS:
            claims = by_key[name]
            winners = [claim[1] for claim in claims if claim[2] == "won"]
            assert len(winners) == 1, f"{name}: {sorted(winners)}"
            assert {claim[3] for claim in claims if claim[2] == "lost"} == {winners[0]}
            record = reader.get_record(reader.build_idempotency_key(name))
            assert record.status == STATUS_COMPLETED
            assert record.response == _response(winners[0])
    finally:
        reader.close()
