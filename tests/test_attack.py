"""Regressions found by attacking the middleware as a hostile client, a careless integrator and
a failing store: each test reproduces one bug with the exact input that exposed it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from flask import Flask
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route
from werkzeug.middleware.dispatcher import DispatcherMiddleware
from werkzeug.test import Client as FlaskClient

from idem_middleware import IdempotencyConfig, IdempotencyMiddleware, IdempotencyWSGIMiddleware
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
    # A bare key is the lenient extension, not an sf-item: it is taken whole. Cutting it at ";"
    # as if it had parameters made "order;2" replay "order;1"'s answer.
    harness = make()
    first = harness.request("POST", "/orders", headers=[("Idempotency-Key", "order;1")])
    second = harness.request("POST", "/orders", headers=[("Idempotency-Key", "order;2")])
    assert first.status == second.status == 201
    assert second.header("idempotent-replayed") is None
    assert harness.calls["orders"] == 2


@pytest.mark.parametrize("value", ["order;1", "abc;", "a;b=c", "x;y"])
def test_parse_key_keeps_a_bare_key_whole(value: str) -> None:
    assert parse_key([value]) == value


@pytest.mark.parametrize("selection", [None, "amount"])
def test_body_keys_of_requests_that_differ_in_their_query_are_two_operations(
    make: Make, selection: str | None
) -> None:
    # The body-derived key covered method and path but not the query, which the fingerprint
    # covers: the second request got 422 idempotency_key_reused for 24 hours, with no key of its
    # own to change.
    harness = make(key_source="body", event_key_jmespath=selection)
    first = harness.request("POST", "/orders?dry_run=true", json_body={"amount": 5})
    second = harness.request("POST", "/orders?dry_run=false", json_body={"amount": 5})
    assert (first.status, second.status) == (201, 201)
    assert harness.calls["orders"] == 2
    retry = harness.request("POST", "/orders?dry_run=false", json_body={"amount": 5})
    assert retry.header("idempotent-replayed") == "true"
    assert retry.body == second.body


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


@pytest.mark.parametrize("result", [42, None])
def test_a_scope_that_returns_no_str_is_a_type_error_naming_scope(result: object) -> None:
    middleware = IdempotencyWSGIMiddleware(
        _ok_app,
        persistence_layer=InMemoryPersistenceLayer(),
        config=IdempotencyConfig(scope=lambda request: result),  # type: ignore[arg-type,return-value]
    )
    with pytest.raises(TypeError, match="scope"):
        WSGIServer().call(middleware, wsgi_environ(b"{}", path="/orders"))


def _mounted_asgi_apps(layer: InMemoryPersistenceLayer, config: IdempotencyConfig) -> Any:
    def api(name: str) -> IdempotencyMiddleware:
        async def orders(request: Request) -> JSONResponse:
            return JSONResponse({"api": name}, status_code=201)

        routes = [Route("/orders", orders, methods=["POST"])]
        return IdempotencyMiddleware(
            Starlette(routes=routes), persistence_layer=layer, config=config
        )

    return Starlette(routes=[Mount("/v1", api("v1")), Mount("/v2", api("v2"))])


def _mounted_wsgi_apps(layer: InMemoryPersistenceLayer, config: IdempotencyConfig) -> Any:
    def api(name: str) -> Flask:
        app = Flask(name)

        @app.post("/orders")
        def orders() -> Any:
            return {"api": name}, 201

        app.wsgi_app = IdempotencyWSGIMiddleware(  # type: ignore[method-assign]
            app.wsgi_app, persistence_layer=layer, config=config
        )
        return app

    root = Flask("root")
    root.wsgi_app = DispatcherMiddleware(  # type: ignore[method-assign]
        root.wsgi_app, {"/v1": api("v1"), "/v2": api("v2")}
    )
    return root


async def _post_twice_asgi(app: Any, first: str, second: str, headers: dict[str, str]) -> list[Any]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        return [
            await client.post(path, content=b'{"amount": 5}', headers=headers)
            for path in (first, second)
        ]


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
@pytest.mark.parametrize("key_source", ["header", "body"])
def test_two_mounted_apps_sharing_a_layer_never_answer_for_each_other(
    kind: str, key_source: str
) -> None:
    layer = InMemoryPersistenceLayer()
    config = IdempotencyConfig(key_source=key_source)  # type: ignore[arg-type]
    headers = {"Idempotency-Key": "k"} if key_source == "header" else {}
    if kind == "asgi":
        app = _mounted_asgi_apps(layer, config)
        replies = asyncio.run(_post_twice_asgi(app, "/v1/orders", "/v2/orders", headers))
        answers = [(reply.status_code, reply.json()) for reply in replies]
    else:
        client = FlaskClient(_mounted_wsgi_apps(layer, config))
        answers = []
        for path in ("/v1/orders", "/v2/orders"):
            reply = client.post(path, data=b'{"amount": 5}', headers=headers)
            answers.append((reply.status_code, reply.get_json()))
    # The same key on another path is another request (422), never the other app's answer.
    assert answers[0] == (201, {"api": "v1"})
    status, document = answers[1]
    assert (status, document) == (201, {"api": "v2"}) or status == 422


@pytest.mark.parametrize("field", ["header_name", "replay_header"])
def test_a_header_name_with_a_trailing_newline_is_refused(field: str) -> None:
    # re.match(r"^token$") accepted "Idempotency-Key\n": "$" matches before a final newline.
    with pytest.raises(ValueError, match=field):
        IdempotencyConfig(**{field: "Idempotency-Key\n"})  # type: ignore[arg-type]


@pytest.mark.parametrize("field", ["require_key", "use_local_cache", "store_server_errors"])
@pytest.mark.parametrize("value", ["false", "no", 0, None])
def test_a_flag_that_is_not_a_bool_is_refused(field: str, value: object) -> None:
    # The config a newcomer writes from the environment: require_key=os.environ.get(..., "false")
    # is a truthy string that turned the option on.
    with pytest.raises((TypeError, ValueError), match=field):
        IdempotencyConfig(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [5, b"tenant"])
def test_a_key_prefix_that_is_not_a_str_is_refused_naming_it(value: object) -> None:
    with pytest.raises((TypeError, ValueError), match="key_prefix"):
        IdempotencyConfig(key_prefix=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["60", None, -1, float("nan"), float("inf"), True])
def test_a_bad_sweep_interval_is_refused_at_construction(value: object) -> None:
    # "60" and None were accepted, then every covered request failed with a TypeError (a 500);
    # nan never swept.
    with pytest.raises((TypeError, ValueError), match="sweep_interval_seconds"):
        InMemoryPersistenceLayer(sweep_interval_seconds=value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "field"),
    [
        # Accepted, then against DynamoDB Local every completion failed ("Two document paths
        # overlap", or the status overwritten by the data), the record stayed in progress, and
        # the retry after the lease ran the handler a second time.
        ({"data_attr": "status"}, "data_attr"),
        ({"validation_key_attr": "data"}, "validation_key_attr"),
        ({"lease_id_attr": "in_progress_expiration"}, "lease_id_attr"),
        ({"expiry_attr": "id"}, "expiry_attr"),
        ({"sort_key_attr": "sk", "data_attr": "sk"}, "data_attr"),
        ({"key_attr": ""}, "key_attr"),
        ({"table_name": ""}, "table_name"),
    ],
)
def test_dynamodb_attribute_names_that_collide_are_refused_at_construction(
    options: dict[str, str], field: str
) -> None:
    from idem_middleware.persistence import DynamoDBPersistenceLayer

    options = {"table_name": "idempotency", **options}
    with pytest.raises(ValueError, match=field):
        DynamoDBPersistenceLayer(boto3_client=object(), **options)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"table_name": "records\n"}, "table_name"),  # "$" matched before the final newline
        ({"schema": "public\n"}, "schema"),
        ({"purge_interval_seconds": float("nan")}, "purge_interval_seconds"),
        ({"pool_timeout_seconds": float("nan")}, "pool_timeout_seconds"),
        ({"statement_timeout_seconds": float("nan")}, "statement_timeout_seconds"),
        ({"min_pool_size": "1"}, "pool_size"),
        ({"table_name": 5}, "table_name"),
    ],
)
def test_postgres_options_that_cannot_work_are_refused_naming_them(
    options: dict[str, Any], field: str
) -> None:
    from idem_middleware.persistence import PostgresPersistenceLayer

    with pytest.raises(ValueError, match=field):
        PostgresPersistenceLayer("postgresql://user@localhost/db", **options)


def test_postgres_sub_millisecond_statement_timeout_is_not_no_timeout() -> None:
    # 0.0004 s was sent as "0ms", which PostgreSQL reads as "no statement timeout at all".
    from idem_middleware.persistence import PostgresPersistenceLayer

    layer = PostgresPersistenceLayer(
        "postgresql://user@localhost/db", statement_timeout_seconds=0.0004
    )
    executed: list[tuple[str, Any]] = []

    class Connection:
        def execute(self, query: str, params: Any) -> None:
            executed.append((query, params))

    layer._configure_connection(Connection())  # type: ignore[arg-type]
    assert executed
    assert executed[0][1] != ("0ms",)


@pytest.mark.parametrize("adapter", [IdempotencyMiddleware, IdempotencyWSGIMiddleware])
def test_a_dict_given_as_config_is_a_type_error_naming_config(adapter: Any) -> None:
    with pytest.raises(TypeError, match="config"):
        adapter(
            _ok_app,
            persistence_layer=InMemoryPersistenceLayer(),
            config={"require_key": True},
        )


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
def test_the_middleware_added_twice_on_one_layer_still_runs_the_handler(kind: str) -> None:
    # The careless integrator: add_middleware (or app.wsgi_app = ...) run twice, e.g. by an
    # app factory called twice, with one module-level store.
    layer = InMemoryPersistenceLayer()
    config = IdempotencyConfig()
    runs: list[int] = []
    headers = {"Idempotency-Key": "k"}
    if kind == "asgi":

        async def orders(request: Request) -> JSONResponse:
            runs.append(1)
            return JSONResponse({"ok": True}, status_code=201)

        app = Starlette(routes=[Route("/orders", orders, methods=["POST"])])
        app.add_middleware(IdempotencyMiddleware, persistence_layer=layer, config=config)
        app.add_middleware(IdempotencyMiddleware, persistence_layer=layer, config=config)
        replies = asyncio.run(_post_twice_asgi(app, "/orders", "/orders", headers))
        statuses = [reply.status_code for reply in replies]
    else:
        flask_app = Flask("twice")

        @flask_app.post("/orders")
        def flask_orders() -> Any:
            runs.append(1)
            return {"ok": True}, 201

        for _ in range(2):
            flask_app.wsgi_app = IdempotencyWSGIMiddleware(  # type: ignore[method-assign]
                flask_app.wsgi_app, persistence_layer=layer, config=config
            )
        client = FlaskClient(flask_app)
        statuses = [
            client.post("/orders", data=b'{"amount": 5}', headers=headers).status_code
            for _ in range(2)
        ]
    assert statuses == [201, 201]
    assert len(runs) == 1


@pytest.mark.parametrize(
    "url", ["memory://?max_items=abc", "memory://?max_items=0", "memory://?bogus=1"]
)
def test_a_memory_url_with_options_it_cannot_honour_is_refused(url: str) -> None:
    from idem_middleware.persistence import from_url

    with pytest.raises(ValueError, match=r"max_items|bogus"):
        from_url(url)
