"""The apps the benchmarks measure: a trivial JSON handler on Starlette and on FastAPI.

``POST /orders`` parses the JSON body and echoes it back as a created order (201), the least a
real create handler does; ``GET /health`` answers at once. ``build_*`` take the middleware to
wrap the app in, the way users add it (``Starlette(middleware=...)``, ``add_middleware``).

The HTTP benchmarks serve the factories at the bottom: ``served_app`` (Starlette, with the
middleware over the store the example apps' ``IDEM_STORE_URL`` names when
``BENCH_IDEMPOTENCY=on``) and ``flask_bare`` (the Flask example without its middleware).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from idem_middleware import IdempotencyWSGIMiddleware

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication

ORDER_PATH = "/orders"
ORDER_BODY = b'{"sku":"ABC-123","qty":1}'


async def create_order(request: Request) -> JSONResponse:
    order = await request.json()
    return JSONResponse({"id": "ord_1", "status": "created", **order}, status_code=201)


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok", "pid": os.getpid()})


def build_starlette(middleware: Sequence[Middleware] = ()) -> Starlette:
    return Starlette(
        routes=[
            Route(ORDER_PATH, create_order, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
        ],
        middleware=list(middleware),
    )


class Order(BaseModel):
    sku: str
    qty: int


def build_fastapi(middleware: Sequence[Middleware] = ()) -> FastAPI:
    app = FastAPI(middleware=list(middleware))

    @app.post(ORDER_PATH, status_code=201)
    async def create(order: Order) -> dict[str, Any]:
        return {"id": "ord_1", "status": "created", **order.model_dump()}

    return app


def served_app() -> Starlette:
    """The Starlette app for ``uvicorn --factory benchmarks.apps:served_app``."""
    if os.environ.get("BENCH_IDEMPOTENCY", "off") != "on":
        return build_starlette()
    from example_apps.store import persistence_layer_from_env
    from idem_middleware import IdempotencyMiddleware

    layer = persistence_layer_from_env()
    if os.environ.get("BENCH_STORE_THREADS") == "on":
        layer.native_async = False  # a store with a native async path, run in threads instead
    return build_starlette([Middleware(IdempotencyMiddleware, persistence_layer=layer)])


def served_peer_redis_app() -> Starlette:
    """The Starlette app behind asgi-idempotency-header with its ``redis.asyncio`` backend on
    ``BENCH_PEER_REDIS_URL``: ``uvicorn --factory benchmarks.apps:served_peer_redis_app``.
    """
    import redis.asyncio
    from idempotency_header_middleware import IdempotencyHeaderMiddleware
    from idempotency_header_middleware.backends.redis import RedisBackend

    backend = RedisBackend(redis.asyncio.Redis.from_url(os.environ["BENCH_PEER_REDIS_URL"]))
    return build_starlette([Middleware(IdempotencyHeaderMiddleware, backend=backend)])


def flask_bare() -> WSGIApplication:
    """The Flask example app with its idempotency middleware taken out, its own floor:
    ``gunicorn 'benchmarks.apps:flask_bare()'``.
    """
    from example_apps.flask_app import app as flask_app

    middleware = flask_app.wsgi_app
    assert isinstance(middleware, IdempotencyWSGIMiddleware)
    return middleware.app
