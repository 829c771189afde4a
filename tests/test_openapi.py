"""``document_idempotency``: a real FastAPI app's ``/openapi.json``, parsed and validated, says
what the middleware does to each operation, and the middleware does what it says.
"""

from __future__ import annotations

import asyncio
import copy
import importlib
import os
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from openapi_spec_validator import validate as validate_spec
from pydantic import BaseModel

from idem_middleware import IdempotencyConfig, IdempotencyMiddleware
from idem_middleware.openapi import add_idempotency_to_openapi, document_idempotency
from idem_middleware.persistence import InMemoryPersistenceLayer

PROBLEM_REF = "#/components/schemas/IdempotencyProblem"
PROBLEM = "application/problem+json"
CONFIG = IdempotencyConfig(
    include_paths=("/orders", "/orders/{order_id:int}", "/reports/*"),
    exclude_paths=("/reports/{name}/preview",),
    require_key=True,
)
# (method, OpenAPI path, a concrete path, covered by CONFIG)
OPERATIONS = [
    ("post", "/orders", "/orders", True),
    ("patch", "/orders/{order_id}", "/orders/7", True),  # template with an int converter
    ("get", "/orders/{order_id}", "/orders/7", False),  # method not covered
    ("post", "/orders/{order_id}/notes", "/orders/7/notes", False),  # {order_id:int}: 1 segment
    ("post", "/reports/{name}", "/reports/monthly", True),  # glob
    ("post", "/reports/{name}/preview", "/reports/monthly/preview", False),  # excluded template
    ("post", "/ping", "/ping", False),  # not included
]


class Order(BaseModel):
    item: str
    quantity: int = 1


def build_app(config: IdempotencyConfig | None = CONFIG, *, document: bool = True) -> FastAPI:
    app = FastAPI(title="Orders")

    @app.post("/orders", status_code=201)
    def create_order(order: Order) -> dict[str, Any]:
        return {"id": 1, **order.model_dump()}

    @app.patch("/orders/{order_id}")
    def update_order(order_id: int, order: Order) -> dict[str, Any]:
        return {"id": order_id, **order.model_dump()}

    @app.get("/orders/{order_id}")
    def get_order(order_id: int) -> dict[str, Any]:
        return {"id": order_id}

    @app.post("/orders/{order_id}/notes", status_code=201)
    def add_note(order_id: int) -> dict[str, Any]:
        return {"order": order_id}

    @app.post("/reports/{name}", status_code=202)
    def run_report(name: str) -> dict[str, str]:
        return {"report": name}

    @app.post("/reports/{name}/preview")
    def preview_report(name: str) -> dict[str, str]:
        return {"preview": name}

    @app.post("/ping")
    def ping() -> dict[str, str]:
        return {"pong": "ok"}

    if config is not None:
        app.add_middleware(
            IdempotencyMiddleware, persistence_layer=InMemoryPersistenceLayer(), config=config
        )
        if document:
            document_idempotency(app, config)
    return app


def call(app: Any, method: str, path: str, **kwargs: Any) -> httpx.Response:
    async def send() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(send())


def openapi_json(app: FastAPI) -> dict[str, Any]:
    response = call(app, "GET", "/openapi.json")
    assert response.status_code == 200
    document: dict[str, Any] = response.json()
    return document


def key_parameter(operation: dict[str, Any]) -> dict[str, Any] | None:
    found = [p for p in operation.get("parameters", []) if p["name"] == "Idempotency-Key"]
    assert len(found) <= 1
    return found[0] if found else None


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return openapi_json(build_app())


def test_the_document_is_valid_openapi(document: dict[str, Any]) -> None:
    validate_spec(document)
    assert document["openapi"].startswith("3.1")


@pytest.mark.parametrize(("method", "template", "path", "covered"), OPERATIONS)
def test_covered_operations_document_the_key_and_the_problems(
    document: dict[str, Any], method: str, template: str, path: str, covered: bool
) -> None:
    operation = document["paths"][template][method]
    parameter = key_parameter(operation)
    responses = operation["responses"]
    if not covered:
        assert parameter is None
        assert not {"400", "409", "413", "503"} & set(responses)
        assert all(PROBLEM not in r.get("content", {}) for r in responses.values())
        return
    assert parameter is not None
    assert (parameter["in"], parameter["required"]) == ("header", True)
    assert parameter["schema"] == {"type": "string", "minLength": 1, "maxLength": 255}
    for status in ("400", "409", "413", "422", "503"):
        assert responses[status]["content"][PROBLEM]["schema"] == {"$ref": PROBLEM_REF}
    assert set(responses["400"]["content"][PROBLEM]["examples"]) == {
        "idempotency_key_missing",
        "idempotency_key_invalid",
        "request_body_incomplete",
    }
    assert set(responses["409"]["content"][PROBLEM]["examples"]) == {"idempotency_key_in_use"}
    assert "Retry-After" in responses["409"]["headers"]
    assert "Retry-After" in responses["503"]["headers"]
    success = next(status for status in responses if status.startswith("2"))
    replayed = responses[success]["headers"]["Idempotent-Replayed"]
    assert replayed["schema"] == {"type": "string", "enum": ["true"]}
    assert "Idempotent-Replayed" not in responses["409"].get("headers", {})


def test_the_documented_coverage_is_what_the_middleware_enforces() -> None:
    """Each operation without a key: 400 idempotency_key_missing exactly when the document
    says the header is required.
    """
    app = build_app()
    document = openapi_json(app)
    for method, template, path, _ in OPERATIONS:
        parameter = key_parameter(document["paths"][template][method])
        documented_required = parameter is not None and parameter["required"]
        response = call(app, method.upper(), path, json={"item": "book"})
        refused = response.status_code == 400 and response.json().get("code") == (
            "idempotency_key_missing"
        )
        assert refused == documented_required, (method, path, response.status_code)


def test_the_package_422_and_fastapi_validation_422_are_told_apart(
    document: dict[str, Any],
) -> None:
    unprocessable = document["paths"]["/orders"]["post"]["responses"]["422"]
    content = unprocessable["content"]
    assert content["application/json"]["schema"] == {
        "$ref": "#/components/schemas/HTTPValidationError"
    }
    assert content[PROBLEM]["schema"] == {"$ref": PROBLEM_REF}
    assert set(content[PROBLEM]["examples"]) == {"idempotency_key_reused"}
    assert "Validation Error" in unprocessable["description"]
    assert "idempotency_key_reused" in unprocessable["description"]
    # FastAPI's validation error is the app's answer: stored, so it may be a replay.
    assert "Idempotent-Replayed" in unprocessable["headers"]

    problem = document["components"]["schemas"]["IdempotencyProblem"]
    assert set(problem["required"]) == {"type", "title", "status", "detail", "code"}
    assert "idempotency_key_reused" in problem["properties"]["code"]["enum"]
    assert "HTTPValidationError" in document["components"]["schemas"]

    # And on the wire: each 422 comes with the media type its schema is documented under.
    app = build_app()
    headers = {"Idempotency-Key": "k-1"}
    assert call(app, "POST", "/orders", json={"item": "a"}, headers=headers).status_code == 201
    reused = call(app, "POST", "/orders", json={"item": "b"}, headers=headers)
    invalid = call(app, "POST", "/orders", json={"quantity": 1}, headers={"Idempotency-Key": "k2"})
    assert (reused.status_code, reused.headers["content-type"]) == (422, PROBLEM)
    assert (invalid.status_code, invalid.headers["content-type"]) == (422, "application/json")


def test_the_same_document_without_document_idempotency_says_nothing() -> None:
    """The check above can fail: FastAPI alone documents none of it."""
    plain = openapi_json(build_app(document=False))
    operation = plain["paths"]["/orders"]["post"]
    assert key_parameter(operation) is None
    assert PROBLEM not in operation["responses"]["422"]["content"]
    assert "IdempotencyProblem" not in plain.get("components", {}).get("schemas", {})


@pytest.mark.parametrize(
    ("config", "required", "statuses"),
    [
        (IdempotencyConfig(), False, {"400", "409", "413", "422", "503"}),
        (IdempotencyConfig(on_store_error="passthrough"), False, {"400", "409", "413", "422"}),
        (IdempotencyConfig(key_source="header_or_body", require_key=True), False, None),
        (IdempotencyConfig(key_source="body", require_key=True), None, None),
    ],
    ids=["optional-key", "passthrough-no-503", "header-or-body", "body-no-header"],
)
def test_options_shape_the_document(
    config: IdempotencyConfig, required: bool | None, statuses: set[str] | None
) -> None:
    document = openapi_json(build_app(config))
    validate_spec(document)
    operation = document["paths"]["/orders"]["post"]
    parameter = key_parameter(operation)
    if required is None:
        assert parameter is None
    else:
        assert parameter is not None
        assert parameter["required"] is required
    problems = {s for s, r in operation["responses"].items() if PROBLEM in r.get("content", {})}
    if statuses is not None:
        assert problems == statuses
    missing = operation["responses"]["400"]["content"][PROBLEM]["examples"]
    assert ("idempotency_key_missing" in missing) is config.require_key


def test_a_json_selection_documents_request_body_invalid() -> None:
    config = IdempotencyConfig(payload_validation_jmespath="item")
    operation = openapi_json(build_app(config))["paths"]["/orders"]["post"]
    assert "request_body_invalid" in operation["responses"]["400"]["content"][PROBLEM]["examples"]


def test_documenting_is_idempotent() -> None:
    app = build_app()
    first = copy.deepcopy(app.openapi())
    assert app.openapi() == first
    assert add_idempotency_to_openapi(copy.deepcopy(first), CONFIG) == first
    app.openapi_schema = None  # regenerated: documented again, once
    assert app.openapi() == first


def test_an_app_problem_response_of_its_own_is_kept() -> None:
    own = {"$ref": "#/components/schemas/OrderConflict"}
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "t", "version": "1"},
        "paths": {
            "/orders": {
                "post": {
                    "responses": {
                        "201": {"description": "Created"},
                        "409": {
                            "description": "Out of stock",
                            "content": {PROBLEM: {"schema": own}},
                        },
                    }
                }
            }
        },
        "components": {"schemas": {"OrderConflict": {"type": "object"}}},
    }
    add_idempotency_to_openapi(document, IdempotencyConfig())
    conflict = document["paths"]["/orders"]["post"]["responses"]["409"]
    assert conflict["content"][PROBLEM]["schema"] == {"oneOf": [own, {"$ref": PROBLEM_REF}]}
    assert conflict["description"].startswith("Out of stock | Idempotency")
    validate_spec(document)


def test_the_fastapi_example_app_documents_its_payments(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("IDEM_", "EXAMPLE_")):
            monkeypatch.delenv(name)
    module = importlib.reload(importlib.import_module("example_apps.fastapi_app"))
    document = openapi_json(module.app)
    validate_spec(document)
    paths = document["paths"]
    for template in ("/payments", "/payments/{payment_id}/refunds"):
        parameter = key_parameter(paths[template]["post"])
        assert parameter is not None
        assert parameter["required"] is True
    assert key_parameter(paths["/payments/{payment_id}"]["get"]) is None
    assert key_parameter(paths["/health"]["get"]) is None
