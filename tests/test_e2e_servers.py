"""End to end: the example apps on real servers (uvicorn, gunicorn), with DynamoDB Local as the
store, hit by concurrent clients over loopback.

The example apps keep their ledger in an SQLite file shared by every worker process, and
``GET /_stats`` counts the payments created: how many times the handler really ran, whichever
process ran it. The card charge is slowed down (``EXAMPLE_CHARGE_DELAY_SECONDS``) so that the
concurrent retries arrive while the first request is still in flight.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tooling.servers import Server, running, start_gunicorn, start_uvicorn

pytestmark = pytest.mark.e2e

FASTAPI_APP = "example_apps.fastapi_app:app"
FLASK_APP = "example_apps.flask_app:app"

CONCURRENT_RETRIES = 50
DISTINCT_KEYS = 10
CHARGE_DELAY_SECONDS = "0.3"
PAYMENT = {"amount": 1250, "currency": "EUR", "description": "order 1234"}
# Fields that describe one transmission: a replay legitimately carries fresh ones.
PER_TRANSMISSION_HEADERS = {"date", "server", "connection", "keep-alive", "idempotent-replayed"}


@dataclass(frozen=True)
class Deployment:
    """An example app on a server, the way it would be deployed."""

    server: str  # "uvicorn" or "gunicorn"
    app: str
    workers: int = 1
    threads: int = 1

    def start(
        self, env: Mapping[str, str], log_dir: Path, *, uvicorn_args: Sequence[str] = ()
    ) -> Server:
        if self.server == "uvicorn":
            return start_uvicorn(
                self.app, env=env, log_dir=log_dir, workers=self.workers, extra_args=uvicorn_args
            )
        return start_gunicorn(
            self.app, env=env, log_dir=log_dir, workers=self.workers, threads=self.threads
        )


UVICORN_FASTAPI = Deployment("uvicorn", FASTAPI_APP)
UVICORN_2_WORKERS_FASTAPI = Deployment("uvicorn", FASTAPI_APP, workers=2)
GUNICORN_THREADS_FLASK = Deployment("gunicorn", FLASK_APP, threads=8)
GUNICORN_2_WORKERS_FLASK = Deployment("gunicorn", FLASK_APP, workers=2, threads=4)
# One of each kind of server, for the tests that are not about several processes.
SINGLE_PROCESS = [
    pytest.param(UVICORN_FASTAPI, id="uvicorn-fastapi"),
    pytest.param(GUNICORN_THREADS_FLASK, id="gunicorn-8threads-flask"),
]


def app_env(tmp_path: Path, **store: str) -> dict[str, str]:
    return {
        "EXAMPLE_LEDGER_PATH": str(tmp_path / "ledger.sqlite3"),
        "EXAMPLE_CHARGE_DELAY_SECONDS": CHARGE_DELAY_SECONDS,
        "LOG_LEVEL": "DEBUG",  # the middleware logs each decision, with the worker's pid
        **store,
    }


def dynamodb_env(tmp_path: Path, endpoint: str, table: str) -> dict[str, str]:
    return app_env(
        tmp_path,
        # Short client timeouts, as a payments API wants them: an unreachable store is a fast
        # 503, not a minute of retries.
        IDEM_STORE_URL=f"dynamodb://{table}?region=us-east-1&endpoint_url={endpoint}"
        "&connect_timeout=1&read_timeout=3&max_attempts=2",
    )


def auth(user: str, key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {user}", "Idempotency-Key": key}


async def post_all(
    base_url: str, requests: list[tuple[dict[str, str], dict[str, Any]]]
) -> list[httpx.Response]:
    """POST every request to /payments at once, each on its own connection."""
    limits = httpx.Limits(max_connections=len(requests), max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=30) as client:
        return list(
            await asyncio.gather(
                *(client.post("/payments", headers=h, json=body) for h, body in requests)
            )
        )


def stats(server: Server) -> dict[str, int]:
    response = httpx.get(f"{server.base_url}/_stats", timeout=10)
    response.raise_for_status()
    result: dict[str, int] = response.json()
    return result


def end_to_end_headers(response: httpx.Response) -> list[tuple[str, str]]:
    return sorted(
        (name, value)
        for name, value in response.headers.multi_items()
        if name not in PER_TRANSMISSION_HEADERS
    )


def assert_exactly_once(responses: list[httpx.Response]) -> httpx.Response:
    """One response ran the handler; every other one is a byte-identical replay of it or a 409
    asking to retry later. Returns the original.
    """
    originals = [
        r for r in responses if "idempotent-replayed" not in r.headers and r.status_code != 409
    ]
    assert [r.status_code for r in originals] == [201], [(r.status_code, r.text) for r in responses]
    original = originals[0]
    for response in responses:
        if response is original:
            continue
        if response.status_code == 409:
            assert response.headers["content-type"] == "application/problem+json"
            assert int(response.headers["retry-after"]) >= 1
            assert response.json()["code"] == "idempotency_key_in_use"
        else:
            assert response.status_code == 201, response.text
            assert response.headers["idempotent-replayed"] == "true"
            assert response.content == original.content
            assert end_to_end_headers(response) == end_to_end_headers(original)
    return original


#: Bursts until every worker has decided on some retry: bounded in count and in time.
MAX_BURSTS = 40
BURSTS_SECONDS = 60.0


def exercise_exactly_once(server: Server) -> None:
    """50 concurrent retries of one payment, then a late retry, another user with the same key,
    and concurrent payments with distinct keys.
    """
    # The kernel chooses which worker accepts each connection: a burst may land on one worker
    # (the one that woke first takes the whole backlog). So bursts go on, a new key each and
    # each exactly once, until every worker has decided on some retry (with LOG_LEVEL=DEBUG
    # every worker logs its decisions) and some retry overlapped a running first request. Only
    # a burst count or time bound far beyond what the scheduler needs ends the loop early.
    deadline = time.monotonic() + BURSTS_SECONDS
    burst = 0
    deciding_pids: set[int] = set()
    overlapped = False
    while burst < MAX_BURSTS and (burst == 0 or time.monotonic() < deadline):
        burst += 1
        key = f"order-{uuid.uuid4()}"
        responses = asyncio.run(
            post_all(server.base_url, [(auth("alice", key), PAYMENT)] * CONCURRENT_RETRIES)
        )
        original = assert_exactly_once(responses)
        # A retry that came while the first one ran was told 409 (a loaded machine may serve
        # a whole burst one request after the other; the next burst then overlaps).
        overlapped = overlapped or any(r.status_code == 409 for r in responses)
        assert stats(server)["payments_created"] == burst
        deciding_pids = {
            int(pid) for pid in re.findall(r"\[(\d+)\] DEBUG idem_middleware", server.log())
        }
        if overlapped and deciding_pids == server.worker_pids:
            break
    assert overlapped, f"the retries never overlapped in {burst} bursts"
    assert deciding_pids == server.worker_pids, (
        f"some worker never saw the retries in {burst} bursts"
    )

    # A retry after completion is a replay, whichever worker answers it.
    late = httpx.post(f"{server.base_url}/payments", headers=auth("alice", key), json=PAYMENT)
    assert late.status_code == 201
    assert late.headers["idempotent-replayed"] == "true"
    assert late.content == original.content
    payment_id = original.json()["id"]
    fetched = httpx.get(f"{server.base_url}/payments/{payment_id}", headers=auth("alice", key))
    assert fetched.json()["id"] == payment_id

    # The key is scoped to the user: bob's "same" key is another payment.
    bob = httpx.post(f"{server.base_url}/payments", headers=auth("bob", key), json=PAYMENT)
    assert bob.status_code == 201
    assert "idempotent-replayed" not in bob.headers
    assert bob.json()["id"] != payment_id

    # Distinct keys are never merged, however concurrent.
    distinct = asyncio.run(
        post_all(
            server.base_url,
            [(auth("carol", f"k-{uuid.uuid4()}"), PAYMENT) for _ in range(DISTINCT_KEYS)],
        )
    )
    assert [r.status_code for r in distinct] == [201] * DISTINCT_KEYS
    assert not any("idempotent-replayed" in r.headers for r in distinct)
    assert len({r.json()["id"] for r in distinct}) == DISTINCT_KEYS
    assert stats(server)["payments_created"] == burst + 1 + DISTINCT_KEYS
    assert "Traceback" not in server.log()


@pytest.mark.dynamodb
@pytest.mark.parametrize(
    "deployment",
    [
        pytest.param(UVICORN_FASTAPI, id="uvicorn-fastapi"),
        pytest.param(GUNICORN_THREADS_FLASK, id="gunicorn-8threads-flask"),
        pytest.param(UVICORN_2_WORKERS_FASTAPI, id="uvicorn-2workers-fastapi"),
        pytest.param(GUNICORN_2_WORKERS_FLASK, id="gunicorn-2workers-4threads-flask"),
    ],
)
def test_concurrent_retries_run_the_handler_once_dynamodb(
    deployment: Deployment, tmp_path: Path, dynamodb_endpoint: str, dynamodb_table: str
) -> None:
    env = dynamodb_env(tmp_path, dynamodb_endpoint, dynamodb_table)
    with running(deployment.start(env, tmp_path)) as server:
        assert len(server.worker_pids) == deployment.workers
        exercise_exactly_once(server)


@pytest.mark.skipif(
    importlib.util.find_spec("idem_middleware.persistence.sqlite") is None,
    reason="the SQLite persistence layer is not written yet",
)
@pytest.mark.parametrize(
    "deployment",
    [
        pytest.param(GUNICORN_2_WORKERS_FLASK, id="gunicorn-2workers-4threads-flask"),
    ],
)
def test_concurrent_retries_run_the_handler_once_sqlite_across_processes(
    deployment: Deployment, tmp_path: Path
) -> None:
    env = app_env(tmp_path, IDEM_STORE_URL=f"sqlite:///{tmp_path}/idem.sqlite3")
    with running(deployment.start(env, tmp_path)) as server:
        assert len(server.worker_pids) == deployment.workers
        exercise_exactly_once(server)


# Faults -------------------------------------------------------------------------------------


def unreachable_dynamodb_env(tmp_path: Path, port: int, on_store_error: str) -> dict[str, str]:
    env = dynamodb_env(tmp_path, f"http://127.0.0.1:{port}", "idempotency")
    env["IDEM_ON_STORE_ERROR"] = on_store_error
    env["EXAMPLE_CHARGE_DELAY_SECONDS"] = "0"
    return env


@pytest.mark.parametrize("deployment", SINGLE_PROCESS)
def test_store_unreachable_rejects_with_503_and_never_runs_the_handler(
    deployment: Deployment, tmp_path: Path, closed_port: int
) -> None:
    env = unreachable_dynamodb_env(tmp_path, closed_port, "reject")
    # A store unusable at startup fails an ASGI server's startup (tests/test_hardening_adapters.py);
    # without lifespan, uvicorn serves as it would after the store went away.
    with running(deployment.start(env, tmp_path, uvicorn_args=["--lifespan", "off"])) as server:
        for attempt in range(2):
            response = httpx.post(
                f"{server.base_url}/payments", headers=auth("alice", "order-1"), json=PAYMENT
            )
            assert response.status_code == 503, (attempt, response.text)
            assert response.headers["content-type"] == "application/problem+json"
            assert int(response.headers["retry-after"]) >= 1
            problem = response.json()
            assert problem["status"] == 503
            assert problem["code"] == "idempotency_store_unavailable"
        assert stats(server)["payments_created"] == 0
        log = server.log()
        assert "store_error" in log
        assert "Traceback" not in log


@pytest.mark.parametrize("deployment", SINGLE_PROCESS)
def test_store_unreachable_passthrough_runs_the_handler_and_logs_a_warning(
    deployment: Deployment, tmp_path: Path, closed_port: int
) -> None:
    env = unreachable_dynamodb_env(tmp_path, closed_port, "passthrough")
    with running(deployment.start(env, tmp_path)) as server:
        for _ in range(2):
            response = httpx.post(
                f"{server.base_url}/payments", headers=auth("alice", "order-1"), json=PAYMENT
            )
            assert response.status_code == 201, response.text
            assert "idempotent-replayed" not in response.headers
        # Passthrough trades deduplication for availability: both tries ran the handler.
        assert stats(server)["payments_created"] == 2
        warnings = [
            line
            for line in server.log().splitlines()
            if "WARNING" in line and "idem_middleware" in line and "store_error" in line
        ]
        assert len(warnings) == 2, server.log()
        assert all("running un-deduplicated" in line for line in warnings)
        assert "Traceback" not in server.log()


# A client that gives up and retries ---------------------------------------------------------


@pytest.mark.dynamodb
@pytest.mark.parametrize("deployment", SINGLE_PROCESS)
def test_client_timeout_then_retries_until_replayed(
    deployment: Deployment, tmp_path: Path, dynamodb_endpoint: str, dynamodb_table: str
) -> None:
    """The textbook case: the client times out while the payment is being charged, retries at
    once (409, Retry-After), honours Retry-After, and gets the payment it had asked for.
    """
    env = dynamodb_env(tmp_path, dynamodb_endpoint, dynamodb_table)
    # The charge outlasts the client's patience by far, so the retry finds it still running
    # however slowly a loaded machine serves it.
    env["EXAMPLE_CHARGE_DELAY_SECONDS"] = "3"
    url, headers = "/payments", auth("alice", "order-timeout")
    with running(deployment.start(env, tmp_path)) as server:
        with httpx.Client(base_url=server.base_url, timeout=10) as client:
            with pytest.raises(httpx.ReadTimeout):
                client.post(url, headers=headers, json=PAYMENT, timeout=0.5)
            # The first request holds the key (a slow server may not have read it yet).
            deadline = time.monotonic() + 30
            while "idempotency claimed " not in server.log():
                assert time.monotonic() < deadline, "the first request never claimed the key"
                time.sleep(0.02)
            response = client.post(url, headers=headers, json=PAYMENT)
            assert response.status_code == 409, response.text
            for _ in range(10):
                if response.status_code != 409:
                    break
                time.sleep(int(response.headers["retry-after"]))
                response = client.post(url, headers=headers, json=PAYMENT)
        assert response.status_code == 201, response.text
        assert response.headers["idempotent-replayed"] == "true"
        assert response.json()["amount"] == PAYMENT["amount"]
        assert stats(server)["payments_created"] == 1


# HTTP details on real servers ---------------------------------------------------------------


@pytest.mark.parametrize("deployment", SINGLE_PROCESS)
def test_key_forms_repeated_keys_and_chunked_bodies(deployment: Deployment, tmp_path: Path) -> None:
    env = app_env(tmp_path, IDEM_STORE_URL="memory://")
    env["EXAMPLE_CHARGE_DELAY_SECONDS"] = "0"
    with (
        running(deployment.start(env, tmp_path)) as server,
        httpx.Client(base_url=server.base_url, timeout=10) as client,
    ):
        bearer = {"Authorization": "Bearer alice"}
        # A repeated Idempotency-Key field is refused, even where the server joins the values.
        repeated = client.post(
            "/payments",
            headers=[*bearer.items(), ("Idempotency-Key", "a"), ("Idempotency-Key", "b")],
            json=PAYMENT,
        )
        assert repeated.status_code == 400
        assert repeated.json()["code"] == "idempotency_key_invalid"

        # The sf-string form and the bare form name the same key.
        bare = client.post("/payments", headers={**bearer, "Idempotency-Key": "abc"}, json=PAYMENT)
        quoted = client.post(
            "/payments", headers={**bearer, "Idempotency-Key": '"abc"'}, json=PAYMENT
        )
        assert bare.status_code == 201
        assert quoted.headers["idempotent-replayed"] == "true"
        assert quoted.content == bare.content

        # A chunked request body (no Content-Length) is read whole, fingerprinted and replayed.
        body = json.dumps({**PAYMENT, "amount": 777}).encode()

        def chunks() -> Iterator[bytes]:
            yield body[:10]
            yield body[10:]

        chunked_headers = {
            **bearer,
            "Idempotency-Key": "chunked",
            "Content-Type": "application/json",
        }
        first = client.post("/payments", headers=chunked_headers, content=chunks())
        assert first.status_code == 201, first.text
        assert first.json()["amount"] == 777
        retry = client.post("/payments", headers=chunked_headers, content=chunks())
        assert retry.headers["idempotent-replayed"] == "true"
        assert retry.content == first.content
        same_bytes = client.post("/payments", headers=chunked_headers, content=body)
        assert same_bytes.headers["idempotent-replayed"] == "true"

        assert stats(server)["payments_created"] == 2
        assert "Traceback" not in server.log()


def test_uvicorn_root_path_keeps_payments_idempotent(tmp_path: Path) -> None:
    """Behind a proxy that strips a prefix, ``uvicorn --root-path /api`` puts the prefix into
    ``scope["path"]`` (Starlette routes on the path without it). ``include_paths`` name the
    app's own routes, so they must be matched without the prefix, as WSGI's PATH_INFO is.

    Fails: the middleware matches ``scope["path"]`` ("/api/payments"), covers nothing, and the
    retry charges the card a second time.
    """
    env = app_env(tmp_path, IDEM_STORE_URL="memory://")
    env["EXAMPLE_CHARGE_DELAY_SECONDS"] = "0"
    server = start_uvicorn(
        FASTAPI_APP, env=env, log_dir=tmp_path, extra_args=["--root-path", "/api"]
    )
    with running(server), httpx.Client(base_url=server.base_url, timeout=10) as client:
        headers = auth("alice", "order-1")
        first = client.post("/payments", headers=headers, json=PAYMENT)
        retry = client.post("/payments", headers=headers, json=PAYMENT)
        assert first.status_code == 201
        assert retry.headers.get("idempotent-replayed") == "true", "the retry charged again"
        assert stats(server)["payments_created"] == 1
