"""The README's HTTP behaviour table, row by row, over ASGI (Starlette) and WSGI (Flask)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest

from idem_middleware import IdempotencyEvent, IdempotencyRequest
from idem_middleware.exceptions import IdempotencyPersistenceLayerError
from idem_middleware.persistence import DataRecord, InMemoryPersistenceLayer
from tests.support.harness import Harness, assert_problem

KEY = [("Idempotency-Key", "order-1")]
ORDER = {"sku": "book", "quantity": 1}

MakeHarness = Callable[..., Harness]


# First request, replay -------------------------------------------------------------------


def test_first_request_runs_the_handler_and_is_not_marked_replayed(make: MakeHarness) -> None:
    harness = make()
    reply = harness.request("POST", "/orders", headers=KEY, json_body=ORDER)
    assert reply.status == 201
    assert reply.json()["order"] == 1
    assert not reply.replayed
    assert reply.header("set-cookie") is not None  # the first client gets the response untouched
    assert harness.calls["orders"] == 1


def test_retry_after_completion_replays_status_headers_and_body_byte_exact(
    make: MakeHarness,
) -> None:
    harness = make()
    first = harness.request("POST", "/orders", headers=KEY, json_body=ORDER)
    retry = harness.request("POST", "/orders", headers=KEY, json_body=ORDER)
    assert retry.status == first.status == 201
    assert retry.body == first.body
    assert retry.replayed
    assert retry.header("x-order-count") == "1"
    assert retry.header("content-type") == first.header("content-type")
    assert retry.header("content-length") == str(len(first.body))
    assert harness.calls["orders"] == 1


def test_replay_never_carries_excluded_headers(make: MakeHarness) -> None:
    harness = make()
    first = harness.request("POST", "/orders", headers=KEY, json_body=ORDER)
    assert (first.header("server"), first.header("date")) == (
        "harness/1.0",
        "Sat, 28 Nov 2026 12:00:00 GMT",
    ), "the first response is the app's own"
    retry = harness.request("POST", "/orders", headers=KEY, json_body=ORDER)
    assert retry.replayed
    assert retry.header("set-cookie") is None
    assert retry.header("server") is None
    assert retry.header("date") is None


def test_binary_body_is_replayed_byte_exact(make: MakeHarness) -> None:
    harness = make()
    first = harness.request("POST", "/binary", headers=KEY)
    retry = harness.request("POST", "/binary", headers=KEY)
    assert first.body == bytes(range(256)) * 4
    assert retry.body == first.body
    assert retry.replayed
    assert harness.calls["binary"] == 1


def test_204_is_replayed_without_a_body_or_content_length(make: MakeHarness) -> None:
    harness = make()
    first = harness.request("POST", "/no-content", headers=KEY)
    retry = harness.request("POST", "/no-content", headers=KEY)
    assert first.status == retry.status == 204
    assert retry.body == b""
    assert retry.header("content-length") is None
    assert retry.replayed
    assert harness.calls["no_content"] == 1


# In flight -------------------------------------------------------------------------------


def test_retry_while_the_first_is_in_flight_gets_409_with_retry_after(make: MakeHarness) -> None:
    harness = make()
    # The handler sends the same request again while it holds the key.
    reply = harness.request("POST", "/reentrant", headers=KEY, json_body=ORDER)
    assert reply.status == 200
    nested = reply.json()
    assert nested["nested_status"] == 409
    assert nested["nested"]["code"] == "idempotency_key_in_use"
    assert nested["nested_retry_after"] is not None
    assert harness.calls["reentrant"] == 1
    retry = harness.request("POST", "/reentrant", headers=KEY, json_body=ORDER)
    assert retry.replayed
    assert retry.body == reply.body


# Fingerprint mismatch ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/orders", b'{"sku":"book","quantity":2}'),  # body
        ("PATCH", "/orders", b'{"sku": "book", "quantity": 1}'),  # method
        ("POST", "/orders/7", b'{"sku": "book", "quantity": 1}'),  # path
        ("POST", "/orders?express=1", b'{"sku": "book", "quantity": 1}'),  # query
    ],
)
def test_same_key_different_fingerprint_is_422_and_leaves_the_record_intact(
    make: MakeHarness, method: str, path: str, body: bytes
) -> None:
    harness = make()
    original = b'{"sku": "book", "quantity": 1}'
    first = harness.request("POST", "/orders", headers=KEY, body=original)
    reused = harness.request(method, path, headers=KEY, body=body)
    assert_problem(reused, 422, "idempotency_key_reused")
    assert harness.calls["orders"] == 1
    retry = harness.request("POST", "/orders", headers=KEY, body=original)
    assert retry.replayed
    assert retry.body == first.body


# Missing and invalid keys -----------------------------------------------------------------


def test_missing_key_with_require_key_is_400(make: MakeHarness) -> None:
    harness = make(require_key=True)
    reply = harness.request("POST", "/orders", json_body=ORDER)
    assert_problem(reply, 400, "idempotency_key_missing")
    assert harness.calls["orders"] == 0


def test_missing_key_without_require_key_passes_through_undeduplicated(make: MakeHarness) -> None:
    harness = make()
    first = harness.request("POST", "/orders", json_body=ORDER)
    second = harness.request("POST", "/orders", json_body=ORDER)
    assert (first.status, second.status) == (201, 201)
    assert not second.replayed
    assert harness.calls["orders"] == 2


@pytest.mark.parametrize(
    "value",
    [
        "",
        '""',
        "k" * 256,
        '"' + "k" * 256 + '"',
        "ключ",
        '"abc',
        '"a" "b"',
        "has space",
        "a,b",
        '"a", "b"',
        '"tab\there"',
    ],
    ids=[
        "empty",
        "empty-quoted",
        "too-long",
        "too-long-quoted",
        "non-ascii",
        "unterminated-quote",
        "two-strings",
        "space",
        "list",
        "quoted-list",
        "control-char",
    ],
)
def test_invalid_key_is_400(make: MakeHarness, value: str) -> None:
    harness = make()
    reply = harness.request(
        "POST", "/orders", headers=[("Idempotency-Key", value)], json_body=ORDER
    )
    assert_problem(reply, 400, "idempotency_key_invalid")
    assert harness.calls["orders"] == 0


def test_repeated_key_header_is_400(make: MakeHarness) -> None:
    harness = make()
    reply = harness.request(
        "POST",
        "/orders",
        headers=[("Idempotency-Key", "a"), ("Idempotency-Key", "b")],
        json_body=ORDER,
    )
    assert_problem(reply, 400, "idempotency_key_invalid")
    assert harness.calls["orders"] == 0


def test_key_of_255_characters_is_accepted(make: MakeHarness) -> None:
    harness = make()
    reply = harness.request("POST", "/orders", headers=[("Idempotency-Key", "k" * 255)])
    assert reply.status == 201


def test_sf_string_and_bare_token_name_the_same_key(make: MakeHarness) -> None:
    harness = make()
    first = harness.request("POST", "/orders", headers=[("Idempotency-Key", '"abc-123"')])
    retry = harness.request("POST", "/orders", headers=[("Idempotency-Key", "abc-123")])
    assert retry.replayed
    assert retry.body == first.body
    assert harness.calls["orders"] == 1


def test_header_name_is_matched_case_insensitively(make: MakeHarness) -> None:
    harness = make()
    harness.request("POST", "/orders", headers=[("idempotency-key", "abc")])
    retry = harness.request("POST", "/orders", headers=[("IDEMPOTENCY-KEY", "abc")])
    assert retry.replayed


# Failures of the handler ------------------------------------------------------------------


def test_handler_exception_releases_the_key_so_the_retry_runs_again(make: MakeHarness) -> None:
    harness = make()
    first = harness.request("POST", "/boom", headers=KEY)
    retry = harness.request("POST", "/boom", headers=KEY)
    assert first.status == retry.status == 500
    assert not retry.replayed
    assert harness.calls["boom"] == 2


def test_5xx_releases_the_key_by_default(make: MakeHarness) -> None:
    harness = make()
    harness.request("POST", "/server-error", headers=KEY)
    retry = harness.request("POST", "/server-error", headers=KEY)
    assert retry.status == 503
    assert not retry.replayed
    assert harness.calls["server_error"] == 2


def test_5xx_is_stored_and_replayed_with_store_server_errors(make: MakeHarness) -> None:
    harness = make(store_server_errors=True)
    first = harness.request("POST", "/server-error", headers=KEY)
    retry = harness.request("POST", "/server-error", headers=KEY)
    assert retry.status == 503
    assert retry.replayed
    assert retry.body == first.body
    assert harness.calls["server_error"] == 1


@pytest.mark.parametrize("status", [408, 425, 429])
def test_transient_status_releases_the_key_so_the_retry_runs_again(
    make: MakeHarness, status: int
) -> None:
    harness = make(store_server_errors=True)  # transient outcomes are never stored
    first = harness.request("POST", f"/status?code={status}", headers=KEY)
    retry = harness.request("POST", f"/status?code={status}", headers=KEY)
    assert first.status == retry.status == status
    assert not retry.replayed
    assert harness.calls["status"] == 2


def test_transient_statuses_are_configurable(make: MakeHarness) -> None:
    harness = make(transient_statuses={409})
    harness.request("POST", "/status?code=409", headers=KEY)
    harness.request("POST", "/status?code=409", headers=KEY)
    harness.request("POST", "/status?code=429", headers=[("Idempotency-Key", "other")])
    replay = harness.request("POST", "/status?code=429", headers=[("Idempotency-Key", "other")])
    assert harness.calls["status"] == 3
    assert replay.replayed
    assert replay.status == 429


def test_4xx_is_stored_and_replayed(make: MakeHarness) -> None:
    harness = make()
    first = harness.request("POST", "/bad-request", headers=KEY)
    retry = harness.request("POST", "/bad-request", headers=KEY)
    assert first.status == retry.status == 400
    assert retry.replayed
    assert retry.body == first.body
    assert harness.calls["bad_request"] == 1


# Sizes ------------------------------------------------------------------------------------


def test_request_body_over_the_limit_is_413_and_the_handler_does_not_run(
    make: MakeHarness,
) -> None:
    harness = make(max_request_body_bytes=100)
    reply = harness.request("POST", "/orders", headers=KEY, body=b"x" * 101)
    assert_problem(reply, 413, "request_body_too_large")
    assert harness.calls["orders"] == 0
    at_limit = harness.request("POST", "/orders", headers=KEY, body=b"x" * 100)
    assert at_limit.status == 201


def test_response_over_the_stored_limit_streams_through_and_replays_without_body(
    make: MakeHarness,
) -> None:
    harness = make(max_stored_response_bytes=1000)
    first = harness.request("POST", "/big?size=5000", headers=KEY)
    assert first.status == 200
    assert first.body == b"x" * 5000
    retry = harness.request("POST", "/big?size=5000", headers=KEY)
    assert retry.status == 200
    assert retry.replayed
    assert retry.header("idempotent-body-omitted") == "true"
    assert retry.body == b""
    assert retry.header("content-type") == "application/octet-stream"
    assert harness.calls["big"] == 1


def test_response_at_the_stored_limit_is_kept_whole(make: MakeHarness) -> None:
    harness = make(max_stored_response_bytes=1000)
    harness.request("POST", "/big?size=1000", headers=KEY)
    retry = harness.request("POST", "/big?size=1000", headers=KEY)
    assert retry.body == b"x" * 1000
    assert retry.header("idempotent-body-omitted") is None


# Store outages ----------------------------------------------------------------------------


class UnreachableLayer(InMemoryPersistenceLayer):
    def _put_record(self, data_record: DataRecord) -> None:
        raise IdempotencyPersistenceLayerError("store down") from ConnectionRefusedError(111)


def test_store_unreachable_rejects_with_503_and_does_not_run_the_handler(
    make: MakeHarness,
) -> None:
    harness = make(UnreachableLayer())
    reply = harness.request("POST", "/orders", headers=KEY, json_body=ORDER)
    assert_problem(reply, 503, "idempotency_store_unavailable")
    assert reply.header("retry-after") is not None
    assert harness.calls["orders"] == 0


def test_store_unreachable_with_passthrough_runs_the_handler_and_warns(
    make: MakeHarness, caplog: pytest.LogCaptureFixture
) -> None:
    harness = make(UnreachableLayer(), on_store_error="passthrough")
    with caplog.at_level(logging.WARNING, logger="idem_middleware"):
        reply = harness.request("POST", "/orders", headers=KEY, json_body=ORDER)
    assert reply.status == 201
    assert harness.calls["orders"] == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("store_error" in r.getMessage() for r in warnings)
    assert all("order-1" not in r.getMessage() for r in caplog.records)  # raw key never logged


# Coverage ---------------------------------------------------------------------------------


def test_uncovered_method_passes_through_even_with_a_key(make: MakeHarness) -> None:
    harness = make()
    first = harness.request("GET", "/orders", headers=KEY)
    second = harness.request("GET", "/orders", headers=KEY)
    assert first.status == second.status == 200
    assert not second.replayed
    assert harness.calls["list"] == 2


def test_methods_option_selects_covered_methods(make: MakeHarness) -> None:
    harness = make(methods={"PUT"})
    harness.request("POST", "/orders", headers=KEY)
    harness.request("POST", "/orders", headers=KEY)
    assert harness.calls["orders"] == 2
    harness.request("PUT", "/orders", headers=KEY)
    assert harness.request("PUT", "/orders", headers=KEY).replayed
    assert harness.calls["orders"] == 3


def test_include_and_exclude_paths(make: MakeHarness) -> None:
    harness = make(include_paths=("/orders*",), exclude_paths=("/orders/7",))
    harness.request("POST", "/orders/1", headers=KEY)
    assert harness.request("POST", "/orders/1", headers=KEY).replayed
    for _ in range(2):
        excluded = harness.request("POST", "/orders/7", headers=[("Idempotency-Key", "x")])
        assert not excluded.replayed
    for _ in range(2):
        outside = harness.request("POST", "/public/a", headers=[("Idempotency-Key", "y")])
        assert not outside.replayed
    assert harness.calls["orders"] == 5


# Scope and key sources --------------------------------------------------------------------


def _user_scope(request: IdempotencyRequest) -> str:
    return "user:" + request.headers.get("authorization", "anonymous")


def test_scope_keeps_two_principals_apart(make: MakeHarness) -> None:
    harness = make(scope=_user_scope)
    alice = [*KEY, ("Authorization", "alice")]
    bob = [*KEY, ("Authorization", "bob")]
    first = harness.request("POST", "/orders", headers=alice, json_body=ORDER)
    other = harness.request("POST", "/orders", headers=bob, json_body=ORDER)
    assert not other.replayed
    assert other.json()["order"] == 2
    again = harness.request("POST", "/orders", headers=alice, json_body=ORDER)
    assert again.replayed
    assert again.body == first.body


def test_body_key_source_deduplicates_identical_bodies(make: MakeHarness) -> None:
    harness = make(key_source="body")
    first = harness.request("POST", "/orders", json_body=ORDER)
    retry = harness.request("POST", "/orders", json_body=ORDER)
    other = harness.request("POST", "/orders", json_body={"sku": "pen", "quantity": 1})
    assert retry.replayed
    assert retry.body == first.body
    assert not other.replayed
    assert harness.calls["orders"] == 2


def test_event_key_jmespath_keys_on_the_selection_and_fingerprints_the_whole_body(
    make: MakeHarness,
) -> None:
    harness = make(key_source="body", event_key_jmespath="order_id")
    harness.request("POST", "/orders", json_body={"order_id": "o-1", "note": "a"})
    changed = harness.request("POST", "/orders", json_body={"order_id": "o-1", "note": "b"})
    assert_problem(changed, 422, "idempotency_key_reused")


def test_payload_validation_jmespath_limits_the_fingerprint(make: MakeHarness) -> None:
    harness = make(
        key_source="body", event_key_jmespath="order_id", payload_validation_jmespath="order_id"
    )
    first = harness.request("POST", "/orders", json_body={"order_id": "o-1", "note": "a"})
    retry = harness.request("POST", "/orders", json_body={"order_id": "o-1", "note": "b"})
    assert retry.replayed
    assert retry.body == first.body
    assert harness.calls["orders"] == 1


def test_non_json_body_with_a_jmespath_is_a_400_not_a_crash(make: MakeHarness) -> None:
    harness = make(key_source="body", event_key_jmespath="order_id")
    reply = harness.request("POST", "/orders", body=b"not json")
    assert_problem(reply, 400, "request_body_invalid")
    assert harness.calls["orders"] == 0


def test_header_or_body_prefers_the_header(make: MakeHarness) -> None:
    harness = make(key_source="header_or_body")
    harness.request("POST", "/orders", headers=KEY, json_body=ORDER)
    assert harness.request("POST", "/orders", headers=KEY, json_body=ORDER).replayed
    first = harness.request("POST", "/orders", json_body={"sku": "pen"})
    retry = harness.request("POST", "/orders", json_body={"sku": "pen"})
    assert retry.replayed
    assert retry.body == first.body
    assert harness.calls["orders"] == 2


def test_custom_header_and_replay_header_names(make: MakeHarness) -> None:
    harness = make(header_name="X-Request-Id", replay_header="X-Replayed")
    harness.request("POST", "/orders", headers=[("X-Request-Id", "r1")])
    retry = harness.request("POST", "/orders", headers=[("X-Request-Id", "r1")])
    assert retry.header("x-replayed") == "true"
    assert harness.calls["orders"] == 1


def test_key_prefix_separates_apps_sharing_a_store(make: MakeHarness) -> None:
    shared = InMemoryPersistenceLayer()
    harness = make(shared, key_prefix="billing")
    harness.request("POST", "/orders", headers=KEY)
    assert harness.request("POST", "/orders", headers=KEY).replayed
    assert all(key.startswith("billing#") for key in shared._records)


def test_local_cache_replays_without_store_calls(make: MakeHarness) -> None:
    layer = InMemoryPersistenceLayer()
    harness = make(layer, use_local_cache=True)
    harness.request("POST", "/orders", headers=KEY, json_body=ORDER)
    calls: list[str] = []
    layer._put_record = lambda record: calls.append("put")  # type: ignore[method-assign]
    layer._get_record = lambda key: calls.append("get")  # type: ignore[assignment,method-assign,return-value]
    retry = harness.request("POST", "/orders", headers=KEY, json_body=ORDER)
    assert retry.replayed
    assert calls == []
    mismatch = harness.request("POST", "/orders", headers=KEY, json_body={"sku": "pen"})
    assert_problem(mismatch, 422, "idempotency_key_reused")
    assert calls == []


def test_on_event_hears_each_decision(make: MakeHarness) -> None:
    events: list[IdempotencyEvent] = []
    harness = make(on_event=events.append)
    harness.request("POST", "/orders", headers=KEY, json_body=ORDER)
    harness.request("POST", "/orders", headers=KEY, json_body=ORDER)
    harness.request("POST", "/orders", headers=KEY, json_body={"sku": "pen"})
    harness.request("POST", "/boom", headers=[("Idempotency-Key", "b")])
    harness.request("POST", "/orders", headers=[("Idempotency-Key", "")])
    names = [event.name for event in events]
    assert names == [
        "claimed",
        "completed",
        "replayed",
        "mismatch",
        "claimed",
        "released",
        "rejected",
    ]
    assert all(event.key is None or "order-1" not in event.key for event in events)
    assert events[2].status == 201


def test_a_failing_on_event_hook_does_not_fail_the_request(make: MakeHarness) -> None:
    def broken(event: IdempotencyEvent) -> None:
        raise ValueError("metrics backend down")

    harness = make(on_event=broken)
    assert harness.request("POST", "/orders", headers=KEY).status == 201
