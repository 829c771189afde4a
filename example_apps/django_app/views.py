"""The payments views: plain Django, unaware of idempotency (the wrapper handles it)."""

from __future__ import annotations

import json
import os

from django.http import HttpRequest, JsonResponse  # type: ignore[import-untyped]

from example_apps.store import (
    InvalidRequest,
    Ledger,
    PaymentNotFound,
    authenticated_user,
    charge_card,
    parse_payment,
)

ledger = Ledger.from_env()


def _error(status: int, detail: str) -> JsonResponse:
    response = JsonResponse({"detail": detail}, status=status)
    if status == 401:
        response["WWW-Authenticate"] = "Bearer"
    return response


def create_payment(request: HttpRequest) -> JsonResponse:
    if request.method != "POST":
        return _error(405, "use POST")
    user = authenticated_user(request.headers.get("Authorization"))
    if user is None:
        return _error(401, "send Authorization: Bearer <user>")
    try:
        payment = parse_payment(json.loads(request.body or b"null"))
    except ValueError as exc:  # InvalidRequest, or a body that is not JSON
        return _error(422 if isinstance(exc, InvalidRequest) else 400, str(exc))
    charge_card(payment)
    created = ledger.create_payment(user, payment)
    response = JsonResponse(created, status=201)
    response["Location"] = f"/payments/{created['id']}"
    return response


def get_payment(request: HttpRequest, payment_id: str) -> JsonResponse:
    user = authenticated_user(request.headers.get("Authorization"))
    if user is None:
        return _error(401, "send Authorization: Bearer <user>")
    try:
        return JsonResponse(ledger.get_payment(user, payment_id))
    except PaymentNotFound:
        return _error(404, "no such payment")


def health(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok", "pid": os.getpid()})


def stats(request: HttpRequest) -> JsonResponse:
    """How many times the handlers really ran (the ledger is shared by every worker)."""
    return JsonResponse(ledger.stats())
