"""Key parsing (sf-string and bare forms), body-hash keys and fingerprints."""

from __future__ import annotations

import pytest

from idem_middleware import IdempotencyConfig
from idem_middleware.exceptions import IdempotencyKeyError, IdempotencyKeyInvalidError
from idem_middleware.keys import KeyDeriver, parse_key
from idem_middleware.request import Headers, IdempotencyRequest


def request(
    body: bytes = b'{"order_id": "o-1", "amount": 5}',
    *,
    method: str = "POST",
    path: str = "/orders",
    query: str = "",
    headers: list[tuple[str, str]] | None = None,
) -> IdempotencyRequest:
    return IdempotencyRequest(method, path, query, Headers(headers or []), body)


@pytest.mark.parametrize(
    ("value", "key"),
    [
        ("abc", "abc"),
        ('"abc"', "abc"),
        ("123e4567-e89b-12d3-a456-426614174000", "123e4567-e89b-12d3-a456-426614174000"),
        ('"123e4567-e89b-12d3-a456-426614174000"', "123e4567-e89b-12d3-a456-426614174000"),
        ('"with space"', "with space"),
        ('"esc\\"aped"', 'esc"aped'),
        ('"abc";v=1', "abc"),
        ("  abc  ", "abc"),
        ("k" * 255, "k" * 255),
    ],
)
def test_parse_key_accepts_sf_strings_and_bare_keys(value: str, key: str) -> None:
    assert parse_key([value]) == key


@pytest.mark.parametrize(
    "values",
    [[""], ['""'], ["k" * 256], ["é"], ['"abc'], ['"a", "b"'], ["a,b"], ["a b"], ["a", "b"], []],
)
def test_parse_key_rejects_malformed_keys(values: list[str]) -> None:
    with pytest.raises(IdempotencyKeyInvalidError):
        parse_key(values)


def test_key_material_from_header_and_body() -> None:
    header = KeyDeriver(IdempotencyConfig())
    assert header.key_material(request(headers=[("Idempotency-Key", "k")])) == "header:k"
    assert header.key_material(request()) is None
    body = KeyDeriver(IdempotencyConfig(key_source="body"))
    assert body.key_material(request()) == body.key_material(request())
    assert body.key_material(request()) != body.key_material(request(b"{}"))
    assert body.key_material(request(b"")) is None
    either = KeyDeriver(IdempotencyConfig(key_source="header_or_body"))
    assert either.key_material(request(headers=[("Idempotency-Key", "k")])) == "header:k"
    assert either.key_material(request()) == body.key_material(request())


def test_event_key_jmespath_selects_what_the_key_covers() -> None:
    deriver = KeyDeriver(IdempotencyConfig(key_source="body", event_key_jmespath="order_id"))
    a = deriver.key_material(request(b'{"order_id": "o-1", "amount": 5}'))
    b = deriver.key_material(request(b'{"amount": 7, "order_id": "o-1"}'))
    c = deriver.key_material(request(b'{"order_id": "o-2"}'))
    assert a == b
    assert a != c
    assert deriver.key_material(request(b'{"amount": 5}')) is None
    with pytest.raises(IdempotencyKeyError):
        deriver.key_material(request(b"\xff not json"))


def test_fingerprint_covers_method_path_query_and_body() -> None:
    deriver = KeyDeriver(IdempotencyConfig())
    base = deriver.fingerprint(request())
    assert deriver.fingerprint(request()) == base
    assert deriver.fingerprint(request(method="PATCH")) != base
    assert deriver.fingerprint(request(path="/orders/1")) != base
    assert deriver.fingerprint(request(query="a=1")) != base
    assert deriver.fingerprint(request(b'{"order_id": "o-1", "amount": 6}')) != base
    # The separators keep field boundaries: moving bytes between fields changes the hash.
    assert deriver.fingerprint(request(path="/a", query="b")) != deriver.fingerprint(
        request(path="/ab", query="")
    )


def test_payload_validation_jmespath_limits_the_fingerprint_to_its_selection() -> None:
    deriver = KeyDeriver(IdempotencyConfig(payload_validation_jmespath="amount"))
    base = deriver.fingerprint(request(b'{"order_id": "o-1", "amount": 5}'))
    assert deriver.fingerprint(request(b'{"order_id": "o-9", "amount": 5}')) == base
    assert deriver.fingerprint(request(b'{"order_id": "o-1", "amount": 6}')) != base
    assert deriver.fingerprint(request(b'{"amount": 5}', path="/other")) != base


def test_hash_function_is_configurable() -> None:
    sha = KeyDeriver(IdempotencyConfig())
    blake = KeyDeriver(IdempotencyConfig(hash_function="blake2b"))
    assert len(sha.fingerprint(request())) == 64
    assert len(blake.fingerprint(request())) == 128


def test_headers_mapping_is_case_insensitive_and_keeps_repeats() -> None:
    headers = Headers([("X-A", "1"), ("x-a", "2"), ("Content-Type", "json")])
    assert headers["x-a"] == "1"
    assert headers.getlist("X-A") == ["1", "2"]
    assert headers.get("content-type") == "json"
    assert list(headers) == ["x-a", "content-type"]
    assert len(headers) == 2
    assert "missing" not in headers
