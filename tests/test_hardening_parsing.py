"""Issue 8, "Request parsing" and "Configuration that silently does the wrong thing": hostile
bodies, careless expressions and configuration that looks right, over ASGI and WSGI.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from typing import Any

import pytest
from starlette.applications import Starlette

from idem_middleware import (
    IdempotencyConfig,
    IdempotencyMiddleware,
    IdempotencyRequest,
    IdempotencyWSGIMiddleware,
)
from idem_middleware.engine import IdempotencyEngine
from idem_middleware.keys import KeyDeriver
from idem_middleware.persistence import InMemoryPersistenceLayer
from idem_middleware.request import Headers
from tests.support.harness import Harness, Reply, assert_problem

KEY = [("Idempotency-Key", "order-1")]

MakeHarness = Callable[..., Harness]


def send(
    harness: Harness,
    method: str,
    path: str,
    *,
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
) -> Reply:
    """``harness.request``, but the method goes out as written: httpx upper-cases it, while
    ASGI servers (uvicorn, hypercorn) pass a lower-case request line's method as sent.
    """
    if harness.kind == "wsgi" or method.isupper():
        return harness.request(method, path, headers=headers, body=body)
    return asyncio.run(_raw_asgi(harness, method, path, headers or [], body))


async def _raw_asgi(
    harness: Harness, method: str, path: str, headers: list[tuple[str, str]], body: bytes
) -> Reply:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(n.lower().encode(), v.encode()) for n, v in headers],
        "server": ("testserver", 80),
        "client": ("127.0.0.1", 1234),
    }
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def capture(message: Any) -> None:
        sent.append(message)

    await harness.asgi_app(scope, receive, capture)
    start = sent[0]
    return Reply(
        status=start["status"],
        headers=[(n.decode().lower(), v.decode()) for n, v in start.get("headers", [])],
        body=b"".join(m.get("body", b"") for m in sent[1:]),
    )


# Hostile bodies ---------------------------------------------------------------------------

DEEP_JSON = b"[" * 100_000  # well under max_request_body_bytes

JMESPATH_CONFIGS = [
    ({"key_source": "body", "event_key_jmespath": "order_id"}, []),
    ({"key_source": "header_or_body", "event_key_jmespath": "order_id"}, []),
    ({"payload_validation_jmespath": "amount"}, KEY),
]


@pytest.mark.parametrize(
    ("config", "headers"), JMESPATH_CONFIGS, ids=["event-key", "either", "payload"]
)
def test_deeply_nested_json_is_400_not_a_recursion_error(
    make: MakeHarness, config: dict[str, object], headers: list[tuple[str, str]]
) -> None:
    harness = make(**config)
    reply = harness.request("POST", "/orders", headers=headers, body=DEEP_JSON)
    assert_problem(reply, 400, "request_body_invalid")
    assert harness.calls["orders"] == 0


class _Selects:
    """A compiled expression whose selection is ``value`` (as ``@`` selects a parsed body)."""

    def __init__(self, value: object) -> None:
        self.value = value

    def search(self, data: object) -> object:
        return self.value


def _deep_list(depth: int) -> list[Any]:
    deep: list[Any] = []
    for _ in range(depth):
        deep = [deep]
    return deep


@pytest.mark.parametrize("step", ["search", "dumps"])
def test_recursion_in_the_selection_or_its_serialisation_is_request_body_invalid(
    step: str,
) -> None:
    # A body that json.loads accepts can still be too deep for what comes next when the stack
    # is already deep (a framework, several middlewares): each step is guarded, not just loads.
    from idem_middleware.exceptions import IdempotencyKeyError

    deriver = KeyDeriver(IdempotencyConfig(key_source="body", event_key_jmespath="a"))
    payload = KeyDeriver(IdempotencyConfig(payload_validation_jmespath="a"))
    if step == "search":

        class Recurses:
            def search(self, data: object) -> object:
                raise RecursionError("maximum recursion depth exceeded in comparison")

        expression: Any = Recurses()
    else:
        expression = _Selects(_deep_list(100_000))
    deriver._event_key = expression
    payload._payload_selection = expression
    request = IdempotencyRequest("POST", "/orders", "", Headers(), b'{"a": 1}')
    with pytest.raises(IdempotencyKeyError):
        deriver.key_material(request)
    with pytest.raises(IdempotencyKeyError):
        payload.fingerprint(request)


HUGE = "1" + "0" * 400  # json.loads takes it as an int; adding a float to it overflows


@pytest.mark.parametrize(
    ("config", "body"),
    [
        ({"key_source": "body", "event_key_jmespath": "length(amount)"}, '{"amount": 5}'),
        ({"payload_validation_jmespath": "length(amount)"}, '{"amount": 5}'),
        ({"payload_validation_jmespath": "sort(items)"}, '{"items": [1, "a"]}'),
        ({"payload_validation_jmespath": "max_by(items, &p)"}, '{"items": [{"p": "x"}, {"p": 1}]}'),
        ({"payload_validation_jmespath": "sum(amounts)"}, f'{{"amounts": [{HUGE}, 1.5]}}'),
    ],
    ids=["event-key-length", "payload-length", "payload-sort", "payload-max-by", "overflow"],
)
def test_jmespath_errors_at_evaluation_are_request_body_invalid(
    make: MakeHarness, config: dict[str, object], body: str
) -> None:
    harness = make(**config)
    reply = harness.request("POST", "/orders", headers=KEY, body=body)
    assert_problem(reply, 400, "request_body_invalid")
    assert harness.calls["orders"] == 0


def test_a_string_with_a_lone_surrogate_is_keyed_not_a_crash(make: MakeHarness) -> None:
    # json.loads accepts "\ud800"; encoding it as UTF-8 would raise.
    harness = make(key_source="body", event_key_jmespath="order_id")
    body = b'{"order_id": "\\ud800"}'
    first = harness.request("POST", "/orders", body=body)
    retry = harness.request("POST", "/orders", body=body)
    assert first.status == 201
    assert retry.replayed
    assert harness.calls["orders"] == 1


# An all-null selection is no key -----------------------------------------------------------

NULL_SELECTIONS = ["[order_id, customer.id]", "{o: order_id, c: customer.id}", "order_id"]


@pytest.mark.parametrize("expression", NULL_SELECTIONS, ids=["list", "hash", "plain"])
def test_an_all_null_selection_is_no_key_and_passes_through(
    make: MakeHarness, expression: str
) -> None:
    harness = make(key_source="body", event_key_jmespath=expression)
    book = harness.request("POST", "/orders", json_body={"sku": "book"})
    pen = harness.request("POST", "/orders", json_body={"sku": "pen"})
    again = harness.request("POST", "/orders", json_body={"sku": "pen"})
    assert (book.status, pen.status, again.status) == (201, 201, 201)
    assert not pen.replayed
    assert not again.replayed
    assert harness.calls["orders"] == 3
    assert harness.persistence_layer.record_count == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize("expression", NULL_SELECTIONS, ids=["list", "hash", "plain"])
def test_an_all_null_selection_with_require_key_is_idempotency_key_missing(
    make: MakeHarness, expression: str
) -> None:
    harness = make(key_source="body", event_key_jmespath=expression, require_key=True)
    reply = harness.request("POST", "/orders", json_body={"sku": "book"})
    problem = assert_problem(reply, 400, "idempotency_key_missing")
    assert "header" not in problem["detail"]
    assert expression in problem["detail"]
    assert harness.calls["orders"] == 0


def test_a_partly_null_selection_is_still_a_key(make: MakeHarness) -> None:
    harness = make(key_source="body", event_key_jmespath="[order_id, customer.id]")
    harness.request("POST", "/orders", json_body={"order_id": "o-1", "sku": "book"})
    retry = harness.request("POST", "/orders", json_body={"order_id": "o-1", "sku": "book"})
    assert retry.replayed
    assert harness.calls["orders"] == 1


def test_an_empty_body_selects_nothing(make: MakeHarness) -> None:
    # No body is no JSON document to select from, not a malformed one: a body-keyed request
    # without a body carries no key, and a header-keyed one is fingerprinted on a null selection
    # (an action endpoint such as POST /payments/1/capture takes no body).
    keyless = make(key_source="body", event_key_jmespath="order_id")
    assert keyless.request("POST", "/orders").status == 201
    assert keyless.request("POST", "/orders").status == 201
    assert keyless.calls["orders"] == 2
    keyed = make(payload_validation_jmespath="amount")
    first = keyed.request("POST", "/orders", headers=KEY)
    retry = keyed.request("POST", "/orders", headers=KEY)
    assert first.status == 201
    assert retry.replayed
    assert keyed.calls["orders"] == 1


# The fingerprint under payload_validation_jmespath ------------------------------------------


def test_payload_validation_jmespath_keeps_the_query_in_the_fingerprint(
    make: MakeHarness,
) -> None:
    harness = make(payload_validation_jmespath="amount")
    first = harness.request("POST", "/orders?to=alice", headers=KEY, json_body={"amount": 5})
    other = harness.request("POST", "/orders?to=bob", headers=KEY, json_body={"amount": 5})
    assert_problem(other, 422, "idempotency_key_reused")
    retry = harness.request(
        "POST", "/orders?to=alice", headers=KEY, json_body={"amount": 5, "note": "ignored"}
    )
    assert retry.replayed
    assert retry.body == first.body
    assert harness.calls["orders"] == 1


def test_payload_validation_jmespath_keeps_method_and_path_in_the_fingerprint(
    make: MakeHarness,
) -> None:
    harness = make(payload_validation_jmespath="amount", methods={"POST", "PATCH"})
    harness.request("POST", "/orders", headers=KEY, json_body={"amount": 5})
    assert_problem(
        harness.request("PATCH", "/orders", headers=KEY, json_body={"amount": 5}),
        422,
        "idempotency_key_reused",
    )
    assert_problem(
        harness.request("POST", "/orders/1", headers=KEY, json_body={"amount": 5}),
        422,
        "idempotency_key_reused",
    )


def test_a_selection_fingerprint_without_a_query_is_unchanged() -> None:
    # Records stored before the query joined the selection fingerprint keep validating when
    # the request has no query (nearly every POST).
    deriver = KeyDeriver(IdempotencyConfig(payload_validation_jmespath="a"))
    request = IdempotencyRequest("POST", "/orders", "", Headers(), b'{"a": 1, "b": 2}')
    assert deriver.fingerprint(request) == hashlib.sha256(b"POST\0/orders\x001").hexdigest()


# Body keys are scoped to method and route ---------------------------------------------------


@pytest.mark.parametrize("key_source", ["body", "header_or_body"])
def test_body_keys_are_scoped_to_the_route_path(make: MakeHarness, key_source: str) -> None:
    harness = make(key_source=key_source)
    one = harness.request("PATCH", "/orders/1", json_body={"quantity": 7})
    two = harness.request("PATCH", "/orders/2", json_body={"quantity": 7})
    assert (one.status, two.status) == (201, 201)
    assert not two.replayed
    assert harness.calls["orders"] == 2
    assert harness.request("PATCH", "/orders/2", json_body={"quantity": 7}).replayed
    assert harness.calls["orders"] == 2


def test_body_keys_are_scoped_to_the_method(make: MakeHarness) -> None:
    harness = make(key_source="body", event_key_jmespath="order_id")
    post = harness.request("POST", "/orders", json_body={"order_id": "o-1"})
    patch = harness.request("PATCH", "/orders", json_body={"order_id": "o-1"})
    assert (post.status, patch.status) == (201, 201)
    assert not patch.replayed
    assert harness.calls["orders"] == 2


def test_header_keys_are_not_scoped_to_the_path(make: MakeHarness) -> None:
    harness = make(key_source="header_or_body")
    harness.request("PATCH", "/orders/1", headers=KEY, json_body={"quantity": 7})
    reused = harness.request("PATCH", "/orders/2", headers=KEY, json_body={"quantity": 7})
    assert_problem(reused, 422, "idempotency_key_reused")
    assert harness.calls["orders"] == 1


@pytest.mark.parametrize(
    ("key_source", "expected", "unexpected"),
    [
        ("body", "body", "header"),
        ("header_or_body", "Idempotency-Key header or a request body", None),
        ("header", "Idempotency-Key header", "body"),
    ],
)
def test_refusals_name_the_key_source(
    make: MakeHarness, key_source: str, expected: str, unexpected: str | None
) -> None:
    harness = make(key_source=key_source, require_key=True)
    problem = assert_problem(harness.request("POST", "/orders"), 400, "idempotency_key_missing")
    assert expected in problem["detail"]
    if unexpected is not None:
        assert unexpected not in problem["detail"]


# Method case ------------------------------------------------------------------------------


def test_a_lower_case_method_is_covered(make: MakeHarness) -> None:
    harness = make(require_key=True)
    assert_problem(send(harness, "post", "/orders"), 400, "idempotency_key_missing")
    first = send(harness, "post", "/orders", headers=KEY, body=b"{}")
    retry = send(harness, "post", "/orders", headers=KEY, body=b"{}")
    assert retry.replayed
    assert retry.body == first.body
    # The method's case is no part of the fingerprint: the upper-case retry is the same request.
    upper = send(harness, "POST", "/orders", headers=KEY, body=b"{}")
    assert upper.replayed
    if harness.kind == "wsgi":  # werkzeug routes "post" to the view; Starlette answers 405
        assert first.status == 201
        assert harness.calls["orders"] == 1


def test_method_case_does_not_change_the_fingerprint_or_body_key() -> None:
    deriver = KeyDeriver(IdempotencyConfig(key_source="body"))
    upper = IdempotencyRequest("POST", "/orders", "q=1", Headers(), b"{}")
    lower = IdempotencyRequest("post", "/orders", "q=1", Headers(), b"{}")
    assert deriver.fingerprint(lower) == deriver.fingerprint(upper)
    assert deriver.key_material(lower) == deriver.key_material(upper)


def test_covers_is_case_insensitive_for_methods() -> None:
    engine = IdempotencyEngine(InMemoryPersistenceLayer(), IdempotencyConfig(methods={"PATCH"}))
    assert all(engine.covers(m, "/x") for m in ("PATCH", "patch", "Patch", "pAtCh"))
    assert not any(engine.covers(m, "/x") for m in ("POST", "post", "get", "PATC", "patchh"))


# Route templates --------------------------------------------------------------------------


def test_include_paths_accepts_starlette_route_templates(make: MakeHarness) -> None:
    harness = make(include_paths=("/orders/{order_id}",), require_key=True)
    assert_problem(harness.request("POST", "/orders/1"), 400, "idempotency_key_missing")
    assert harness.request("POST", "/orders").status == 201  # not covered: one segment needed
    assert harness.calls["orders"] == 1


def test_exclude_paths_accepts_starlette_route_templates(make: MakeHarness) -> None:
    harness = make(exclude_paths=("/orders/{order_id:int}",), require_key=True)
    assert harness.request("POST", "/orders/1").status == 201
    assert_problem(harness.request("POST", "/orders/x"), 400, "idempotency_key_missing")
    assert_problem(harness.request("POST", "/orders"), 400, "idempotency_key_missing")


def test_path_converter_matches_the_rest_of_the_path(make: MakeHarness) -> None:
    harness = make(include_paths=("/public/{rest:path}",), require_key=True)
    assert_problem(harness.request("POST", "/public/a"), 400, "idempotency_key_missing")
    assert harness.request("POST", "/orders").status == 201


@pytest.mark.parametrize(
    ("pattern", "matches", "misses"),
    [
        (
            "/orders/{order_id}",
            ["/orders/1", "/orders/abc"],
            ["/orders", "/orders/", "/orders/1/x"],
        ),
        ("/orders/{id:int}", ["/orders/12"], ["/orders/x", "/orders/1.5", "/orders/1/x"]),
        ("/orders/{id:float}", ["/orders/1.5", "/orders/2"], ["/orders/x"]),
        (
            "/u/{id:uuid}",
            ["/u/123e4567-e89b-12d3-a456-426614174000"],
            ["/u/123", "/u/123e4567-e89b-12d3-a456-426614174000/x"],
        ),
        ("/files/{p:path}", ["/files/", "/files/a", "/files/a/b/c"], ["/file", "/filesx"]),
        ("/orders/{id:custom}", ["/orders/x"], ["/orders/x/y"]),  # a custom converter: a segment
        ("/o/{a}/items/{b}", ["/o/1/items/2"], ["/o/1/items", "/o/1/2/items/3"]),
        ("/orders/<order_id>", ["/orders/1"], ["/orders/1/x"]),  # Flask / werkzeug rules
        ("/files/<path:p>", ["/files/a/b"], ["/files"]),
        # Globs, as fnmatch reads them: "*" crosses "/".
        ("/orders/*", ["/orders/1", "/orders/1/items", "/orders/"], ["/orders", "/ordersx"]),
        ("/orders*", ["/orders", "/orders/1", "/ordersx"], ["/order"]),
        ("*/payments", ["/v1/payments", "/a/b/payments"], ["/payments/1"]),
        ("/v?/pay", ["/v1/pay"], ["/v10/pay"]),
        ("/v[12]/pay", ["/v1/pay", "/v2/pay"], ["/v3/pay"]),
        ("/v[!12]/pay", ["/v3/pay"], ["/v1/pay"]),
        ("/a.b+c(d)", ["/a.b+c(d)"], ["/aXb+c(d)"]),  # regex characters are literal
        ("/tenants/{t}/orders/*", ["/tenants/a/orders/1/x"], ["/tenants/a/b/orders/1"]),
    ],
)
def test_path_patterns(pattern: str, matches: list[str], misses: list[str]) -> None:
    from idem_middleware.routes import compile_paths

    compiled = compile_paths((pattern,))
    for path in matches:
        assert compiled.fullmatch(path), (pattern, path)
    for path in misses:
        assert not compiled.fullmatch(path), (pattern, path)


def test_several_patterns_are_one_regex() -> None:
    from idem_middleware.routes import compile_paths

    compiled = compile_paths(("/orders/{id}", "/pay*"))
    assert compiled.fullmatch("/orders/1")
    assert compiled.fullmatch("/payments/2")
    assert not compiled.fullmatch("/refunds")
    assert not compile_paths(()).fullmatch("/anything")


@pytest.mark.parametrize(
    "pattern",
    ["/orders/{", "/orders/{}", "/orders/{1d}", "/orders/{id:}", "/orders/}", "/orders/<id"],
)
@pytest.mark.parametrize("field", ["include_paths", "exclude_paths"])
def test_malformed_route_templates_are_refused(field: str, pattern: str) -> None:
    with pytest.raises(ValueError, match=field):
        IdempotencyConfig(**{field: (pattern,)})  # type: ignore[arg-type]


# Configuration that silently does the wrong thing ------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("include_paths", "/orders"),
        ("exclude_paths", "/x"),
        ("methods", "POST"),
        ("replay_excluded_headers", "set-cookie"),
        ("transient_statuses", 429),
        ("include_paths", b"/orders"),
        ("methods", None),
    ],
)
def test_a_scalar_where_a_collection_is_expected_is_refused(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field) as raised:
        IdempotencyConfig(**{field: value})  # type: ignore[arg-type]
    assert "expected a collection" in str(raised.value)


@pytest.mark.parametrize("key_source", ["body", "header_or_body"])
def test_event_key_jmespath_needs_a_body_key_source(key_source: str) -> None:
    with pytest.raises(ValueError, match="event_key_jmespath"):
        IdempotencyConfig(event_key_jmespath="order_id")
    assert IdempotencyConfig(key_source=key_source, event_key_jmespath="order_id")  # type: ignore[arg-type]


def test_expiry_shorter_than_the_lease_is_refused() -> None:
    with pytest.raises(ValueError, match="expires_after_seconds"):
        IdempotencyConfig(expires_after_seconds=30, in_progress_expires_after_seconds=60)
    with pytest.raises(ValueError, match="expires_after_seconds"):
        IdempotencyConfig(expires_after_seconds=9)  # the default lease is 10 s
    equal = IdempotencyConfig(expires_after_seconds=60, in_progress_expires_after_seconds=60)
    assert equal.expires_after_seconds == 60


@pytest.mark.parametrize(
    "layer",
    [InMemoryPersistenceLayer, "memory://", None, object()],
    ids=["class", "string", "none", "object"],
)
@pytest.mark.parametrize("adapter", ["engine", "asgi", "wsgi"])
def test_a_persistence_layer_that_is_not_one_is_a_type_error(adapter: str, layer: object) -> None:
    builders: dict[str, Callable[[], object]] = {
        "engine": lambda: IdempotencyEngine(layer),  # type: ignore[arg-type]
        "asgi": lambda: IdempotencyMiddleware(Starlette(), persistence_layer=layer),  # type: ignore[arg-type]
        "wsgi": lambda: IdempotencyWSGIMiddleware(lambda e, s: [], persistence_layer=layer),  # type: ignore[arg-type]
    }
    with pytest.raises(TypeError, match="persistence_layer"):
        builders[adapter]()


# Startup warning without scope -------------------------------------------------------------


def _scope_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        record
        for record in caplog.records
        if record.name == "idem_middleware"
        and record.levelno == logging.WARNING
        and "scope" in record.getMessage()
    ]


@pytest.mark.parametrize("key_source", ["header", "header_or_body", "body"])
def test_no_scope_warns_once_at_startup(
    make: MakeHarness, caplog: pytest.LogCaptureFixture, key_source: str
) -> None:
    caplog.set_level(logging.WARNING, logger="idem_middleware")
    harness = make(key_source=key_source)
    assert len(_scope_warnings(caplog)) == 1
    harness.request("POST", "/orders", headers=KEY, json_body={"a": 1})
    harness.request("POST", "/orders", headers=KEY, json_body={"a": 1})
    (warning,) = _scope_warnings(caplog)  # startup only, never per request
    assert "IdempotencyConfig.scope" in warning.getMessage()
    assert "another client" in warning.getMessage()


def test_a_scope_silences_the_warning(make: MakeHarness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="idem_middleware")
    make(scope=lambda request: request.headers.get("authorization", ""))
    assert _scope_warnings(caplog) == []
