"""The same app with ``@idempotent`` routes, three times: FastAPI, Starlette and Flask.

Each handler counts its executions in a shared ``Counter`` and answers 201 with what it saw of
its request's idempotency state (``request.state.idempotency`` / ``flask.g.idempotency``), so
tests can tell a replay (same body, count unchanged) from a second execution.

The middleware's config excludes ``/plain``; the decorator brings it back in.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi import Request as FastAPIRequest
from flask import Blueprint, Flask, g
from starlette.applications import Starlette
from starlette.endpoints import HTTPEndpoint
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from idem_middleware import (
    IdempotencyConfig,
    IdempotencyMiddleware,
    IdempotencyRequest,
    IdempotencyState,
    idempotent,
)
from idem_middleware.flask import Idempotency
from idem_middleware.persistence import BasePersistenceLayer, InMemoryPersistenceLayer

BASE_CONFIG = IdempotencyConfig(exclude_paths=("/plain",))
SHORT_EXPIRY_SECONDS = 30


def by_user(request: IdempotencyRequest) -> str:
    return request.headers.get("x-user", "anonymous")


# The per-route options, once for the three frameworks: path -> (methods, options or None).
OPTIONS: dict[str, Callable[[Any], Any]] = {
    "opted_out": idempotent(enabled=False),
    "plain": idempotent(),
    "strict": idempotent(require_key=True),
    "by_body": idempotent(key_source="body"),
    "by_order": idempotent(
        key_source="body", event_key_jmespath="order_id", payload_validation_jmespath="order_id"
    ),
    "short": idempotent(expires_after_seconds=SHORT_EXPIRY_SECONDS),
    "scoped": idempotent(scope=by_user),
    "put": idempotent(),
    "both": idempotent(),
    "item": idempotent(require_key=True),
}


def _summary(calls: Counter[str], name: str, state: IdempotencyState | None) -> dict[str, Any]:
    calls[name] += 1
    seen = None
    if state is not None:
        seen = {
            "key": state.key,
            "first_execution": state.first_execution,
            "stripe": state.child_key("stripe"),
            "ledger": state.child_key("ledger"),
        }
    return {"route": name, "count": calls[name], "state": seen}


def build_fastapi(
    calls: Counter[str],
    layer: BasePersistenceLayer | None = None,
    config: IdempotencyConfig = BASE_CONFIG,
) -> FastAPI:
    app = FastAPI()
    app.add_middleware(
        IdempotencyMiddleware,
        persistence_layer=layer or InMemoryPersistenceLayer(),
        config=config,
    )

    def handler(name: str) -> Callable[[FastAPIRequest], dict[str, Any]]:
        def serve(request: FastAPIRequest) -> dict[str, Any]:
            return _summary(calls, name, getattr(request.state, "idempotency", None))

        serve.__name__ = name
        return serve

    def route(path: str, name: str, methods: list[str], decorated: bool = True) -> None:
        endpoint = handler(name)
        if decorated:
            OPTIONS[name](endpoint)
        app.add_api_route(path, endpoint, methods=methods, status_code=201)

    route("/orders", "orders", ["POST"], decorated=False)
    route("/opted-out", "opted_out", ["POST"])
    route("/plain", "plain", ["POST"])
    route("/strict/{order_id}", "strict", ["POST"])
    route("/by-body", "by_body", ["POST"])
    route("/by-order", "by_order", ["POST"])
    route("/short", "short", ["POST"])
    route("/scoped", "scoped", ["POST"])
    route("/put", "put", ["PUT"])
    route("/both", "both", ["GET", "POST"])
    router = APIRouter(prefix="/api")
    router.add_api_route(
        "/items", OPTIONS["item"](handler("item")), methods=["POST"], status_code=201
    )
    app.include_router(router)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "pid": os.getpid()}

    return app


def build_starlette(
    calls: Counter[str],
    layer: BasePersistenceLayer | None = None,
    config: IdempotencyConfig = BASE_CONFIG,
) -> Starlette:
    def handler(name: str) -> Callable[[Request], Any]:
        async def serve(request: Request) -> JSONResponse:
            state = getattr(request.state, "idempotency", None)
            return JSONResponse(_summary(calls, name, state), status_code=201)

        serve.__name__ = name
        return serve

    def route(path: str, name: str, methods: list[str], decorated: bool = True) -> Route:
        endpoint = handler(name)
        return Route(path, OPTIONS[name](endpoint) if decorated else endpoint, methods=methods)

    class Both(HTTPEndpoint):
        """A class endpoint: only its decorated method is covered."""

        async def get(self, request: Request) -> JSONResponse:
            return JSONResponse(_summary(calls, "both", None), status_code=201)

        @idempotent()
        async def post(self, request: Request) -> JSONResponse:
            state = getattr(request.state, "idempotency", None)
            return JSONResponse(_summary(calls, "both", state), status_code=201)

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "pid": os.getpid()})

    return Starlette(
        routes=[
            route("/orders", "orders", ["POST"], decorated=False),
            route("/opted-out", "opted_out", ["POST"]),
            route("/plain", "plain", ["POST"]),
            route("/strict/{order_id}", "strict", ["POST"]),
            route("/by-body", "by_body", ["POST"]),
            route("/by-order", "by_order", ["POST"]),
            route("/short", "short", ["POST"]),
            route("/scoped", "scoped", ["POST"]),
            route("/put", "put", ["PUT"]),
            Route("/both", Both),
            Mount("/api", routes=[route("/items", "item", ["POST"])]),
            Route("/health", health),
        ],
        middleware=[
            Middleware(
                IdempotencyMiddleware,
                persistence_layer=layer or InMemoryPersistenceLayer(),
                config=config,
            )
        ],
    )


def build_flask(
    calls: Counter[str],
    layer: BasePersistenceLayer | None = None,
    config: IdempotencyConfig = BASE_CONFIG,
) -> Flask:
    app = Flask("decorated")
    Idempotency(app, persistence_layer=layer or InMemoryPersistenceLayer(), config=config)

    def handler(name: str) -> Callable[..., Any]:
        def serve(**_: Any) -> tuple[dict[str, Any], int]:
            return _summary(calls, name, g.idempotency), 201

        serve.__name__ = name
        return serve

    def route(path: str, name: str, methods: list[str], decorated: bool = True) -> None:
        endpoint = handler(name)
        app.add_url_rule(
            path, name, OPTIONS[name](endpoint) if decorated else endpoint, methods=methods
        )

    route("/orders", "orders", ["POST"], decorated=False)
    route("/opted-out", "opted_out", ["POST"])
    route("/plain", "plain", ["POST"])
    route("/strict/<order_id>", "strict", ["POST"])
    route("/by-body", "by_body", ["POST"])
    route("/by-order", "by_order", ["POST"])
    route("/short", "short", ["POST"])
    route("/scoped", "scoped", ["POST"])
    route("/put", "put", ["PUT"])
    route("/both", "both", ["GET", "POST"])
    blueprint = Blueprint("api", __name__, url_prefix="/api")
    blueprint.add_url_rule("/items", "item", OPTIONS["item"](handler("item")), methods=["POST"])
    app.register_blueprint(blueprint)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "pid": os.getpid()}

    return app


def fastapi_server_app() -> FastAPI:
    """For a real server: ``uvicorn --factory tests.support.decorated_apps:fastapi_server_app``."""
    return build_fastapi(Counter())


def invalid_server_app() -> Starlette:
    """An app whose per-route options are invalid: its startup must fail, naming the field."""
    app = build_starlette(Counter())

    @idempotent(expires_after_seconds=0)
    async def bad(request: Request) -> JSONResponse:
        return JSONResponse({})

    app.router.routes.append(Route("/bad", bad, methods=["POST"]))
    return app
