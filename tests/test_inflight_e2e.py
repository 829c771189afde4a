"""Requests in flight on real servers (issue 10): leases that hold while the handler lives, a
crashed worker's key freed within about one lease, duplicates that wait for the answer.

The harness apps (``tests.support.harness``) run on uvicorn and gunicorn with two worker
processes each, over SQLite, Redis and DynamoDB Local, with a 2 s lease. ``POST /slow`` runs for
4 s (or until a gate file exists) and appends ``start``/``end`` lines with its pid to a run log
shared by the workers: how many times the handler ran, and in which process, whichever worker
answered. Both servers of a store run side by side, so each test waits for the slow handlers
once. The assertions are on counts and order; the only clock ones are loose bounds (a lease
renewed past twice its length, a crashed key free again within a few leases).
"""

from __future__ import annotations

import os
import re
import signal
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support.runlog import RunLog
from tooling.servers import Server, running, start_gunicorn, start_uvicorn

pytestmark = pytest.mark.e2e

# Long enough that a renewal thread held up by a loaded machine (renewals come a few times per
# lease) does not lose its lease; short against the default 10 s.
LEASE_SECONDS = 2
HANDLER_SECONDS = 4
#: The longest the gated handler of ``outlives_its_lease`` runs (the client waits 30 s).
HANDLER_MAX_SECONDS = 20
RETRY_EVERY_SECONDS = 0.3
#: A crashed worker's key must run again before the default 10 s lease would free it; the
#: margin over the 2 s lease is for a loaded machine's slow retries.
FREED_WITHIN_SECONDS = 9


@dataclass(frozen=True)
class Deployment:
    name: str
    start: Callable[[Mapping[str, str], Path], Server]
    #: A worker serves one request at a time (gunicorn's sync workers): while the handler runs,
    #: every retry is answered by the other worker process. Under uvicorn the kernel picks.
    one_request_per_worker: bool


def _uvicorn(env: Mapping[str, str], log_dir: Path) -> Server:
    return start_uvicorn(
        "tests.support.harness:asgi_server_app",
        env=env,
        log_dir=log_dir,
        workers=2,
        extra_args=["--factory"],
    )


def _gunicorn(env: Mapping[str, str], log_dir: Path) -> Server:
    return start_gunicorn(
        "tests.support.harness:wsgi_server_app()", env=env, log_dir=log_dir, workers=2
    )


DEPLOYMENTS = (
    Deployment("uvicorn-2workers", _uvicorn, one_request_per_worker=False),
    Deployment("gunicorn-2sync-workers", _gunicorn, one_request_per_worker=True),
)


@dataclass
class Live:
    """A deployment serving, with its run log."""

    deployment: Deployment
    server: Server
    runs: RunLog

    def post(
        self, key: str, *, seconds: float = HANDLER_SECONDS, gate: Path | None = None
    ) -> httpx.Response:
        """``POST /slow`` on a new connection, so that requests spread over the workers."""
        params: dict[str, str] = {"seconds": str(seconds)}
        if gate is not None:
            params["gate"] = str(gate)
        limits = httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(base_url=self.server.base_url, timeout=30, limits=limits) as client:
            return client.post("/slow", params=params, headers={"Idempotency-Key": key})


def serve_side_by_side(
    tmp_path: Path,
    store_url: Callable[[str], str],
    scenario: Callable[[Live], None],
    **settings: str,
) -> None:
    """Start every deployment (each with its own store from ``store_url(name)``), then run
    ``scenario`` on all of them at once; a failure shows that server's log.
    """

    def one(deployment: Deployment) -> None:
        work = tmp_path / deployment.name
        work.mkdir()
        runs = RunLog(work / "runs.log")
        env = {
            "IDEM_STORE_URL": store_url(deployment.name),
            "IDEM_HARNESS_RUN_LOG": str(runs.path),
            "IDEM_HARNESS_LEASE_SECONDS": str(LEASE_SECONDS),
            "LOG_LEVEL": "DEBUG",
            **settings,
        }
        with running(deployment.start(env, work)) as server:
            assert len(server.worker_pids) == 2
            scenario(Live(deployment, server, runs))

    with ThreadPoolExecutor(len(DEPLOYMENTS)) as pool:
        for future in [pool.submit(one, deployment) for deployment in DEPLOYMENTS]:
            future.result()


def is_conflict(response: httpx.Response) -> bool:
    if response.status_code != 409:
        return False
    assert response.headers["content-type"] == "application/problem+json"
    assert int(response.headers["retry-after"]) >= 1
    assert response.json()["code"] == "idempotency_key_in_use"
    return True


def is_replay_of(response: httpx.Response, original: httpx.Response) -> bool:
    return (
        response.status_code == original.status_code
        and response.headers.get("idempotent-replayed") == "true"
        and response.content == original.content
    )


def decisions(server: Server, name: str) -> set[int]:
    """The worker pids that logged the middleware decision ``name``."""
    return {
        int(pid)
        for pid in re.findall(
            rf"\[(\d+)\] DEBUG idem_middleware: idempotency {name} ", server.log()
        )
    }


@dataclass
class Retry:
    sent: float  # seconds after the first request's handler started
    after_first: bool  # sent once the first request had its answer
    reply: httpx.Response
    outcome: str = ""

    def classify(self, original: httpx.Response) -> None:
        if is_conflict(self.reply):
            self.outcome = "409"
        elif is_replay_of(self.reply, original):
            self.outcome = "replay"
        else:
            self.outcome = str(self.reply.status_code)


# Scenarios ----------------------------------------------------------------------------------


def outlives_its_lease(live: Live) -> None:
    """A handler under a 2 s lease, retried every 0.3 s: one execution, 409s while it runs
    (long after its first lease would have run out), replays once it has completed.
    """
    key = f"long-{uuid.uuid4().hex}"
    # The handler runs until a retry sent past twice the lease has been told 409 (the gate),
    # however slowly a loaded machine answers the retries; HANDLER_MAX_SECONDS only bounds it.
    gate = live.runs.path.with_name(f"gate-{key}")
    retries: list[Retry] = []
    with ThreadPoolExecutor(1) as pool:
        first: Future[httpx.Response] = pool.submit(
            live.post, key, seconds=HANDLER_MAX_SECONDS, gate=gate
        )
        live.runs.wait_for_start(key)
        claimed = time.monotonic()
        while sum(retry.after_first for retry in retries) < 2:
            assert len(retries) < 200, "the first request never finished"
            after_first, sent = first.done(), time.monotonic() - claimed
            reply = live.post(key, seconds=HANDLER_MAX_SECONDS, gate=gate)  # the same request
            retries.append(Retry(sent, after_first, reply))
            if sent > 2 * LEASE_SECONDS and retries[-1].reply.status_code == 409:
                gate.touch()
            time.sleep(RETRY_EVERY_SECONDS)
        original = first.result()

    assert original.status_code == 201, original.text
    assert "idempotent-replayed" not in original.headers
    for retry in retries:
        retry.classify(original)
    outcomes = [retry.outcome for retry in retries]
    assert set(outcomes) <= {"409", "replay"}, [
        (r.reply.status_code, r.reply.text) for r in retries
    ]
    # In order: 409 while the handler runs, a replay ever after it completed.
    first_replay = outcomes.index("replay")
    assert outcomes[first_replay:] == ["replay"] * (len(outcomes) - first_replay), outcomes
    assert all(retry.outcome == "replay" for retry in retries if retry.after_first), outcomes
    # The lease was renewed: retries sent well past the first lease still found it held.
    assert any(r.sent > 2 * LEASE_SECONDS for r in retries if r.outcome == "409"), retries
    assert live.runs.pids("end", key) == live.runs.pids("start", key), "the handler ran twice"
    [runner] = live.runs.pids("start", key)
    if live.deployment.one_request_per_worker:
        # Every 409 came from the other worker process: the lease held across processes.
        assert decisions(live.server, "conflict") == live.server.worker_pids - {runner}
    log = live.server.log()
    assert "lease_lost" not in log
    assert "Traceback" not in log


def crashed_worker_frees_the_key(live: Live, gate: Path) -> None:
    """kill -9 of the worker running the handler: retries get 409 until the lease it renewed
    runs out (about one lease), then one runs the handler, and later ones replay that run.
    """
    key = f"crash-{uuid.uuid4().hex}"
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(live.post, key, gate=gate)
        [victim] = live.runs.wait_for_start(key)
        assert victim in live.server.worker_pids
        time.sleep(LEASE_SECONDS / 2)  # the worker has renewed its lease at least once, or nearly
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        gate.touch()  # the run after the crash need not last: it ends at once
        with pytest.raises(httpx.TransportError):
            first.result()

    retries: list[httpx.Response] = []
    while not retries or is_conflict(retries[-1]):
        assert time.monotonic() - killed < 30, "the key was never freed"
        retries.append(live.post(key, gate=gate))
        if is_conflict(retries[-1]):
            time.sleep(RETRY_EVERY_SECONDS)
    freed_after = time.monotonic() - killed
    rerun = retries[-1]
    assert rerun.status_code == 201, rerun.text
    assert "idempotent-replayed" not in rerun.headers
    assert freed_after < FREED_WITHIN_SECONDS, (
        f"the key ran again only {freed_after:.1f} s after the crash"
    )

    later = live.post(key, gate=gate)
    assert is_replay_of(later, rerun), (later.status_code, later.headers, later.text)
    starts, ends = live.runs.pids("start", key), live.runs.pids("end", key)
    assert len(starts) == 2, starts
    assert starts[0] == victim
    assert starts[1] != victim
    assert ends == [starts[1]], "the killed run never ended; the second ran once"


# Tests --------------------------------------------------------------------------------------


def lease_and_crash(live: Live) -> None:
    outlives_its_lease(live)
    crashed_worker_frees_the_key(live, live.runs.path.with_name("gate"))


def test_lease_renewal_and_crash_recovery_sqlite(tmp_path: Path) -> None:
    serve_side_by_side(
        tmp_path, lambda name: f"sqlite:///{tmp_path}/{name}.sqlite3", lease_and_crash
    )


@pytest.mark.redis
def test_lease_renewal_and_crash_recovery_redis(tmp_path: Path, redis_url: str) -> None:
    # One database for both servers: their keys differ (uuid), and a key prefix keeps them apart.
    serve_side_by_side(tmp_path, lambda name: redis_url, lease_and_crash)


@pytest.mark.dynamodb
def test_lease_renewal_and_crash_recovery_dynamodb(
    tmp_path: Path, dynamodb_endpoint: str, dynamodb_table: str
) -> None:
    url = (
        f"dynamodb://{dynamodb_table}?region=us-east-1&endpoint_url={dynamodb_endpoint}"
        "&connect_timeout=1&read_timeout=3&max_attempts=2"
    )
    serve_side_by_side(tmp_path, lambda name: url, lease_and_crash)


def test_a_duplicate_that_may_wait_gets_the_replay_instead_of_409(tmp_path: Path) -> None:
    """``conflict_wait_seconds``: duplicates arriving mid-handler wait and get the replay
    (201, ``Idempotent-Replayed: true``) instead of 409; the handler runs once. Under gunicorn
    the duplicates wait in the other worker process, polling the store.
    """

    def waits(live: Live) -> None:
        key = f"wait-{uuid.uuid4().hex}"
        with ThreadPoolExecutor(5) as pool:
            first = pool.submit(live.post, key, seconds=2)
            live.runs.wait_for_start(key)
            duplicates = [pool.submit(live.post, key, seconds=2) for _ in range(4)]
            original = first.result()
            replies = [d.result() for d in duplicates]
        assert original.status_code == 201, original.text
        assert "idempotent-replayed" not in original.headers
        for reply in replies:
            assert reply.status_code == 201, reply.text
            assert reply.headers["idempotent-replayed"] == "true"
            assert reply.content == original.content
        [runner] = live.runs.pids("start", key)
        assert not decisions(live.server, "conflict"), "a duplicate got 409"
        if live.deployment.one_request_per_worker:
            assert decisions(live.server, "replayed") - {runner}, "no duplicate waited elsewhere"

    serve_side_by_side(
        tmp_path,
        lambda name: f"sqlite:///{tmp_path}/{name}.sqlite3",
        waits,
        IDEM_HARNESS_CONFLICT_WAIT_SECONDS="10",
    )
