"""What a handler sees of its request's idempotency: ``request.state.idempotency`` (FastAPI,
Starlette), ``flask.g.idempotency`` (the Flask extension) and the WSGI environ; and child keys
that stay the same when a retry runs the handler again.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi import Request as FastAPIRequest
from fastapi.responses import JSONResponse as FastAPIJSONResponse
from flask import Flask, g, request
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from idem_middleware import (
    IdempotencyConfig,
    IdempotencyMiddleware,
    IdempotencyRequest,
    IdempotencyState,
    IdempotencyWSGIMiddleware,
)
from idem_middleware.flask import Idempotency, current_idempotency
from idem_middleware.persistence import InMemoryPersistenceLayer
from idem_middleware.state import ENVIRON_KEY

FRAMEWORKS = ["fastapi", "starlette", "flask-extension", "flask-wrapped"]


def by_user(request: IdempotencyRequest) -> str:
    return request.headers.get("x-user", "anonymous")


CONFIG = IdempotencyConfig(scope=by_user)


class App:
    """``POST /pay``: answers what its handler saw; fails with 503 while ``failures`` lasts,
    as a handler whose downstream call timed out would.
    """

    def __init__(self, framework: str) -> None:
        self.framework = framework
        self.layer = InMemoryPersistenceLayer()
        self.failures = 0
        self.calls: Counter[str] = Counter()
        self.seen: list[dict[str, Any] | None] = []
        if framework == "fastapi":
            self.client: Any = TestClient(self._fastapi())
        elif framework == "starlette":
            self.client = TestClient(self._starlette())
        else:
            self.client = self._flask(extension=framework == "flask-extension").test_client()

    def handle(self, state: IdempotencyState | None) -> tuple[dict[str, Any], int]:
        self.calls["pay"] += 1
        seen = None
        if state is not None:
            seen = {
                "key": state.key,
                "first_execution": state.first_execution,
                "stripe": state.child_key("stripe"),
                "ledger": state.child_key("ledger"),
            }
        self.seen.append(seen)
        if self.failures:
            self.failures -= 1
            return {"error": "the payment provider timed out"}, 503
        return {"seen": seen}, 201

    def _fastapi(self) -> FastAPI:
        app = FastAPI()
        app.add_middleware(IdempotencyMiddleware, persistence_layer=self.layer, config=CONFIG)

        @app.post("/pay")
        def pay(request: FastAPIRequest) -> FastAPIJSONResponse:
            body, status = self.handle(getattr(request.state, "idempotency", None))
            return FastAPIJSONResponse(body, status_code=status)

        return app

    def _starlette(self) -> IdempotencyMiddleware:
        async def pay(request: Request) -> JSONResponse:
            body, status = self.handle(getattr(request.state, "idempotency", None))
            return JSONResponse(body, status_code=status)

        app = Starlette(routes=[Route("/pay", pay, methods=["POST"])])
        return IdempotencyMiddleware(app, persistence_layer=self.layer, config=CONFIG)

    def _flask(self, *, extension: bool) -> Flask:
        app = Flask("state")
        if extension:
            Idempotency(app, persistence_layer=self.layer, config=CONFIG)
        else:
            app.wsgi_app = IdempotencyWSGIMiddleware(  # type: ignore[method-assign]
                app.wsgi_app, persistence_layer=self.layer, config=CONFIG
            )

        @app.post("/pay")
        def pay() -> tuple[dict[str, Any], int]:
            state = g.idempotency if extension else request.environ.get(ENVIRON_KEY)
            assert state is current_idempotency()  # both ways name the same state
            return self.handle(state)

        return app

    def pay(self, key: str | None = None, user: str = "alice") -> tuple[int, Any]:
        headers = {"x-user": user}
        if key is not None:
            headers["Idempotency-Key"] = key
        response = self.client.post("/pay", json={"amount": 100}, headers=headers)
        payload = response.get_json() if self.framework.startswith("flask") else response.json()
        return response.status_code, payload


@pytest.fixture(params=FRAMEWORKS)
def app(request: pytest.FixtureRequest) -> Iterator[App]:
    built = App(request.param)
    if built.framework.startswith("flask"):
        yield built
    else:
        with built.client:
            yield built


def test_the_handler_sees_the_stored_key_and_its_first_execution(app: App) -> None:
    status, _ = app.pay("order-1")

    assert status == 201
    seen = app.seen[0]
    assert seen is not None
    assert seen["first_execution"] is True
    assert seen["key"] in app.layer._records  # the stored (hashed) key
    assert "order-1" not in seen["key"]  # never the client's raw key


def test_a_request_not_deduplicated_has_no_state(app: App) -> None:
    status, payload = app.pay(key=None)

    assert status == 201
    assert payload == {"seen": None}


def test_child_keys_are_stable_across_a_retry_that_runs_again(app: App) -> None:
    app.failures = 1  # the first execution fails: the key is released, the retry runs again

    failed, _ = app.pay("order-2")
    succeeded, payload = app.pay("order-2")
    replay_status, replay = app.pay("order-2")

    assert (failed, succeeded, replay_status) == (503, 201, 201)
    assert app.calls["pay"] == 2
    first, second = app.seen
    assert first is not None
    assert second is not None
    assert first["stripe"] == second["stripe"]  # the provider deduplicates the second charge
    assert first["ledger"] == second["ledger"]
    assert replay == payload


def test_child_keys_differ_by_name_key_and_scope(app: App) -> None:
    app.pay("order-3", user="alice")
    app.pay("order-4", user="alice")
    app.pay("order-3", user="bob")

    seen = [s for s in app.seen if s is not None]
    assert len(seen) == 3
    assert seen[0]["stripe"] != seen[0]["ledger"]
    assert len({s["stripe"] for s in seen}) == 3  # another key, or another principal


def test_child_key_is_a_deterministic_digest() -> None:
    state = IdempotencyState("idempotency#abc")

    assert state.child_key("stripe") == IdempotencyState("idempotency#abc").child_key("stripe")
    assert state.child_key("stripe") != IdempotencyState("idempotency#abd").child_key("stripe")
    assert len(state.child_key("stripe")) == 64
    assert state.child_key("stripe").isalnum()
    with pytest.raises(ValueError, match="name: must be a non-empty string"):
        state.child_key("")


def test_the_extension_refuses_a_second_init_on_one_app() -> None:
    app = Flask("twice")
    extension = Idempotency(app, persistence_layer=InMemoryPersistenceLayer())

    with pytest.raises(RuntimeError, match="already initialised"):
        extension.init_app(app)


def test_the_extension_with_an_app_factory() -> None:
    extension = Idempotency(persistence_layer=InMemoryPersistenceLayer())
    calls: Counter[str] = Counter()

    def create_app() -> Flask:
        app = Flask("factory")
        extension.init_app(app)

        @app.post("/pay")
        def pay() -> tuple[dict[str, Any], int]:
            calls["pay"] += 1
            return {"stripe": g.idempotency.child_key("stripe")}, 201

        return app

    client = create_app().test_client()
    first = client.post("/pay", headers={"Idempotency-Key": "k"})
    retry = client.post("/pay", headers={"Idempotency-Key": "k"})

    assert retry.headers["Idempotent-Replayed"] == "true"
    assert retry.get_json() == first.get_json()
    assert calls["pay"] == 1


def test_the_extension_refuses_a_layer_class() -> None:
    with pytest.raises(TypeError, match="persistence_layer"):
        Idempotency(persistence_layer=InMemoryPersistenceLayer)  # type: ignore[arg-type]
