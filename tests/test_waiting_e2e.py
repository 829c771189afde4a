"""Duplicates that wait for the answer (``conflict_wait_seconds``, issue 10), end to end.

- Fifty duplicates of a request whose handler runs about a second, on uvicorn (two worker
  processes, asyncio waits) and gunicorn (two processes of threads, each waiter holding a
  thread), over one SQLite store: the handler runs once and all fifty get the same replay.
- A duplicate whose wait runs out gets the 409, over ASGI and WSGI; the request it duplicates
  keeps its record in progress and completes as if nothing happened.
- A client that goes away while its request waits releases nothing and takes nothing over: the
  ASGI middleware driven directly (the server drops sends, or raises on them as ASGI 2.4 lets
  it, or cancels the app), then real servers whose waiting client closes its socket.

``POST /slow?seconds=S&gate=PATH`` (``tests.support.harness``) runs until the gate file exists
(S bounds it) and appends ``start``/``end`` lines to a run log, so executions are counted
whichever process ran them, and a test decides when a handler ends rather than racing a clock.
The servers also log ``received`` once a request's body is in the middleware, so a test knows
its duplicates are claiming or waiting before it ends the handler or hangs up.
Assertions are on counts and order; the only clock ones are lower bounds.
"""

from __future__ import annotations

import contextlib
import http.client
import re
import socket
import sys
import threading
import time
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

from idem_middleware import IdempotencyConfig, IdempotencyMiddleware
from idem_middleware.engine import IdempotencyEvent
from idem_middleware.persistence import (
    BasePersistenceLayer,
    InMemoryPersistenceLayer,
    SQLitePersistenceLayer,
)
from idem_middleware.persistence.record import STATUS_COMPLETED, STATUS_INPROGRESS
from tests.support.asgi import ASGIClient
from tests.support.harness import AppState, Harness, Reply, assert_problem, build_asgi_app
from tests.support.runlog import RunLog
from tooling.servers import Server, start_gunicorn, start_uvicorn

WAIT_SECONDS = 5
DUPLICATES = 50
#: The first request's handler runs at least this long, and until every duplicate was sent.
HANDLER_SECONDS = 1.0
#: Bounds a gated handler whose gate a failed test never opens.
GATED_SECONDS = 30
GUNICORN_WORKERS = 2
#: Enough for the fifty waiters and the first request even if one process accepts them all.
GUNICORN_THREADS = 64


def slow_path(gate: Path) -> str:
    return "/slow?" + urllib.parse.urlencode({"seconds": GATED_SECONDS, "gate": str(gate)})


def new_key(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex}"


# Real servers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Live:
    """A server of the module, its run log and a directory for its tests' gate files."""

    server: Server
    runs: RunLog
    work: Path

    @property
    def address(self) -> tuple[str, int]:
        url = urllib.parse.urlsplit(self.server.base_url)
        assert url.hostname is not None
        assert url.port is not None
        return url.hostname, url.port

    def post(self, path: str, key: str, sent: threading.Semaphore | None = None) -> Reply:
        """``POST path`` on a connection of its own; ``sent`` is released once the request
        is on the wire, before its answer is awaited.
        """
        connection = http.client.HTTPConnection(*self.address, timeout=60)
        try:
            try:
                connection.request("POST", path, body=b"", headers={"Idempotency-Key": key})
            finally:
                if sent is not None:
                    sent.release()
            response = connection.getresponse()
            return Reply(
                status=response.status,
                headers=[(name.lower(), value) for name, value in response.getheaders()],
                body=response.read(),
            )
        finally:
            connection.close()

    def decisions(self, stored_key: str) -> Counter[str]:
        """How many times each middleware decision was logged for ``stored_key``, by any worker."""
        return Counter(name for name, key in _decision_lines(self.server) if key == stored_key)

    def claims(self) -> list[str]:
        """The stored keys claimed so far, in order."""
        return [key for name, key in _decision_lines(self.server) if name == "claimed"]

    def await_decision(self, stored_key: str, name: str, count: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while self.decisions(stored_key)[name] < count:
            assert time.monotonic() < deadline, (
                f"{name} logged {self.decisions(stored_key)[name]} time(s), not {count}"
            )
            time.sleep(0.02)


_DECISION = re.compile(r"\] DEBUG idem_middleware: idempotency (\w+) method=\S+ path=\S+ key=(\S+)")


def _decision_lines(server: Server) -> list[tuple[str, str]]:
    return [(m[1], m[2]) for m in _DECISION.finditer(server.log())]


def _uvicorn(env: Mapping[str, str], work: Path) -> Server:
    return start_uvicorn(
        "tests.support.harness:asgi_server_app_logging_received",
        env=env,
        log_dir=work,
        workers=2,
        extra_args=["--factory"],
    )


def _gunicorn(env: Mapping[str, str], work: Path) -> Server:
    return start_gunicorn(
        "tests.support.harness:wsgi_server_app_logging_received()",
        env=env,
        log_dir=work,
        workers=GUNICORN_WORKERS,
        threads=GUNICORN_THREADS,
    )


DEPLOYMENTS: dict[str, Callable[[Mapping[str, str], Path], Server]] = {
    "uvicorn-2workers": _uvicorn,
    f"gunicorn-{GUNICORN_WORKERS}x{GUNICORN_THREADS}threads": _gunicorn,
}


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Live]]:
    """Both deployments, started side by side once for the module, each over its own SQLite
    file with ``conflict_wait_seconds=5``.
    """
    root = tmp_path_factory.mktemp("waiting")

    def start(name: str) -> Live:
        work = root / name
        work.mkdir()
        runs = RunLog(work / "runs.log")
        env = {
            "IDEM_STORE_URL": f"sqlite:///{work}/store.sqlite3",
            "IDEM_HARNESS_RUN_LOG": str(runs.path),
            "IDEM_HARNESS_CONFLICT_WAIT_SECONDS": str(WAIT_SECONDS),
            "LOG_LEVEL": "DEBUG",
        }
        return Live(DEPLOYMENTS[name](env, work), runs, work)

    with ThreadPoolExecutor(len(DEPLOYMENTS)) as pool:
        futures = {name: pool.submit(start, name) for name in DEPLOYMENTS}
    started = {name: f.result() for name, f in futures.items() if f.exception() is None}
    try:
        for future in futures.values():
            future.result()  # a server that did not start fails every test, with its log
        yield started
    finally:
        for live in started.values():
            live.server.stop()


@contextlib.contextmanager
def log_shown_on_failure(live: Live) -> Iterator[None]:
    try:
        yield
    except BaseException:
        sys.stderr.write(f"\n--- {live.server.name} log ---\n{live.server.log()}\n")
        raise


def assert_replay_of(reply: Reply, original: Reply) -> None:
    assert reply.status == original.status, reply.body
    assert reply.replayed, reply.headers
    assert reply.body == original.body
    assert reply.header("content-type") == original.header("content-type")


@pytest.mark.e2e
@pytest.mark.parametrize("deployment", list(DEPLOYMENTS))
def test_fifty_waiting_duplicates_get_one_execution_and_fifty_identical_replays(
    servers: dict[str, Live], deployment: str
) -> None:
    live = servers[deployment]
    key = new_key("fifty")
    gate = live.work / f"gate-{key}"
    path = slow_path(gate)
    claimed_before = len(live.claims())
    with log_shown_on_failure(live), ThreadPoolExecutor(DUPLICATES + 1) as pool:
        first = pool.submit(live.post, path, key)
        live.runs.wait_for_start(key)
        started = time.monotonic()
        [stored_key] = live.claims()[claimed_before:]
        sent = threading.Semaphore(0)
        duplicates = [pool.submit(live.post, path, key, sent) for _ in range(DUPLICATES)]
        for _ in range(DUPLICATES):
            assert sent.acquire(timeout=30), "a duplicate was never sent"
        # Every duplicate is in the middleware, its body read, while the handler runs: each
        # finds the key in flight, and its answer can only come from waiting.
        _wait_for_lines(live.runs, "received", key, DUPLICATES + 1)
        time.sleep(max(0.0, started + HANDLER_SECONDS - time.monotonic()))
        assert not live.runs.pids("end", key)
        gate.touch()
        original = first.result()
        replies = [duplicate.result() for duplicate in duplicates]

        assert original.status == 201, original.body
        assert not original.replayed
        for reply in replies:
            assert_replay_of(reply, original)
        [runner] = live.runs.pids("start", key)
        assert live.runs.pids("end", key) == [runner]
        # Every duplicate waited: none was answered 409, none ran, none released the key.
        assert live.decisions(stored_key) == {"claimed": 1, "completed": 1, "replayed": DUPLICATES}


@pytest.mark.e2e
@pytest.mark.parametrize("deployment", list(DEPLOYMENTS))
def test_a_client_gone_while_waiting_leaves_the_first_request_to_complete_and_be_replayed(
    servers: dict[str, Live], deployment: str
) -> None:
    live = servers[deployment]
    key = new_key("gone")
    gate = live.work / f"gate-{key}"
    path = slow_path(gate)
    claimed_before = len(live.claims())
    with log_shown_on_failure(live), ThreadPoolExecutor(1) as pool:
        first: Future[Reply] = pool.submit(live.post, path, key)
        live.runs.wait_for_start(key)
        [stored_key] = live.claims()[claimed_before:]
        request = (
            f"POST {path} HTTP/1.1\r\nHost: {live.address[0]}\r\nIdempotency-Key: {key}\r\n"
            "Content-Length: 0\r\n\r\n"
        ).encode()
        with socket.create_connection(live.address, timeout=10) as waiting:
            waiting.sendall(request)
            # The duplicate is in the middleware (its body read): it is claiming or waiting.
            _wait_for_lines(live.runs, "received", key, 2)
            assert not live.runs.pids("end", key)
        # The client hung up mid-wait; the first request is still running.
        gate.touch()
        original = first.result()

        assert original.status == 201, original.body
        assert not original.replayed
        # The gone client's wait ended as any other: with the replay, sent to nobody.
        live.await_decision(stored_key, "replayed", 1)
        later = live.post(path, key)
        assert_replay_of(later, original)
        [runner] = live.runs.pids("start", key)
        assert live.runs.pids("end", key) == [runner]
        assert live.decisions(stored_key) == {"claimed": 1, "completed": 1, "replayed": 2}


def _wait_for_lines(runs: RunLog, event: str, key: str, count: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while len(runs.pids(event, key)) < count:
        assert time.monotonic() < deadline, f"{count} {event!r} lines for {key} never came"
        time.sleep(0.02)


# In process: a wait that runs out ---------------------------------------------------------------


class CountedReads(SQLitePersistenceLayer):
    """Counts the store reads: a waiting duplicate polls with one read each time."""

    def __init__(self, path: Path) -> None:
        super().__init__(str(path))
        self.reads = 0

    def _get_record(self, idempotency_key: str) -> Any:
        self.reads += 1
        return super()._get_record(idempotency_key)

    async def _aget_record(self, idempotency_key: str) -> Any:  # the polls under ASGI
        self.reads += 1
        return await super()._aget_record(idempotency_key)


def test_a_duplicate_whose_wait_runs_out_gets_409_and_the_first_still_completes(
    make: Callable[..., Harness], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``conflict_wait_seconds=1`` against a handler gated well past it: the duplicate polls,
    gets 409 once its second is up, and leaves the record in progress, untouched; the first
    request completes as usual and a later retry gets its replay.
    """
    runs = RunLog(tmp_path / "runs.log")
    monkeypatch.setenv("IDEM_HARNESS_RUN_LOG", str(runs.path))
    layer = CountedReads(tmp_path / "store.sqlite3")
    events: list[IdempotencyEvent] = []
    harness = make(layer, conflict_wait_seconds=1, on_event=events.append)
    key = new_key("runs-out")
    gate = tmp_path / "gate"
    headers = [("Idempotency-Key", key)]

    def post() -> Reply:
        return harness.request("POST", slow_path(gate), headers=headers)

    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(post)
        try:
            runs.wait_for_start(key)
            reads_before, sent = layer.reads, time.monotonic()
            duplicate = post()
            waited = time.monotonic() - sent
            polls = layer.reads - reads_before

            problem = assert_problem(duplicate, 409, "idempotency_key_in_use")
            assert "still being processed" in problem["detail"]
            retry_after = duplicate.header("retry-after")
            assert retry_after is not None
            assert 1 <= int(retry_after) <= IdempotencyConfig().in_progress_expires_after_seconds
            assert waited >= 0.95, "the 409 came before the wait was over"
            # More than once: it polled through its wait (a stalled machine may allow few polls).
            assert polls >= 2, f"the duplicate polled {polls} time(s) in its wait"
            # Untouched by the duplicate: still the first request's, in progress.
            assert [event.name for event in events] == ["claimed", "conflict"]
            stored_key = events[0].key
            assert stored_key is not None
            assert layer.get_record(stored_key).status == STATUS_INPROGRESS
            assert not first.done()
        finally:
            gate.touch()
        original = first.result()

    assert original.status == 201, original.body
    assert not original.replayed
    assert layer.get_record(stored_key).status == STATUS_COMPLETED
    assert_replay_of(post(), original)
    assert [event.name for event in events] == ["claimed", "conflict", "completed", "replayed"]
    assert len(runs.pids("start", key)) == len(runs.pids("end", key)) == 1


# In process: a client gone while waiting, ASGI driven directly ----------------------------------


def asgi_scope(key: str, gate: Path) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "path": "/slow",
        "raw_path": b"/slow",
        "query_string": slow_path(gate).partition("?")[2].encode(),
        "root_path": "",
        "scheme": "http",
        "server": ("testserver", 80),
        "client": ("127.0.0.1", 1234),
        "headers": [(b"idempotency-key", key.encode()), (b"content-length", b"0")],
    }


def counting_reads(layer: BasePersistenceLayer) -> Callable[[], int]:
    """Counts the layer's store reads from now on (each poll of a waiting duplicate is one)."""
    reads = 0
    primitive = layer._get_record

    def counted(idempotency_key: str) -> Any:
        nonlocal reads
        reads += 1
        return primitive(idempotency_key)

    layer._get_record = counted  # type: ignore[method-assign]
    if layer.native_async:  # under ASGI its polls read through the native async primitive
        aprimitive = layer._aget_record

        async def acounted(idempotency_key: str) -> Any:
            nonlocal reads
            reads += 1
            return await aprimitive(idempotency_key)

        layer._aget_record = acounted  # type: ignore[method-assign]
    return lambda: reads


async def until(condition: Callable[[], object]) -> None:
    # The conditions are a file and a counter other threads change: there is nothing to await.
    while not condition():  # noqa: ASYNC110
        await anyio.sleep(0.01)


@pytest.mark.parametrize("store", ["memory", "sqlite"])
@pytest.mark.parametrize("gone", ["sends_dropped", "sends_raise", "app_cancelled"])
def test_a_client_gone_while_waiting_releases_nothing_under_asgi(
    store: str, gone: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The duplicate's client hangs up once it polls: its server then answers ``receive`` with
    ``http.disconnect`` and drops its sends (uvicorn), or raises ``OSError`` on them (ASGI
    2.4), or cancels the app. The waiter releases nothing and claims nothing; the first
    request completes, and a later retry gets its replay: one execution.
    """
    runs = RunLog(tmp_path / "runs.log")
    monkeypatch.setenv("IDEM_HARNESS_RUN_LOG", str(runs.path))
    layer: BasePersistenceLayer = (
        InMemoryPersistenceLayer()
        if store == "memory"
        else SQLitePersistenceLayer(str(tmp_path / "store.sqlite3"))
    )
    events: list[IdempotencyEvent] = []
    app = IdempotencyMiddleware(
        build_asgi_app(AppState()),
        persistence_layer=layer,
        config=IdempotencyConfig(conflict_wait_seconds=WAIT_SECONDS, on_event=events.append),
    )
    reads = counting_reads(layer)
    key = new_key("asgi-gone")
    gate = tmp_path / "gate"
    first, waiter = ASGIClient(body=b""), ASGIClient(body=b"")
    waiter_raised: list[BaseException] = []

    async def run_waiter(cancel_scope: anyio.CancelScope) -> None:
        with cancel_scope:
            try:
                await app(asgi_scope(key, gate), waiter.receive, waiter.send)
            except OSError as error:
                waiter_raised.append(error)

    async def main() -> None:
        with anyio.fail_after(20):
            async with anyio.create_task_group() as group:
                group.start_soon(app, asgi_scope(key, gate), first.receive, first.send)
                await until(lambda: runs.pids("start", key))
                reads_before = reads()
                waiter_scope = anyio.CancelScope()
                group.start_soon(run_waiter, waiter_scope)
                await until(lambda: reads() >= reads_before + 3)  # it polls
                assert not waiter.sent, "the waiter was answered before the first completed"
                if gone == "app_cancelled":
                    waiter_scope.cancel()
                else:
                    waiter.disconnect(fail_sends=gone == "sends_raise")
                gate.touch()
            assert waiter_scope.cancelled_caught == (gone == "app_cancelled")

    anyio.run(main)

    assert first.status == 201, first.body_received
    assert (b"idempotent-replayed", b"true") not in first.headers
    assert not waiter.sent  # nothing reached the client that left
    assert all(isinstance(error, OSError) for error in waiter_raised)
    names = [event.name for event in events]
    assert names.count("claimed") == 1, names
    assert names.count("completed") == 1, names
    assert not {"released", "lease_lost", "conflict"} & set(names), names
    stored_key = events[0].key
    assert stored_key is not None
    assert layer.get_record(stored_key).status == STATUS_COMPLETED

    later = ASGIClient(body=b"")
    anyio.run(app, asgi_scope(key, gate), later.receive, later.send)
    assert later.status == 201
    assert (b"idempotent-replayed", b"true") in later.headers
    assert later.body_received == first.body_received
    assert len(runs.pids("start", key)) == len(runs.pids("end", key)) == 1
