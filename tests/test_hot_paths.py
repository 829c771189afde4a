"""The fast paths behave exactly as the straightforward code they replaced.

Each optimisation of the per-request path (see BENCHMARKS.md) is pinned here against the plain
definition it must stay equal to: stored fingerprints and keys must not change between versions,
and a lazily decoded header list must answer like a decoded one.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable

import pytest

from idem_middleware.config import IdempotencyConfig
from idem_middleware.exceptions import IdempotencyKeyInvalidError
from idem_middleware.keys import KeyDeriver, _is_bare_key, parse_key
from idem_middleware.request import Headers, IdempotencyRequest


def _request(
    body: bytes = b'{"a": 1}', query: str = "q=1", headers: Headers | None = None
) -> IdempotencyRequest:
    return IdempotencyRequest("POST", "/orders/é", query, headers or Headers(), body)


def test_fingerprint_is_the_documented_hash_of_method_path_query_and_body() -> None:
    expected = hashlib.sha256(
        b"POST\0" + "/orders/é".encode() + b"\0q=1\0" + b'{"a": 1}'
    ).hexdigest()
    assert KeyDeriver(IdempotencyConfig()).fingerprint(_request()) == expected


def test_fingerprint_of_a_selection_is_the_hash_of_method_path_query_and_canonical_json() -> None:
    deriver = KeyDeriver(IdempotencyConfig(payload_validation_jmespath="a"))
    expected = hashlib.sha256(b"POST\0" + "/orders/é".encode() + b"\0q=1\x001").hexdigest()
    assert deriver.fingerprint(_request()) == expected
    # Without a query, the hash is the one stored before the query joined it.
    expected = hashlib.sha256(b"POST\0" + "/orders/é".encode() + b"\x001").hexdigest()
    assert deriver.fingerprint(_request(query="")) == expected


def _is_bare_key_by_definition(key: str) -> bool:
    return key.isascii() and all(0x21 <= ord(char) <= 0x7E and char not in '",' for char in key)


@pytest.mark.parametrize("start", range(0, 0x3000, 0x100))
def test_bare_key_check_matches_its_definition_for_every_character(start: int) -> None:
    for code in range(start, start + 0x100):
        for key in (chr(code), f"a{chr(code)}b"):
            assert _is_bare_key(key) == _is_bare_key_by_definition(key), repr(key)
    assert _is_bare_key("") == _is_bare_key_by_definition("")


RAW = [
    (b"host", b"example.org"),
    (b"idempotency-key", b"k-1"),
    (b"x-latin", "caf\u00e9".encode("latin-1")),
    (b"idempotency-key", b"k-2"),
]


@pytest.mark.parametrize(
    "name", ["Idempotency-Key", "idempotency-key", "HOST", "x-latin", "missing", "caf\u00e9", "ʃ"]
)
def test_headers_from_asgi_answer_like_decoded_headers(name: str) -> None:
    lazy = Headers.from_asgi(RAW)
    decoded = Headers([(n.decode("latin-1"), v.decode("latin-1")) for n, v in RAW])
    assert lazy.getlist(name) == decoded.getlist(name)
    assert lazy.get(name) == decoded.get(name)
    assert (name in lazy) == (name in decoded)
    assert list(lazy) == list(decoded)
    assert len(lazy) == len(decoded)
    assert dict(lazy.items()) == dict(decoded.items())
    assert repr(lazy) == repr(decoded)


def _parse_key_by_definition(value: str) -> str:
    """parse_key's general path for one bare (unquoted) value, without its fast path."""
    key = value.strip(" \t")  # taken whole, ";" included: no parameters on a bare key
    if not _is_bare_key_by_definition(key):
        raise IdempotencyKeyInvalidError("bare")
    if not 1 <= len(key) <= 255:
        raise IdempotencyKeyInvalidError("length")
    return key


def _outcome(parse: Callable[[str], str], value: str) -> str:
    try:
        return "key:" + parse(value)
    except IdempotencyKeyInvalidError:
        return "error"  # which message is pinned by the key and HTTP behaviour tests


@pytest.mark.parametrize("seed", range(8))
def test_bare_key_fast_path_accepts_exactly_what_the_general_path_accepts(seed: int) -> None:
    rng = random.Random(seed)
    alphabet = [" ", "\t", ";", ",", '"', "é", "\x7f", "\n", "a", "Z", "-", "=", "~", "0"]
    for _ in range(2000):
        length = rng.choice([0, 1, 2, 5, 36, 254, 255, 256, 300])
        value = "".join(rng.choice(alphabet) for _ in range(length))
        if value.lstrip(" \t").startswith('"'):
            continue  # quoted values take the sf-string path, untouched
        assert _outcome(lambda v: parse_key([v]), value) == _outcome(
            _parse_key_by_definition, value
        ), repr(value)
