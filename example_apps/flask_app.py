"""A payments API on Flask, made idempotent by ``IdempotencyWSGIMiddleware``.

Run it::

    flask --app example_apps.flask_app run
    gunicorn --threads 8 example_apps.flask_app:app
    IDEM_STORE_URL=sqlite:///idempotency.sqlite3 gunicorn --workers 4 example_apps.flask_app:app
"""

from __future__ import annotations

import os
from typing import Any

from flask import Flask, Response, abort, jsonify, request

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
from idem_middleware import IdempotencyConfig, IdempotencyWSGIMiddleware

configure_logging()
ledger = Ledger.from_env()

app = Flask(__name__)
app.wsgi_app = IdempotencyWSGIMiddleware(  # type: ignore[method-assign]
    app.wsgi_app,
    persistence_layer=persistence_layer_from_env(),
    config=IdempotencyConfig(
        include_paths=("/payments", "/payments/*/refunds", "/exports"),
        require_key=True,
        scope=user_scope,
        on_store_error=on_store_error_from_env(),
        conflict_wait_seconds=conflict_wait_seconds_from_env(),
    ),
)


def error(status: int, detail: str, headers: dict[str, str] | None = None) -> Response:
    response = jsonify(detail=detail)
    response.status_code = status
    response.headers.update(headers or {})
    return response


def require_user() -> str:
    user = authenticated_user(request.headers.get("Authorization"))
    if user is None:
        abort(error(401, "send Authorization: Bearer <user>", {"WWW-Authenticate": "Bearer"}))
    return user


def json_body() -> Any:
    if not request.get_data():
        return None
    body = request.get_json(force=True, silent=True)
    if body is None:
        abort(error(400, "the body is not valid JSON"))
    return body


@app.post("/payments")
def create_payment() -> tuple[Response, int, dict[str, str]]:
    user = require_user()
    try:
        payment = parse_payment(json_body())
    except InvalidRequest as exc:
        abort(error(422, str(exc)))
    charge_card(payment)
    created = ledger.create_payment(user, payment)
    return jsonify(created), 201, {"Location": f"/payments/{created['id']}"}


@app.post("/payments/<payment_id>/refunds")
def create_refund(payment_id: str) -> tuple[Response, int]:
    user = require_user()
    try:
        refund = ledger.create_refund(user, payment_id, parse_refund(json_body()))
    except PaymentNotFound:
        abort(error(404, "no such payment"))
    except (InvalidRequest, RefundExceedsPayment) as exc:
        abort(error(422, str(exc)))
    return jsonify(refund), 201


@app.post("/exports")
def create_export() -> Response:
    """A CSV export of the user's payments, streamed line by line as it is produced."""
    user = require_user()
    export_id, lines = ledger.create_export(user)
    return Response(
        stream_lines(lines), 201, mimetype="text/csv", headers={"X-Export-Id": export_id}
    )


@app.get("/payments/<payment_id>")
def get_payment(payment_id: str) -> Response:
    user = require_user()
    try:
        return jsonify(ledger.get_payment(user, payment_id))
    except PaymentNotFound:
        abort(error(404, "no such payment"))


@app.get("/health")
def health() -> Response:
    return jsonify(status="ok", pid=os.getpid())


@app.get("/_stats")
def stats() -> Response:
    """How many times the handlers really ran (the ledger is shared by every worker)."""
    return jsonify(ledger.stats())
