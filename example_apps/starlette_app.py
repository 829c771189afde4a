"""A payments API on Starlette, made idempotent by ``IdempotencyMiddleware``.

Run it::

    uvicorn example_apps.starlette_app:app
"""

from __future__ import annotations

import json
import os
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from example_apps.store import (
    InvalidRequest,
    Ledger,
    PaymentNotFound,
    RefundExceedsPayment,
    authenticated_user,
    charge_card,
    configure_logging,
    conflict_wait_seconds_from_env,
    on_store_error_from_env,
    parse_payment,
    parse_refund,
    persistence_layer_from_env,
    stream_lines,
    user_scope,
)
from idem_middleware import IdempotencyConfig, IdempotencyMiddleware

configure_logging()
ledger = Ledger.from_env()


class HTTPError(Exception):
    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        self.status, self.detail, self.headers = status, detail, headers


def require_user(request: Request) -> str:
    user = authenticated_user(request.headers.get("authorization"))
    if user is None:
        raise HTTPError(401, "send Authorization: Bearer <user>", {"WWW-Authenticate": "Bearer"})
    return user


async def json_body(request: Request) -> Any:
    body = await request.body()
    if not body:
        return None
    try:
        return json.loads(body)
    except ValueError:
        raise HTTPError(400, "the body is not valid JSON") from None


async def create_payment(request: Request) -> JSONResponse:
    user = require_user(request)
    try:
        payment = parse_payment(await json_body(request))
    except InvalidRequest as exc:
        raise HTTPError(422, str(exc)) from None
    await run_in_threadpool(charge_card, payment)
    created = await run_in_threadpool(ledger.create_payment, user, payment)
    return JSONResponse(
        created, status_code=201, headers={"Location": f"/payments/{created['id']}"}
    )


async def create_refund(request: Request) -> JSONResponse:
    user = require_user(request)
    try:
        amount = parse_refund(await json_body(request))
        refund = await run_in_threadpool(
            ledger.create_refund, user, request.path_params["payment_id"], amount
        )
    except PaymentNotFound:
        raise HTTPError(404, "no such payment") from None
    except (InvalidRequest, RefundExceedsPayment) as exc:
        raise HTTPError(422, str(exc)) from None
    return JSONResponse(refund, status_code=201)


async def create_export(request: Request) -> StreamingResponse:
    """A CSV export of the user's payments, streamed line by line as it is produced."""
    user = require_user(request)
    export_id, lines = await run_in_threadpool(ledger.create_export, user)
    return StreamingResponse(
        stream_lines(lines),
        status_code=201,
        media_type="text/csv",
        headers={"X-Export-Id": export_id},
    )


async def get_payment(request: Request) -> JSONResponse:
    user = require_user(request)
    try:
        payment = await run_in_threadpool(
            ledger.get_payment, user, request.path_params["payment_id"]
        )
    except PaymentNotFound:
        raise HTTPError(404, "no such payment") from None
    return JSONResponse(payment)


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok", "pid": os.getpid()})


async def stats(request: Request) -> JSONResponse:
    """How many times the handlers really ran (the ledger is shared by every worker)."""
    return JSONResponse(await run_in_threadpool(ledger.stats))


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPError)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=exc.headers)


app = Starlette(
    routes=[
        Route("/payments", create_payment, methods=["POST"]),
        Route("/payments/{payment_id}/refunds", create_refund, methods=["POST"]),
        Route("/payments/{payment_id}", get_payment, methods=["GET"]),
        Route("/exports", create_export, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/_stats", stats, methods=["GET"]),
    ],
    middleware=[
        Middleware(
            IdempotencyMiddleware,
            persistence_layer=persistence_layer_from_env(),
            config=IdempotencyConfig(
                include_paths=("/payments", "/payments/*/refunds", "/exports"),
                require_key=True,
                scope=user_scope,
                on_store_error=on_store_error_from_env(),
                conflict_wait_seconds=conflict_wait_seconds_from_env(),
            ),
        )
    ],
    exception_handlers={HTTPError: http_error},
)
