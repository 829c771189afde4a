"""The three example apps in process (httpx's ASGITransport, Flask's test client), memory store.

Each test gets freshly imported apps: a new in-memory idempotency store and a new ledger.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from example_apps import store
from idem_middleware import IdempotencyRequest
from idem_middleware.persistence import InMemoryPersistenceLayer
from idem_middleware.request import Headers

ROOT = Path(__file__).resolve().parents[1]
APPS = ["fastapi", "starlette", "flask"]
PAYMENT = {"amount": 1250, "currency": "EUR", "description": "order 1234"}


@dataclass
class Reply:
    status: int
    headers: httpx.Headers
    body: bytes

    def json(self) -> Any:
        return httpx.Response(self.status, content=self.body).json()

    @property
    def replayed(self) -> bool:
        return self.headers.get("idempotent-replayed") == "true"


class Api:
    """One example app behind a synchronous client, whatever its protocol."""

    def __init__(self, call: Callable[[str, str, Any, dict[str, str]], Reply]) -> None:
        self._call = call

    def post(
        self, path: str, json: Any = None, *, user: str | None = "alice", key: str | None = None
    ) -> Reply:
        return self._call("POST", path, json, _headers(user, key))

    def get(self, path: str, *, user: str | None = "alice", key: str | None = None) -> Reply:
        return self._call("GET", path, None, _headers(user, key))

    def stats(self) -> dict[str, int]:
        result: dict[str, int] = self.get("/_stats").json()
        return result


def _headers(user: str | None, key: str | None) -> dict[str, str]:
    headers = {}
    if user is not None:
        headers["Authorization"] = f"Bearer {user}"
    if key is not None:
        headers["Idempotency-Key"] = key
    return headers


def asgi_api(app: Any) -> Api:
    def call(method: str, path: str, json: Any, headers: dict[str, str]) -> Reply:
        async def send() -> httpx.Response:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
                return await c.request(method, path, json=json, headers=headers)

        response = asyncio.run(send())
        return Reply(response.status_code, response.headers, response.content)

    return Api(call)


def wsgi_api(app: Any) -> Api:
    from werkzeug.test import Client

    client = Client(app)

    def call(method: str, path: str, json: Any, headers: dict[str, str]) -> Reply:
        response = client.open(path, method=method, json=json, headers=headers)
        return Reply(
            response.status_code, httpx.Headers(list(response.headers.items())), response.data
        )

    return Api(call)


@pytest.fixture
def fresh_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The apps' defaults: memory store, in-memory ledger, no charge delay."""
    for name in list(os.environ):
        if name.startswith(("IDEM_", "EXAMPLE_")):
            monkeypatch.delenv(name)


def load(name: str) -> ModuleType:
    """The example app module, imported afresh: new store, new ledger."""
    return importlib.reload(importlib.import_module(f"example_apps.{name}_app"))


def api_for(name: str, wrap: Callable[[Any], Any] = lambda app: app) -> Api:
    app = wrap(load(name).app)
    return wsgi_api(app) if name == "flask" else asgi_api(app)


@pytest.fixture(params=APPS)
def api(request: pytest.FixtureRequest, fresh_env: None) -> Api:
    return api_for(request.param)


# Payments -----------------------------------------------------------------------------------


def test_create_payment(api: Api) -> None:
    created = api.post("/payments", PAYMENT, key="order-1")
    assert created.status == 201
    payment = created.json()
    assert payment["id"].startswith("pay_")
    assert (payment["amount"], payment["currency"], payment["status"]) == (1250, "EUR", "succeeded")
    assert created.headers["location"] == f"/payments/{payment['id']}"
    assert not created.replayed

    fetched = api.get(f"/payments/{payment['id']}")
    assert fetched.status == 200
    assert fetched.json()["id"] == payment["id"]
    assert api.stats() == {"payments_created": 1, "refunds_created": 0, "exports_created": 0}


def test_retry_is_a_byte_identical_replay(api: Api) -> None:
    first = api.post("/payments", PAYMENT, key="order-1")
    retry = api.post("/payments", PAYMENT, key="order-1")
    assert retry.status == 201
    assert retry.replayed
    assert retry.body == first.body
    assert retry.headers["location"] == first.headers["location"]
    assert retry.headers["content-type"] == first.headers["content-type"]
    assert api.stats()["payments_created"] == 1


def test_same_key_two_users_are_two_payments(api: Api) -> None:
    alice = api.post("/payments", PAYMENT, user="alice", key="order-1")
    bob = api.post("/payments", PAYMENT, user="bob", key="order-1")
    assert (alice.status, bob.status) == (201, 201)
    assert not alice.replayed
    assert not bob.replayed
    assert alice.json()["id"] != bob.json()["id"]
    assert api.stats()["payments_created"] == 2
    # Each user replays their own payment, and cannot see the other's.
    assert api.post("/payments", PAYMENT, user="bob", key="order-1").body == bob.body
    assert api.get(f"/payments/{alice.json()['id']}", user="bob").status == 404


def test_same_key_with_a_changed_body_is_422(api: Api) -> None:
    first = api.post("/payments", PAYMENT, key="order-1")
    changed = api.post("/payments", {**PAYMENT, "amount": 9999}, key="order-1")
    assert changed.status == 422
    assert changed.headers["content-type"] == "application/problem+json"
    assert changed.json()["code"] == "idempotency_key_reused"
    assert api.stats()["payments_created"] == 1
    # The stored record is untouched: the original request still replays.
    assert api.post("/payments", PAYMENT, key="order-1").body == first.body


def test_payment_without_a_key_is_400(api: Api) -> None:
    response = api.post("/payments", PAYMENT)
    assert response.status == 400
    assert response.json()["code"] == "idempotency_key_missing"
    assert api.stats()["payments_created"] == 0


def test_invalid_payment_is_422_and_its_answer_is_replayed(api: Api) -> None:
    invalid = api.post("/payments", {"amount": -5, "currency": "EUR"}, key="order-1")
    assert invalid.status == 422
    assert "detail" in invalid.json()  # the app's own validation error, not the middleware's
    retry = api.post("/payments", {"amount": -5, "currency": "EUR"}, key="order-1")
    assert retry.replayed
    assert retry.body == invalid.body
    assert api.stats()["payments_created"] == 0


@pytest.mark.parametrize(
    "body",
    [
        {"amount": 1250, "currency": "XXX"},
        {"amount": 0, "currency": "EUR"},
        {"amount": "12.50", "currency": "EUR"},
        {"currency": "EUR"},
        {"amount": 1250, "currency": "EUR", "description": "x" * 201},
    ],
)
def test_payment_validation(api: Api, body: dict[str, Any]) -> None:
    assert api.post("/payments", body, key="order-1").status == 422


def test_unauthenticated_payment_is_401(api: Api) -> None:
    response = api.post("/payments", PAYMENT, user=None, key="order-1")
    assert response.status == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert api.stats()["payments_created"] == 0


def test_unknown_payment_is_404(api: Api) -> None:
    assert api.get("/payments/pay_missing").status == 404
    assert api.post("/payments/pay_missing/refunds", key="refund-1").status == 404


def test_refunds(api: Api) -> None:
    payment = api.post("/payments", PAYMENT, key="order-1").json()
    refunds = f"/payments/{payment['id']}/refunds"

    partial = api.post(refunds, {"amount": 250}, key="refund-1")
    assert partial.status == 201
    assert partial.json()["amount"] == 250
    retry = api.post(refunds, {"amount": 250}, key="refund-1")
    assert retry.replayed
    assert retry.body == partial.body

    rest = api.post(refunds, key="refund-2")  # no body: refund what is left
    assert rest.status == 201
    assert rest.json()["amount"] == 1000
    assert api.post(refunds, {"amount": 1}, key="refund-3").status == 422  # nothing left
    assert api.get(f"/payments/{payment['id']}").json()["status"] == "refunded"
    assert api.stats() == {"payments_created": 1, "refunds_created": 2, "exports_created": 0}


def test_reads_are_not_covered(api: Api) -> None:
    api.get("/health", key="k")
    health = api.get("/health", key="k")
    assert health.status == 200
    assert not health.replayed
    assert health.json()["status"] == "ok"


# Streamed exports ---------------------------------------------------------------------------


def test_export_is_streamed_once_and_replayed_whole(api: Api) -> None:
    api.post("/payments", PAYMENT, key="order-1")
    first = api.post("/exports", key="export-1")
    retry = api.post("/exports", key="export-1")
    assert first.status == 201
    assert first.headers["content-type"].startswith("text/csv")
    lines = first.body.decode().splitlines()
    assert lines[0].startswith(f"# export {first.headers['x-export-id']}")
    assert lines[1] == "payment_id,amount,currency,created"
    assert lines[2].startswith("pay_")
    assert ",1250,EUR," in lines[2]
    assert lines[-1].endswith(": 1 payments")
    assert retry.replayed
    assert retry.body == first.body
    assert retry.headers["x-export-id"] == first.headers["x-export-id"]
    assert api.post("/exports").status == 400  # a key is required here too
    assert api.stats()["exports_created"] == 1


def test_conflict_wait_comes_from_the_environment() -> None:
    assert store.conflict_wait_seconds_from_env({}) == 0
    assert store.conflict_wait_seconds_from_env({"IDEM_CONFLICT_WAIT_SECONDS": "2.5"}) == 2.5
    for bad in ("-1", "soon", "nan", "inf"):
        with pytest.raises(ValueError, match="IDEM_CONFLICT_WAIT_SECONDS"):
            store.conflict_wait_seconds_from_env({"IDEM_CONFLICT_WAIT_SECONDS": bad})


@pytest.mark.parametrize("name", APPS)
def test_apps_let_duplicates_wait_when_told(
    name: str, fresh_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IDEM_CONFLICT_WAIT_SECONDS", "3")
    module = load(name)
    middleware = module.app.wsgi_app if name == "flask" else None
    if middleware is None:
        middleware = next(
            m for m in module.app.user_middleware if m.cls.__name__ == "IdempotencyMiddleware"
        )
        config = middleware.kwargs["config"]
    else:
        config = middleware.engine.config
    assert config.conflict_wait_seconds == 3


# Mounted under a prefix ---------------------------------------------------------------------


def mount_asgi(app: Any) -> Any:
    from starlette.applications import Starlette
    from starlette.routing import Mount

    return Starlette(routes=[Mount("/v1", app=app)])


def mount_wsgi(app: Any) -> Any:
    from werkzeug.middleware.dispatcher import DispatcherMiddleware
    from werkzeug.wrappers import Response

    return DispatcherMiddleware(Response("not found", status=404), {"/v1": app})


@pytest.mark.parametrize("name", APPS)
def test_app_mounted_under_a_prefix_is_still_idempotent(name: str, fresh_env: None) -> None:
    """An app served below a prefix (a Starlette ``Mount``, a WSGI dispatcher, a proxy with
    ``--root-path``) keeps ``include_paths`` relative to its own routes, as WSGI's PATH_INFO is.

    Fails for the ASGI apps: the middleware matches ``include_paths`` against ``scope["path"]``,
    which includes ``root_path``, so nothing is covered and payments are charged twice.
    """
    api = api_for(name, mount_wsgi if name == "flask" else mount_asgi)
    first = api.post("/v1/payments", PAYMENT, key="order-1")
    retry = api.post("/v1/payments", PAYMENT, key="order-1")
    assert first.status == 201
    assert retry.replayed, "the retry ran the handler again"
    assert retry.body == first.body
    assert api.post("/v1/payments", PAYMENT).status == 400  # require_key still applies
    assert api.get("/v1/_stats").json()["payments_created"] == 1


# Store selection ----------------------------------------------------------------------------


def test_memory_store_is_the_default(fresh_env: None) -> None:
    assert isinstance(store.persistence_layer_from_env({}), InMemoryPersistenceLayer)


def test_store_url_names_the_store(tmp_path: Path) -> None:
    from idem_middleware.persistence import (
        DynamoDBPersistenceLayer,
        RedisPersistenceLayer,
        SQLitePersistenceLayer,
    )

    dynamodb = store.persistence_layer_from_env(
        {
            "IDEM_STORE_URL": "dynamodb://payments-idempotency?region=us-east-1"
            "&endpoint_url=http://127.0.0.1:8000&connect_timeout=1"
        }
    )
    assert isinstance(dynamodb, DynamoDBPersistenceLayer)
    assert dynamodb.table_name == "payments-idempotency"
    assert dynamodb.client.meta.endpoint_url == "http://127.0.0.1:8000"
    sqlite = store.persistence_layer_from_env(
        {"IDEM_STORE_URL": f"sqlite:///{tmp_path}/idem.sqlite3"}
    )
    assert isinstance(sqlite, SQLitePersistenceLayer)
    assert sqlite.path == f"{tmp_path}/idem.sqlite3"
    redis = store.persistence_layer_from_env({"IDEM_STORE_URL": "redis://127.0.0.1:1/0"})
    assert isinstance(redis, RedisPersistenceLayer)


def test_unknown_store_and_policy_are_refused() -> None:
    with pytest.raises(ValueError, match="IDEM_STORE_URL: unknown store URL scheme 'mongodb'"):
        store.persistence_layer_from_env({"IDEM_STORE_URL": "mongodb://localhost"})
    with pytest.raises(ValueError, match="IDEM_ON_STORE_ERROR"):
        store.on_store_error_from_env({"IDEM_ON_STORE_ERROR": "ignore"})
    assert store.on_store_error_from_env({}) == "reject"
    assert store.on_store_error_from_env({"IDEM_ON_STORE_ERROR": "passthrough"}) == "passthrough"


def test_apps_import_no_optional_backend() -> None:
    """With the memory store, neither boto3 nor redis is imported (they are extras)."""
    code = (
        "import sys, example_apps.fastapi_app, example_apps.starlette_app, "
        "example_apps.flask_app; "
        "print(sorted(m for m in ('boto3', 'redis') if m in sys.modules))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IDEM_", "EXAMPLE_"))}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("authorization", "user"),
    [
        ("Bearer alice", "alice"),
        ("bearer alice", "alice"),
        ("Bearer ", None),
        ("Basic YWxpY2U6", None),
        (None, None),
    ],
)
def test_authenticated_user(authorization: str | None, user: str | None) -> None:
    assert store.authenticated_user(authorization) == user


def test_user_scope() -> None:
    def request(headers: list[tuple[str, str]]) -> IdempotencyRequest:
        return IdempotencyRequest("POST", "/payments", "", Headers(headers), b"")

    assert store.user_scope(request([("Authorization", "Bearer alice")])) == "user:alice"
    assert store.user_scope(request([])) == "anonymous"


def test_ledger_is_shared_by_processes(tmp_path: Path) -> None:
    """Two ledgers on one file (two worker processes) count the same payments."""
    path = str(tmp_path / "ledger.sqlite3")
    one, two = store.Ledger(path), store.Ledger(path)
    payment = one.create_payment("alice", store.NewPayment(500, "USD"))
    assert two.get_payment("alice", payment["id"])["amount"] == 500
    assert two.stats() == {"payments_created": 1, "refunds_created": 0, "exports_created": 0}
