"""``response_hook``: a callable that adjusts replays (a header, a redacted field) before they
are sent; over ASGI and WSGI; a failing hook sends the stored replay unchanged, never a 500.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import replace
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from idem_middleware import (
    IdempotencyConfig,
    IdempotencyMiddleware,
    IdempotencyRequest,
    StoredResponse,
    idempotent,
)
from idem_middleware.persistence import InMemoryPersistenceLayer
from tests.support.harness import Harness

KEY = [("Idempotency-Key", "order-1")]
ORDER = {"item": "book"}


def mark_replay(response: StoredResponse, request: IdempotencyRequest) -> StoredResponse:
    """Add a header naming the retry's own trace id."""
    trace = request.headers.get("x-trace", "none")
    return replace(response, headers=(*response.headers, ("x-replayed-for", trace)))


def redact_path(response: StoredResponse, request: IdempotencyRequest) -> StoredResponse:
    """Replace a field of the JSON body (its length changes)."""
    document = json.loads(response.body)
    document["path"] = "[redacted for replays]"
    return replace(response, body=json.dumps(document).encode())


@pytest.fixture(params=["asgi", "wsgi"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def harness(kind: str, **options: Any) -> Harness:
    return Harness(kind, InMemoryPersistenceLayer(), IdempotencyConfig(**options))


def test_the_hook_adjusts_replays(kind: str) -> None:
    h = harness(kind, response_hook=mark_replay)

    first = h.request("POST", "/orders", headers=KEY, json_body=ORDER)
    retry = h.request("POST", "/orders", headers=[*KEY, ("x-trace", "t-2")], json_body=ORDER)

    assert first.header("x-replayed-for") is None  # the first execution is the app's own
    assert retry.replayed
    assert retry.header("x-replayed-for") == "t-2"  # the hook saw the retry's request
    assert retry.body == first.body
    assert h.calls["orders"] == 1


def test_a_hook_that_changes_the_body_gets_a_matching_content_length(kind: str) -> None:
    h = harness(kind, response_hook=redact_path)

    first = h.request("POST", "/orders", headers=KEY, json_body=ORDER)
    retry = h.request("POST", "/orders", headers=KEY, json_body=ORDER)

    assert first.json()["path"] == "/orders"
    assert retry.json()["path"] == "[redacted for replays]"
    assert retry.json()["order"] == first.json()["order"]
    assert retry.headers_named("content-length") == [str(len(retry.body))]
    assert len(retry.body) != len(first.body)


def test_the_hook_leaves_the_stored_record_alone(kind: str) -> None:
    h = harness(kind, response_hook=redact_path)

    first = h.request("POST", "/orders", headers=KEY, json_body=ORDER)
    h.request("POST", "/orders", headers=KEY, json_body=ORDER)
    record = next(iter(h.persistence_layer._records.values()))  # type: ignore[attr-defined]

    assert record.response.body == first.body


def broken(response: StoredResponse, request: IdempotencyRequest) -> StoredResponse:
    raise RuntimeError("hook bug")


def wrong_type(response: StoredResponse, request: IdempotencyRequest) -> StoredResponse:
    return {"status": 200}  # type: ignore[return-value]


@pytest.mark.parametrize("hook", [broken, wrong_type], ids=["raises", "returns-a-dict"])
def test_a_failing_hook_sends_the_stored_replay_unchanged(
    kind: str, hook: Any, caplog: pytest.LogCaptureFixture
) -> None:
    h = harness(kind, response_hook=hook)
    plain = harness(kind)

    with caplog.at_level(logging.ERROR, logger="idem_middleware"):
        h.request("POST", "/orders", headers=KEY, json_body=ORDER)
        retry = h.request("POST", "/orders", headers=KEY, json_body=ORDER)
    plain.request("POST", "/orders", headers=KEY, json_body=ORDER)
    unhooked = plain.request("POST", "/orders", headers=KEY, json_body=ORDER)

    assert retry.status == 201
    assert retry.replayed
    assert retry.body == unhooked.body
    assert retry.headers == unhooked.headers
    assert h.calls["orders"] == 1
    assert any("response_hook failed" in r.getMessage() for r in caplog.records)


def test_the_hook_is_not_called_for_problems(kind: str) -> None:
    calls: Counter[int] = Counter()

    def counting(response: StoredResponse, request: IdempotencyRequest) -> StoredResponse:
        calls[response.status] += 1
        return response

    h = harness(kind, response_hook=counting, require_key=True)
    missing = h.request("POST", "/orders", json_body=ORDER)
    h.request("POST", "/orders", headers=KEY, json_body=ORDER)
    reused = h.request("POST", "/orders", headers=KEY, json_body={"item": "pen"})
    h.request("POST", "/orders", headers=KEY, json_body=ORDER)

    assert (missing.status, reused.status) == (400, 422)
    assert calls == Counter({201: 1})  # the replay only


def test_replays_from_the_local_cache_go_through_the_hook(kind: str) -> None:
    h = harness(kind, response_hook=mark_replay, use_local_cache=True)

    h.request("POST", "/orders", headers=KEY, json_body=ORDER)
    retry = h.request("POST", "/orders", headers=[*KEY, ("x-trace", "cached")], json_body=ORDER)

    assert retry.header("x-replayed-for") == "cached"


def test_the_hook_must_be_callable() -> None:
    with pytest.raises(ValueError, match="response_hook: must be callable"):
        IdempotencyConfig(response_hook="add-a-header")  # type: ignore[arg-type]


def test_a_per_route_hook() -> None:
    calls: Counter[str] = Counter()
    app = FastAPI()
    app.add_middleware(IdempotencyMiddleware, persistence_layer=InMemoryPersistenceLayer())

    @app.post("/hooked", status_code=201)
    @idempotent(response_hook=mark_replay)
    def hooked() -> dict[str, int]:
        calls["hooked"] += 1
        return {"n": calls["hooked"]}

    @app.post("/plain", status_code=201)
    def plain() -> dict[str, int]:
        calls["plain"] += 1
        return {"n": calls["plain"]}

    with TestClient(app) as client:
        for path in ("/hooked", "/plain"):
            client.post(path, headers={"Idempotency-Key": path, "x-trace": "t"})
        hooked_retry = client.post(
            "/hooked", headers={"Idempotency-Key": "/hooked", "x-trace": "t"}
        )
        plain_retry = client.post("/plain", headers={"Idempotency-Key": "/plain", "x-trace": "t"})

    assert hooked_retry.headers["idempotent-replayed"] == "true"
    assert hooked_retry.headers["x-replayed-for"] == "t"
    assert "x-replayed-for" not in plain_retry.headers
    assert plain_retry.headers["idempotent-replayed"] == "true"
