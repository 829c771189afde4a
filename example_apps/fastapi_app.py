"""A payments API on FastAPI, made idempotent by ``IdempotencyMiddleware``.

Run it::

    uvicorn example_apps.fastapi_app:app
    IDEM_STORE_URL='dynamodb://idempotency?region=eu-west-1' uvicorn example_apps.fastapi_app:app

Then create a payment twice with the same key; the second answer is a replay::

    curl -i localhost:8000/payments -H 'Authorization: Bearer alice' \\
         -H 'Idempotency-Key: order-1234' -H 'Content-Type: application/json' \\
         -d '{"amount": 1250, "currency": "EUR"}'
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal

from fastapi import Body, Depends, FastAPI, Header, HTTPException, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from example_apps.store import (
    MAX_AMOUNT,
    Ledger,
    NewPayment,
    PaymentNotFound,
    RefundExceedsPayment,
    authenticated_user,
    charge_card,
    configure_logging,
    conflict_wait_seconds_from_env,
    on_store_error_from_env,
    persistence_layer_from_env,
    stream_lines,
    user_scope,
)
from idem_middleware import IdempotencyConfig, IdempotencyMiddleware
from idem_middleware.openapi import document_idempotency

configure_logging()
ledger = Ledger.from_env()

config = IdempotencyConfig(
    include_paths=("/payments", "/payments/*/refunds", "/exports"),
    require_key=True,
    scope=user_scope,
    on_store_error=on_store_error_from_env(),
    conflict_wait_seconds=conflict_wait_seconds_from_env(),
)
app = FastAPI(title="Payments (FastAPI)")
app.add_middleware(
    IdempotencyMiddleware, persistence_layer=persistence_layer_from_env(), config=config
)
document_idempotency(app, config)  # /openapi.json shows the Idempotency-Key header and errors


class PaymentIn(BaseModel):
    amount: int = Field(gt=0, le=MAX_AMOUNT, description="in minor units (cents)")
    currency: Literal["AUD", "CAD", "CHF", "EUR", "GBP", "JPY", "USD"]
    description: str | None = Field(default=None, max_length=200)


class RefundIn(BaseModel):
    amount: int | None = Field(default=None, gt=0, description="default: what is left")


def current_user(authorization: Annotated[str | None, Header()] = None) -> str:
    user = authenticated_user(authorization)
    if user is None:
        raise HTTPException(
            401,
            "send Authorization: Bearer <user>",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return user


User = Annotated[str, Depends(current_user)]


@app.post("/payments", status_code=201)
def create_payment(body: PaymentIn, user: User, response: Response) -> dict[str, Any]:
    payment = NewPayment(body.amount, body.currency, body.description)
    charge_card(payment)
    created = ledger.create_payment(user, payment)
    response.headers["Location"] = f"/payments/{created['id']}"
    return created


@app.post("/payments/{payment_id}/refunds", status_code=201)
def create_refund(
    payment_id: str, user: User, body: Annotated[RefundIn | None, Body()] = None
) -> dict[str, Any]:
    try:
        return ledger.create_refund(user, payment_id, body.amount if body else None)
    except PaymentNotFound:
        raise HTTPException(404, "no such payment") from None
    except RefundExceedsPayment as exc:
        raise HTTPException(422, str(exc)) from None


@app.post("/exports", status_code=201, response_class=StreamingResponse)
def create_export(user: User) -> StreamingResponse:
    """A CSV export of the user's payments, streamed line by line as it is produced."""
    export_id, lines = ledger.create_export(user)
    return StreamingResponse(
        stream_lines(lines),
        status_code=201,
        media_type="text/csv",
        headers={"X-Export-Id": export_id},
    )


@app.get("/payments/{payment_id}")
def get_payment(payment_id: str, user: User) -> dict[str, Any]:
    try:
        return ledger.get_payment(user, payment_id)
    except PaymentNotFound:
        raise HTTPException(404, "no such payment") from None


@app.get("/health")
def health() -> dict[str, Any]:
    return {"status": "ok", "pid": os.getpid()}


@app.get("/_stats")
def stats() -> dict[str, int]:
    """How many times the handlers really ran (the ledger is shared by every worker)."""
    return ledger.stats()
