"""``@idempotent``: per-route opt-in, opt-out and options, on real FastAPI, Starlette and Flask
apps (so over both adapters), and per-route options validated when the app starts.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from flask import Flask
from openapi_spec_validator import validate as validate_spec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from idem_middleware import (
    IdempotencyConfig,
    IdempotencyMiddleware,
    IdempotencyWSGIMiddleware,
    idempotent,
)
from idem_middleware.engine import IdempotencyEngine, Proceed
from idem_middleware.flask import Idempotency
from idem_middleware.openapi import document_idempotency
from idem_middleware.persistence import BasePersistenceLayer, InMemoryPersistenceLayer
from idem_middleware.request import Headers, IdempotencyRequest
from idem_middleware.responses import StoredResponse
from tests.support import decorated_apps
from tooling.servers import ServerStartError, running, start_uvicorn

FRAMEWORKS = ["fastapi", "starlette", "flask"]


class Client:
    """One request interface over the three apps (TestClient runs the ASGI lifespan)."""

    def __init__(self, framework: str, layer: BasePersistenceLayer) -> None:
        self.framework = framework
        self.calls: Counter[str] = Counter()
        self.layer = layer
        if framework == "flask":
            self.flask = decorated_apps.build_flask(self.calls, layer)
            self.wsgi = self.flask.test_client()
        else:
            build = getattr(decorated_apps, f"build_{framework}")
            self.asgi = TestClient(build(self.calls, layer))

    def send(
        self,
        path: str,
        *,
        key: str | None = None,
        body: Any = None,
        method: str = "POST",
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], Any]:
        sent = dict(headers or {})
        if key is not None:
            sent["Idempotency-Key"] = key
        if self.framework == "flask":
            response = self.wsgi.open(path, method=method, json=body, headers=sent)
            return response.status_code, dict(response.headers), response.get_json(silent=True)
        reply = self.asgi.request(method, path, json=body, headers=sent)
        is_json = "json" in reply.headers.get("content-type", "")
        return reply.status_code, dict(reply.headers), reply.json() if is_json else reply.text


@pytest.fixture(params=FRAMEWORKS)
def client(request: pytest.FixtureRequest) -> Iterator[Client]:
    client = Client(request.param, InMemoryPersistenceLayer())
    if client.framework == "flask":
        yield client
    else:
        with client.asgi:  # lifespan: the route table is built at startup
            yield client


def replayed(headers: dict[str, str]) -> bool:
    return {k.lower(): v for k, v in headers.items()}.get("idempotent-replayed") == "true"


def test_an_undecorated_route_follows_the_middleware_config(client: Client) -> None:
    first = client.send("/orders", key="k1", body={"n": 1})
    retry = client.send("/orders", key="k1", body={"n": 1})

    assert first[0] == retry[0] == 201
    assert retry[2] == first[2]
    assert replayed(retry[1])
    assert client.calls["orders"] == 1


def test_a_route_opted_out_runs_every_time_even_with_a_key(client: Client) -> None:
    first = client.send("/opted-out", key="k1", body={"n": 1})
    retry = client.send("/opted-out", key="k1", body={"n": 1})

    assert (first[2]["count"], retry[2]["count"]) == (1, 2)
    assert not replayed(retry[1])
    assert retry[2]["state"] is None


def test_a_route_opted_in_is_covered_although_the_config_excludes_it(client: Client) -> None:
    first = client.send("/plain", key="k1", body={"n": 1})
    retry = client.send("/plain", key="k1", body={"n": 1})

    assert replayed(retry[1])
    assert retry[2] == first[2]
    assert client.calls["plain"] == 1


def test_per_route_require_key(client: Client) -> None:
    missing = client.send("/strict/7", body={"n": 1})
    elsewhere = client.send("/orders", body={"n": 1})  # the middleware's config: not required

    assert missing[0] == 400
    assert missing[2]["code"] == "idempotency_key_missing"
    assert client.calls["strict"] == 0
    assert elsewhere[0] == 201


def test_per_route_body_key(client: Client) -> None:
    client.send("/by-body", body={"order_id": 1, "amount": 5})
    retry = client.send("/by-body", body={"order_id": 1, "amount": 5})
    other = client.send("/by-body", body={"order_id": 2, "amount": 5})

    assert replayed(retry[1])
    assert not replayed(other[1])
    assert client.calls["by_body"] == 2


def test_per_route_jmespath_options(client: Client) -> None:
    first = client.send("/by-order", body={"order_id": 1, "note": "first"})
    retry = client.send("/by-order", body={"order_id": 1, "note": "changed"})

    # The key and the fingerprint both cover order_id only: the same order, replayed.
    assert replayed(retry[1])
    assert retry[2] == first[2]
    assert client.calls["by_order"] == 1


def test_per_route_expiry(client: Client) -> None:
    before = time.time()
    client.send("/short", key="k-short", body={})
    client.send("/orders", key="k-long", body={})
    assert isinstance(client.layer, InMemoryPersistenceLayer)

    expiries = sorted(record.expiry_timestamp or 0 for record in client.layer._records.values())

    assert len(expiries) == 2
    short, long = expiries
    assert before + decorated_apps.SHORT_EXPIRY_SECONDS - 1 <= short <= time.time() + 30
    assert long >= before + IdempotencyConfig().expires_after_seconds - 1


def test_per_route_scope(client: Client) -> None:
    alice = client.send("/scoped", key="same", body={}, headers={"x-user": "alice"})
    bob = client.send("/scoped", key="same", body={}, headers={"x-user": "bob"})
    alice_again = client.send("/scoped", key="same", body={}, headers={"x-user": "alice"})

    assert not replayed(bob[1])
    assert replayed(alice_again[1])
    assert alice_again[2] == alice[2]
    assert client.calls["scoped"] == 2


def test_a_decorated_route_covers_its_own_unsafe_methods(client: Client) -> None:
    # PUT is not among the middleware's methods (POST, PATCH); the decorated route's own is.
    client.send("/put", key="k1", body={}, method="PUT")
    retry = client.send("/put", key="k1", body={}, method="PUT")

    assert replayed(retry[1])
    assert client.calls["put"] == 1


def test_a_decorated_route_leaves_its_safe_methods_alone(client: Client) -> None:
    client.send("/both", key="k1", method="GET")
    get_again = client.send("/both", key="k1", method="GET")
    client.send("/both", key="k2", body={})
    post_again = client.send("/both", key="k2", body={})

    assert not replayed(get_again[1])
    assert replayed(post_again[1])
    assert client.calls["both"] == 3


def test_a_decorated_route_under_a_prefix(client: Client) -> None:
    # Starlette: a Mount; FastAPI: an APIRouter's prefix; Flask: a blueprint's url_prefix.
    missing = client.send("/api/items", body={})
    client.send("/api/items", key="k1", body={})
    retry = client.send("/api/items", key="k1", body={})

    assert missing[0] == 400
    assert replayed(retry[1])
    assert client.calls["item"] == 1


def test_unknown_paths_still_follow_the_middleware_config() -> None:
    client = Client("starlette", InMemoryPersistenceLayer())
    with client.asgi:
        status, _, _ = client.send("/nowhere", key="k1", body={})
        status_again, headers, _ = client.send("/nowhere", key="k1", body={})

    assert status == status_again == 404
    assert replayed(headers)  # a 404 is stored and replayed, as before the decorator


# Startup validation --------------------------------------------------------------------------


def _invalid_app(framework: str, **options: Any) -> Any:
    @idempotent(**options)
    async def create(request: Request) -> JSONResponse:
        return JSONResponse({}, status_code=201)

    layer = InMemoryPersistenceLayer()
    config = IdempotencyConfig(in_progress_expires_after_seconds=10)
    if framework == "flask":
        app = Flask("invalid")
        Idempotency(app, persistence_layer=layer, config=config)

        @idempotent(**options)
        def view() -> Any:
            return {}

        app.add_url_rule("/orders/<order_id>", "create", view, methods=["POST"])
        return app
    return IdempotencyMiddleware(
        Starlette(routes=[Route("/orders/{order_id}", create, methods=["POST"])]),
        persistence_layer=layer,
        config=config,
    )


INVALID = [
    ({"expires_after_seconds": 0}, "expires_after_seconds"),
    ({"expires_after_seconds": 5}, "expires_after_seconds"),  # shorter than the lease
    ({"key_source": "cookie"}, "key_source"),
    ({"event_key_jmespath": "order_id"}, "event_key_jmespath"),  # with key_source="header"
    ({"payload_validation_jmespath": "[["}, "payload_validation_jmespath"),
    ({"scope": "user"}, "scope"),
    ({"response_hook": 42}, "response_hook"),
    ({"methods": ["FETCH"]}, "methods"),
]


def _config_message(options: dict[str, Any]) -> str:
    """What IdempotencyConfig itself says about these options on the middleware's config."""
    with pytest.raises(ValueError) as raised:
        IdempotencyConfig(in_progress_expires_after_seconds=10, **options)
    return str(raised.value)


async def _lifespan_startup(app: Any) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    with pytest.raises((ValueError, TypeError)):  # raised after the report, as Starlette does
        await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)
    return sent


@pytest.mark.parametrize(("options", "field"), INVALID, ids=[field for _, field in INVALID])
def test_asgi_startup_fails_naming_the_field(options: dict[str, Any], field: str) -> None:
    app = _invalid_app("starlette", **options)

    sent = asyncio.run(_lifespan_startup(app))

    failed = [m for m in sent if m["type"] == "lifespan.startup.failed"]
    assert len(failed) == 1, sent
    message = failed[0]["message"]
    assert f"{field}: " in message
    assert _config_message(options) in message  # the same words as IdempotencyConfig's
    assert "/orders/{order_id}" in message  # and which route says so


def test_with_test_client_startup_raises_naming_the_field() -> None:
    app = FastAPI()
    app.add_middleware(IdempotencyMiddleware, persistence_layer=InMemoryPersistenceLayer())

    @app.post("/payments")
    @idempotent(expires_after_seconds=0)
    def create_payment() -> dict[str, Any]:
        return {}

    with (
        pytest.raises(ValueError, match=r"/payments \(.*create_payment\): expires_after_seconds: "),
        TestClient(app),
    ):
        pass


@pytest.mark.parametrize(("options", "field"), INVALID, ids=[field for _, field in INVALID])
def test_flask_extension_validates_naming_the_field(options: dict[str, Any], field: str) -> None:
    app = _invalid_app("flask", **options)

    with pytest.raises(ValueError, match=f"{field}: ") as raised:
        Idempotency.middleware(app).resolve_routes()

    assert _config_message(options) in str(raised.value)
    assert "/orders/{order_id}" in str(raised.value)


@pytest.mark.parametrize("framework", ["starlette", "flask"])
def test_without_a_startup_the_first_request_fails_naming_the_field(framework: str) -> None:
    app = _invalid_app(framework, expires_after_seconds=0)
    headers = {"Idempotency-Key": "k"}

    async def post() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            await client.post("/orders/1", headers=headers)

    send: Any = (
        (lambda: app.test_client().post("/orders/1", headers=headers))
        if (framework == "flask")
        else (lambda: asyncio.run(post()))
    )
    with pytest.raises(ValueError, match="expires_after_seconds: must be a positive integer"):
        send()
    with pytest.raises(ValueError, match="expires_after_seconds"):  # every request, not once
        send()


def test_a_decorated_route_with_only_safe_methods_is_refused() -> None:
    @idempotent()
    async def read(request: Request) -> JSONResponse:
        return JSONResponse({})

    app = IdempotencyMiddleware(
        Starlette(routes=[Route("/report", read, methods=["GET"])]),
        persistence_layer=InMemoryPersistenceLayer(),
    )

    with pytest.raises(ValueError, match=r"GET /report|/report \(.*\): methods: "):
        app.resolve_routes()


def test_decorator_arguments_are_checked_when_decorating() -> None:
    with pytest.raises(TypeError, match="hash_function"):
        idempotent(hash_function="md5")  # type: ignore[call-overload]  # the layer's, not a route's
    with pytest.raises(ValueError, match="enabled: False opts the route out"):
        idempotent(enabled=False, require_key=True)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="enabled"):
        idempotent(enabled="no")  # type: ignore[call-overload]


def test_bare_decorator_is_the_same_as_with_parentheses() -> None:
    calls: Counter[str] = Counter()

    @idempotent
    async def create(request: Request) -> JSONResponse:
        calls["create"] += 1
        return JSONResponse({"n": calls["create"]}, status_code=201)

    starlette = Starlette(routes=[Route("/c", create, methods=["POST"])])
    app = IdempotencyMiddleware(
        starlette,
        persistence_layer=InMemoryPersistenceLayer(),
        config=IdempotencyConfig(include_paths=("/elsewhere",)),
    )
    with TestClient(app) as client:
        client.post("/c", headers={"Idempotency-Key": "k"})
        retry = client.post("/c", headers={"Idempotency-Key": "k"})

    assert retry.headers["idempotent-replayed"] == "true"
    assert calls["create"] == 1


# The cost: no table without decorators -------------------------------------------------------


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_an_app_without_decorators_gets_no_route_table(framework: str) -> None:
    layer = InMemoryPersistenceLayer()
    middleware: IdempotencyMiddleware | IdempotencyWSGIMiddleware
    if framework == "flask":
        flask = Flask("bare")
        flask.add_url_rule("/o", "o", lambda: "", methods=["POST"])
        middleware = IdempotencyWSGIMiddleware(flask.wsgi_app, persistence_layer=layer)
    else:
        app = Starlette(routes=[Route("/o", lambda request: JSONResponse({}), methods=["POST"])])
        middleware = IdempotencyMiddleware(app, persistence_layer=layer)

    middleware.resolve_routes()

    assert middleware.routes.table is None  # each request: one attribute read, no regex


def test_a_table_has_no_regex_for_methods_no_decorated_route_changes() -> None:
    client = Client("starlette", InMemoryPersistenceLayer())
    with client.asgi:
        client.send("/orders", key="k", body={})
    middleware = _middleware_of(client.asgi.app)
    table = middleware.routes.table

    assert table is not None
    assert table.engine_for("GET", "/both") is middleware.engine  # GET: a dict miss, no match
    assert table.engine_for("POST", "/orders") is middleware.engine
    assert table.engine_for("POST", "/opted-out") is None
    plain = table.engine_for("POST", "/plain")
    assert plain is not None
    assert plain is not middleware.engine
    assert plain.persistence_layer is middleware.engine.persistence_layer


def _middleware_of(app: Any) -> IdempotencyMiddleware:
    node = app.middleware_stack
    while not isinstance(node, IdempotencyMiddleware):
        node = node.app
    return node


# A real server ------------------------------------------------------------------------------


def test_on_uvicorn(tmp_path: Path) -> None:
    server = start_uvicorn(
        "tests.support.decorated_apps:fastapi_server_app",
        env={},
        log_dir=tmp_path,
        extra_args=["--factory"],
    )
    with running(server), httpx.Client(base_url=server.base_url, timeout=10) as http:
        missing = http.post("/strict/1", json={})
        first = http.post("/strict/1", json={}, headers={"Idempotency-Key": "k1"})
        retry = http.post("/strict/1", json={}, headers={"Idempotency-Key": "k1"})
        opted_out = http.post("/opted-out", json={}, headers={"Idempotency-Key": "k2"})
        opted_out_again = http.post("/opted-out", json={}, headers={"Idempotency-Key": "k2"})

    assert missing.status_code == 400
    assert first.status_code == retry.status_code == 201
    assert retry.headers["idempotent-replayed"] == "true"
    assert retry.json() == first.json()
    assert first.json()["state"]["stripe"] == retry.json()["state"]["stripe"]
    assert (opted_out.json()["count"], opted_out_again.json()["count"]) == (1, 2)


def test_uvicorn_refuses_to_start_an_app_with_invalid_options(tmp_path: Path) -> None:
    with pytest.raises(ServerStartError) as raised:
        start_uvicorn(
            "tests.support.decorated_apps:invalid_server_app",
            env={},
            log_dir=tmp_path,
            extra_args=["--factory"],
        )

    assert "expires_after_seconds: must be a positive integer, got 0" in raised.value.log
    assert "/bad" in raised.value.log


# OpenAPI -------------------------------------------------------------------------------------

OPENAPI_CONFIG = IdempotencyConfig(include_paths=("/orders", "/orders/{order_id}"))


def build_documented_app() -> FastAPI:
    app = FastAPI(title="Decorated")
    app.add_middleware(
        IdempotencyMiddleware, persistence_layer=InMemoryPersistenceLayer(), config=OPENAPI_CONFIG
    )

    @app.post("/orders", status_code=201)
    def create_order() -> dict[str, Any]:  # covered by the config
        return {"id": 1}

    @app.post("/orders/{order_id}", status_code=201)
    @idempotent(enabled=False)  # included by the config, opted out
    def amend_order(order_id: int) -> dict[str, Any]:
        return {"id": order_id}

    @app.post("/payments", status_code=201)
    @idempotent(require_key=True)  # not included by the config, opted in, key required
    def create_payment() -> dict[str, Any]:
        return {"id": 2}

    @app.put("/payments/{payment_id}")
    @idempotent(key_source="body")  # a body key: no header parameter
    def replace_payment(payment_id: int) -> dict[str, Any]:
        return {"id": payment_id}

    @app.post("/ping")
    def ping() -> dict[str, Any]:  # neither
        return {}

    document_idempotency(app, OPENAPI_CONFIG)
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    with TestClient(app) as client:
        response = client.get("/openapi.json")
    assert response.status_code == 200
    document: dict[str, Any] = response.json()
    return document


def _key_parameter(operation: dict[str, Any]) -> dict[str, Any] | None:
    found = [p for p in operation.get("parameters", []) if p["name"] == "Idempotency-Key"]
    return found[0] if found else None


def test_openapi_documents_the_decorator_coverage() -> None:
    document = _openapi(build_documented_app())
    validate_spec(document)
    paths = document["paths"]

    created = paths["/orders"]["post"]
    amended = paths["/orders/{order_id}"]["post"]
    payment = paths["/payments"]["post"]
    replaced = paths["/payments/{payment_id}"]["put"]
    ping = paths["/ping"]["post"]

    created_key = _key_parameter(created)
    assert created_key is not None
    assert created_key["required"] is False
    assert "409" in created["responses"]
    assert _key_parameter(amended) is None
    assert "409" not in amended["responses"]
    key = _key_parameter(payment)
    assert key is not None
    assert key["required"] is True
    missing = payment["responses"]["400"]["content"]["application/problem+json"]["examples"]
    assert "idempotency_key_missing" in missing
    assert _key_parameter(replaced) is None
    assert "409" in replaced["responses"]
    assert "Idempotent-Replayed" in replaced["responses"]["200"]["headers"]
    assert _key_parameter(ping) is None
    assert "409" not in ping["responses"]


def test_openapi_says_what_the_middleware_enforces() -> None:
    app = build_documented_app()
    document = _openapi(app)
    checks = [
        ("POST", "/orders", "/orders", "post"),
        ("POST", "/orders/7", "/orders/{order_id}", "post"),
        ("POST", "/payments", "/payments", "post"),
        ("POST", "/ping", "/ping", "post"),
    ]
    with TestClient(app) as client:
        for method, path, template, operation in checks:
            key = _key_parameter(document["paths"][template][operation])
            documented = key is not None and key["required"]
            refused = client.request(method, path).status_code == 400
            assert refused == documented, path
            covered = key is not None
            client.request(method, path, headers={"Idempotency-Key": f"k{path}"})
            retry = client.request(method, path, headers={"Idempotency-Key": f"k{path}"})
            assert (retry.headers.get("idempotent-replayed") == "true") == covered, path


def test_openapi_refuses_invalid_route_options() -> None:
    app = FastAPI()

    @app.post("/x")
    @idempotent(expires_after_seconds=-1)
    def x() -> dict[str, Any]:
        return {}

    document_idempotency(app, IdempotencyConfig())
    with pytest.raises(ValueError, match="expires_after_seconds: must be a positive integer"):
        app.openapi()


# The table follows each router's own precedence ---------------------------------------------


def test_starlette_order_decides_between_overlapping_routes() -> None:
    """Starlette tries routes in order: ``/{tenant}/orders`` (first, decorated) serves
    ``/static/orders`` too, and so does its per-route ``require_key``.
    """
    served: list[str] = []

    @idempotent(require_key=True)
    async def tenant_orders(request: Request) -> JSONResponse:
        served.append("tenant")
        return JSONResponse({}, status_code=201)

    async def static_orders(request: Request) -> JSONResponse:
        served.append("static")
        return JSONResponse({}, status_code=201)

    app = IdempotencyMiddleware(
        Starlette(
            routes=[
                Route("/{tenant}/orders", tenant_orders, methods=["POST"]),
                Route("/static/orders", static_orders, methods=["POST"]),
            ]
        ),
        persistence_layer=InMemoryPersistenceLayer(),
    )
    with TestClient(app) as client:
        refused = client.post("/static/orders")
        served_with_key = client.post("/static/orders", headers={"Idempotency-Key": "k"})

    assert refused.status_code == 400
    assert served_with_key.status_code == 201
    assert served == ["tenant"]


def test_werkzeug_precedence_decides_between_overlapping_rules() -> None:
    """Werkzeug prefers a static segment to a variable, whatever the order: ``/static/orders``
    (undecorated) serves its path, ``/<tenant>/orders`` (decorated) the others.
    """
    served: list[str] = []
    app = Flask("precedence")
    Idempotency(app, persistence_layer=InMemoryPersistenceLayer())

    @app.post("/<tenant>/orders")
    @idempotent(require_key=True)
    def tenant_orders(tenant: str) -> tuple[dict[str, Any], int]:
        served.append("tenant")
        return {}, 201

    @app.post("/static/orders")
    def static_orders() -> tuple[dict[str, Any], int]:
        served.append("static")
        return {}, 201

    client = app.test_client()
    static = client.post("/static/orders")
    tenant = client.post("/acme/orders")

    assert static.status_code == 201
    assert tenant.status_code == 400
    assert served == ["static"]


# Per-route expiry on every store ------------------------------------------------------------

SHORT_SECONDS = 60


def test_a_route_engine_stores_its_own_expiry_on_every_backend(
    persistence_layer: BasePersistenceLayer,
) -> None:
    """Route engines share the layer, configured once with the middleware's config; a route's
    ``expires_after_seconds`` goes with its completions, the layer's own with the others.
    """
    base = IdempotencyEngine(persistence_layer, IdempotencyConfig())
    route = base.for_route(IdempotencyConfig(expires_after_seconds=SHORT_SECONDS))
    before = time.time()
    stored = {}
    for name, engine in (("base", base), ("route", route)):
        request = IdempotencyRequest(
            "POST", f"/{name}", "", Headers([("idempotency-key", name)]), b""
        )
        decision = engine.begin(request)
        assert isinstance(decision, Proceed)
        engine.complete(decision, StoredResponse(201, (), b"{}"))
        stored[name] = persistence_layer.get_record(decision.lease.idempotency_key)

    assert persistence_layer.config.expires_after_seconds == 86_400  # configured once
    route_expiry = stored["route"].expiry_timestamp or 0
    base_expiry = stored["base"].expiry_timestamp or 0
    assert before + SHORT_SECONDS - 1 <= route_expiry <= time.time() + SHORT_SECONDS + 1
    assert base_expiry >= before + 86_400 - 1
