"""Several worker processes (spawned, like gunicorn/uvicorn workers that do not share memory)
claim the same keys on the same SQLite file at the same moment: exactly one wins each key.
"""

from __future__ import annotations

import multiprocessing
import queue
from collections import defaultdict
from multiprocessing.synchronize import Barrier
from pathlib import Path

from idem_middleware import IdempotencyConfig
from idem_middleware.exceptions import IdempotencyItemAlreadyExistsError

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
