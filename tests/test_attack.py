"""Regressions found by attacking the middleware as a hostile client, a careless integrator and
a failing store: each test reproduces one bug with the exact input that exposed it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from idem_middleware import IdempotencyConfig, IdempotencyWSGIMiddleware
from idem_middleware.keys import parse_key
from idem_middleware.persistence import DataRecord, InMemoryPersistenceLayer
from idem_middleware.persistence.record import STATUS_COMPLETED
from idem_middleware.responses import StoredResponse
from tests.support.harness import Harness, assert_problem
from tests.support.wsgi import WSGIServer
from tests.support.wsgi import environ as wsgi_environ

Make = Callable[..., Harness]


# Hostile client -----------------------------------------------------------------------------


def test_bare_keys_that_differ_after_a_semicolon_name_two_records(make: Make) -> None:
    # "order;1" is not an sf-item with parameters (a parameter name cannot start with a digit):
    # it is a bare key taken whole. Cutting it at ";" made "order;2" replay "order;1"'s answer.
    harness = make()
    first = harness.request("POST", "/orders", headers=[("Idempotency-Key", "order;1")])
    second = harness.request("POST", "/orders", headers=[("Idempotency-Key", "order;2")])
    assert first.status == second.status == 201
    assert second.header("idempotent-replayed") is None
    assert harness.calls["orders"] == 2


@pytest.mark.parametrize("value", ["order;1", "abc;", "a;b=c", "x;y"])
def test_parse_key_keeps_a_bare_key_whole(value: str) -> None:
    assert parse_key([value]) == value


# A store returning garbage ------------------------------------------------------------------

GARBAGE_RESPONSES = [
    # a header value latin-1 cannot carry: ASGI's encode raised, a 500
    '{"status":200,"headers":[["x-a","\\u2603"]],"body":"hi"}',
    # a header value that splits the response: werkzeug raised under WSGI
    '{"status":200,"headers":[["x-a","a\\r\\nSet-Cookie: evil=1"]],"body":"hi"}',
    # a header name that is no HTTP field name
    '{"status":200,"headers":[["bad name","v"]],"body":"hi"}',
    # statuses no server can send: replayed as they were
    '{"status":99999,"headers":[],"body":"hi"}',
    '{"status":true,"headers":[],"body":"hi"}',
]


@pytest.mark.parametrize("data", GARBAGE_RESPONSES)
def test_a_garbage_stored_response_is_a_503_not_a_500_nor_a_replay(make: Make, data: str) -> None:
    layer = InMemoryPersistenceLayer()
    harness = make(layer)
    headers = [("Idempotency-Key", "k")]
    assert harness.request("POST", "/orders", headers=headers, json_body={"a": 1}).status == 201
    ((key, record),) = layer._records.items()
    layer._records[key] = DataRecord(
        key,
        STATUS_COMPLETED,
        record.expiry_timestamp,
        record.in_progress_expiry_timestamp,
        data,
        record.payload_hash,
        lease_id=record.lease_id,
    )
    reply = harness.request("POST", "/orders", headers=headers, json_body={"a": 1})
    assert_problem(reply, 503, "idempotency_store_unavailable")
    assert harness.calls["orders"] == 1


def test_stored_response_decode_keeps_every_valid_response() -> None:
    response = StoredResponse(
        599, (("X-Latin", "caf\xe9"), ("x-empty", "")), b"\xff", body_omitted=True, reason="Odd"
    )
    assert StoredResponse.decode(response.encode()) == response


# Careless integrator ------------------------------------------------------------------------


def _ok_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("201 Created", [("content-type", "text/plain")])
    return [b"created"]


@pytest.mark.xfail(
    strict=True,
    reason="engine.prepare passes the scope callable's result to build_idempotency_key "
    "unchecked: an int fails with AttributeError 'int' object has no attribute 'encode' (a "
    "500 naming nothing), and None silently makes the request unscoped",
)
@pytest.mark.parametrize("result", [42, None])
def test_a_scope_that_returns_no_str_is_a_type_error_naming_scope(result: object) -> None:
    middleware = IdempotencyWSGIMiddleware(
        _ok_app,
        persistence_layer=InMemoryPersistenceLayer(),
        config=IdempotencyConfig(scope=lambda request: result),  # type: ignore[arg-type,return-value]
    )
    with pytest.raises(TypeError, match="scope"):
        WSGIServer().call(middleware, wsgi_environ(b"{}", path="/orders"))
