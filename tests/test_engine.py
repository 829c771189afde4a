"""The engine alone, with no web framework: each row of the behaviour table as a decision."""

from __future__ import annotations

import json

import pytest

from idem_middleware import IdempotencyConfig, IdempotencyEvent
from idem_middleware.engine import IdempotencyEngine, PassThrough, PendingClaim, Proceed, Respond
from idem_middleware.exceptions import (
    IdempotencyItemAlreadyExistsError,
    IdempotencyPersistenceLayerError,
)
from idem_middleware.persistence import DataRecord, InMemoryPersistenceLayer
from idem_middleware.persistence.record import STATUS_COMPLETED, STATUS_INPROGRESS
from idem_middleware.request import Headers, IdempotencyRequest
from idem_middleware.responses import StoredResponse
from tests.support.backends import FakeClock

CREATED = StoredResponse(201, (("content-type", "application/json"),), b'{"id": 1}')


def request(
    key: str | None = "k-1",
    body: bytes = b'{"amount": 5}',
    method: str = "POST",
    path: str = "/pay",
) -> IdempotencyRequest:
    headers = [("idempotency-key", key)] if key is not None else []
    return IdempotencyRequest(method, path, "", Headers(headers), body)


def engine(layer: InMemoryPersistenceLayer | None = None, **config: object) -> IdempotencyEngine:
    if layer is None:
        layer = InMemoryPersistenceLayer()
    return IdempotencyEngine(layer, IdempotencyConfig(**config))  # type: ignore[arg-type]


def problem(decision: object) -> tuple[int, str]:
    assert isinstance(decision, Respond)
    return decision.response.status, json.loads(decision.response.body)["code"]


def header(response: StoredResponse, name: str) -> str | None:
    return next((v for k, v in response.headers if k.lower() == name.lower()), None)


def test_first_request_proceeds_and_completion_is_replayed() -> None:
    e = engine()
    first = e.begin(request())
    assert isinstance(first, Proceed)
    assert first.lease.status == STATUS_INPROGRESS
    e.complete(first, CREATED)
    replay = e.begin(request())
    assert isinstance(replay, Respond)
    assert replay.response.status == 201
    assert replay.response.body == CREATED.body
    assert header(replay.response, "Idempotent-Replayed") == "true"
    assert header(replay.response, "content-length") == str(len(CREATED.body))


def test_in_flight_is_409_with_retry_after() -> None:
    e = engine()
    assert isinstance(e.begin(request()), Proceed)
    conflict = e.begin(request())
    assert problem(conflict) == (409, "idempotency_key_in_use")
    assert isinstance(conflict, Respond)
    assert header(conflict.response, "retry-after") is not None


@pytest.mark.parametrize("conflict_wait_seconds", [0, 2])
def test_the_409s_retry_after_is_what_is_left_of_the_lease(conflict_wait_seconds: int) -> None:
    layer = InMemoryPersistenceLayer()
    clock = FakeClock()
    layer.clock = clock
    e = engine(
        layer, in_progress_expires_after_seconds=10, conflict_wait_seconds=conflict_wait_seconds
    )
    assert isinstance(e.begin(request()), Proceed)

    assert header(e.begin(request()).response, "retry-after") == "10"  # type: ignore[union-attr]
    clock.advance(3.5)
    assert header(e.begin(request()).response, "retry-after") == "7"  # type: ignore[union-attr]
    clock.advance(6.4)  # 0.1 s of lease left: never below a second
    assert header(e.begin(request()).response, "retry-after") == "1"  # type: ignore[union-attr]


def test_a_layer_claiming_a_native_async_path_it_lacks_is_refused_at_construction() -> None:
    class HalfAsync(InMemoryPersistenceLayer):
        native_async = True

        async def _aget_record(self, idempotency_key: str) -> DataRecord:
            return self._get_record(idempotency_key)

    with pytest.raises(TypeError, match=r"persistence_layer: .*_aput_record"):
        engine(HalfAsync())


def test_different_fingerprint_is_422_and_the_record_is_untouched() -> None:
    layer = InMemoryPersistenceLayer()
    e = engine(layer)
    first = e.begin(request())
    assert isinstance(first, Proceed)
    e.complete(first, CREATED)
    before = dict(layer._records)
    for other in (
        request(body=b'{"amount": 6}'),
        request(method="PATCH"),
        request(path="/pay/2"),
    ):
        assert problem(e.begin(other)) == (422, "idempotency_key_reused")
    assert layer._records == before


def test_missing_key() -> None:
    assert isinstance(engine().begin(request(key=None)), PassThrough)
    assert problem(engine(require_key=True).begin(request(key=None))) == (
        400,
        "idempotency_key_missing",
    )


def test_invalid_key_is_400() -> None:
    assert problem(engine().begin(request(key=""))) == (400, "idempotency_key_invalid")


def test_quoted_and_bare_forms_name_the_same_key() -> None:
    e = engine()
    first = e.begin(request(key='"abc"'))
    assert isinstance(first, Proceed)
    e.complete(first, CREATED)
    assert isinstance(e.begin(request(key="abc")), Respond)


def test_5xx_releases_unless_store_server_errors() -> None:
    layer = InMemoryPersistenceLayer()
    e = engine(layer)
    first = e.begin(request())
    assert isinstance(first, Proceed)
    e.complete(first, StoredResponse(502, (), b"upstream"))
    assert layer._records == {}
    assert isinstance(e.begin(request()), Proceed)

    stored = engine(store_server_errors=True)
    attempt = stored.begin(request())
    assert isinstance(attempt, Proceed)
    stored.complete(attempt, StoredResponse(502, (), b"upstream"))
    replay = stored.begin(request())
    assert isinstance(replay, Respond)
    assert replay.response.status == 502


def test_release_frees_the_key() -> None:
    e = engine()
    first = e.begin(request())
    assert isinstance(first, Proceed)
    e.release(first)
    assert isinstance(e.begin(request()), Proceed)


def test_4xx_is_stored() -> None:
    e = engine()
    first = e.begin(request())
    assert isinstance(first, Proceed)
    e.complete(first, StoredResponse(404, (), b"nope"))
    replay = e.begin(request())
    assert isinstance(replay, Respond)
    assert replay.response.status == 404


def test_body_too_large_is_413() -> None:
    assert problem(engine().body_too_large("POST", "/pay")) == (413, "request_body_too_large")


def test_oversized_response_is_stored_without_body() -> None:
    e = engine(max_stored_response_bytes=4)
    first = e.begin(request())
    assert isinstance(first, Proceed)
    e.complete(first, StoredResponse(200, (("content-type", "text/plain"),), b"too long"))
    replay = e.begin(request())
    assert isinstance(replay, Respond)
    assert replay.response.body == b""
    assert header(replay.response, "Idempotent-Body-Omitted") == "true"
    assert header(replay.response, "content-type") == "text/plain"


def test_excluded_headers_are_never_stored() -> None:
    layer = InMemoryPersistenceLayer()
    e = engine(layer)
    first = e.begin(request())
    assert isinstance(first, Proceed)
    response = StoredResponse(
        200,
        (("Set-Cookie", "s=1"), ("Date", "today"), ("X-Keep", "1"), ("Connection", "close")),
        b"",
    )
    e.complete(first, response)
    (record,) = layer._records.values()
    assert "s=1" not in (record.response_data or "")
    assert record.response is not None
    assert record.response.headers == (("X-Keep", "1"),)


class DownLayer(InMemoryPersistenceLayer):
    def _put_record(self, data_record: DataRecord) -> None:
        raise IdempotencyPersistenceLayerError("down") from ConnectionError("refused")


def test_store_unreachable_reject_and_passthrough() -> None:
    assert problem(engine(DownLayer()).begin(request())) == (503, "idempotency_store_unavailable")
    assert isinstance(
        engine(DownLayer(), on_store_error="passthrough").begin(request()), PassThrough
    )


class BrokenCompletionLayer(InMemoryPersistenceLayer):
    def _update_record(self, data_record: DataRecord) -> None:
        raise IdempotencyPersistenceLayerError("down") from ConnectionError("refused")


def test_store_failure_on_completion_is_reported_not_raised() -> None:
    events: list[IdempotencyEvent] = []
    e = engine(BrokenCompletionLayer(), on_event=events.append)
    first = e.begin(request())
    assert isinstance(first, Proceed)
    e.complete(first, CREATED)
    assert [event.name for event in events] == ["claimed", "store_error"]


def test_stale_owner_cannot_complete_over_the_new_owner() -> None:
    layer = InMemoryPersistenceLayer()
    now = 1_000_000.0
    layer.clock = lambda: now
    events: list[IdempotencyEvent] = []
    e = engine(layer, in_progress_expires_after_seconds=10, on_event=events.append)
    stale = e.begin(request())
    assert isinstance(stale, Proceed)
    now += 11  # the first request's lease runs out; a retry takes the key over
    fresh = e.begin(request())
    assert isinstance(fresh, Proceed)
    e.complete(stale, StoredResponse(201, (), b"stale"))
    e.release(stale)
    assert "lease_lost" in [event.name for event in events]
    (record,) = layer._records.values()
    assert record.status == STATUS_INPROGRESS
    assert record.in_progress_expiry_timestamp == fresh.lease.in_progress_expiry_timestamp
    e.complete(fresh, StoredResponse(201, (), b"fresh"))
    replay = e.begin(request())
    assert isinstance(replay, Respond)
    assert replay.response.body == b"fresh"


def test_expired_record_runs_again() -> None:
    layer = InMemoryPersistenceLayer()
    now = 1_000_000.0
    layer.clock = lambda: now
    e = engine(layer, expires_after_seconds=60)
    first = e.begin(request())
    assert isinstance(first, Proceed)
    e.complete(first, CREATED)
    now += 61
    assert isinstance(e.begin(request()), Proceed)


def test_prepare_needs_no_store_call_and_claim_makes_one() -> None:
    layer = InMemoryPersistenceLayer()
    calls: list[str] = []
    original = layer._put_record
    layer._put_record = lambda record: (calls.append("put"), original(record))[1]  # type: ignore[method-assign]
    e = engine(layer)
    pending = e.prepare(request())
    assert isinstance(pending, PendingClaim)
    assert calls == []
    assert isinstance(e.claim(pending), Proceed)
    assert calls == ["put"]


@pytest.mark.parametrize(
    "response_data", ["{not json", None], ids=["unreadable-response", "no-response"]
)
def test_a_completed_record_without_a_usable_response_is_a_store_error(
    response_data: str | None,
) -> None:
    layer = InMemoryPersistenceLayer()
    e = engine(layer)
    first = e.begin(request())
    assert isinstance(first, Proceed)
    e.complete(first, CREATED)
    (key,) = layer._records
    layer._records[key] = DataRecord(
        key,
        STATUS_COMPLETED,
        expiry_timestamp=first.lease.expiry_timestamp,
        response_data=response_data,
        payload_hash=first.lease.payload_hash,
    )
    assert problem(e.begin(request())) == (503, "idempotency_store_unavailable")


def test_scope_is_mixed_into_the_stored_key() -> None:
    layer = InMemoryPersistenceLayer()
    e = engine(layer, scope=lambda r: r.headers.get("x-user", ""))
    alice = IdempotencyRequest(
        "POST", "/pay", "", Headers([("idempotency-key", "k"), ("x-user", "a")]), b""
    )
    bob = IdempotencyRequest(
        "POST", "/pay", "", Headers([("idempotency-key", "k"), ("x-user", "b")]), b""
    )
    assert isinstance(e.begin(alice), Proceed)
    assert isinstance(e.begin(bob), Proceed)
    assert len(layer._records) == 2
    assert all(key.split("#")[-1] != "k" for key in layer._records)


def test_layer_serves_one_config() -> None:
    layer = InMemoryPersistenceLayer()
    engine(layer)
    engine(layer)  # the same config again is fine
    with pytest.raises(ValueError, match="already configured"):
        engine(layer, expires_after_seconds=5, in_progress_expires_after_seconds=5)


class NoOldRecordLayer(InMemoryPersistenceLayer):
    """A store that reports a collision without the record (as some stores can)."""

    def _put_record(self, data_record: DataRecord) -> None:
        try:
            super()._put_record(data_record)
        except IdempotencyItemAlreadyExistsError:
            raise IdempotencyItemAlreadyExistsError(None) from None


def test_a_collision_without_the_record_is_answered_from_a_read() -> None:
    e = engine(NoOldRecordLayer())
    first = e.begin(request())
    assert isinstance(first, Proceed)
    assert problem(e.begin(request())) == (409, "idempotency_key_in_use")
    e.complete(first, CREATED)
    replay = e.begin(request())
    assert isinstance(replay, Respond)
    assert replay.response.body == CREATED.body


class ExpiredCollisionLayer(InMemoryPersistenceLayer):
    """A store whose claims keep colliding with a record that has just expired."""

    def _put_record(self, data_record: DataRecord) -> None:
        expired = DataRecord(
            data_record.idempotency_key, STATUS_COMPLETED, expiry_timestamp=0, payload_hash="x"
        )
        raise IdempotencyItemAlreadyExistsError(expired)


def test_repeated_collisions_with_expired_records_end_in_409() -> None:
    assert problem(engine(ExpiredCollisionLayer()).begin(request())) == (
        409,
        "idempotency_key_in_use",
    )
