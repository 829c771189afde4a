"""The size policy both adapters share."""

from __future__ import annotations

from idem_middleware import IdempotencyConfig
from idem_middleware.sizes import SizeLimits


def test_the_stored_response_limit_defaults_to_the_layers_own() -> None:
    assert SizeLimits.resolve(IdempotencyConfig(), 4096).max_stored_response == 4096
    limits = SizeLimits.resolve(IdempotencyConfig(max_stored_response_bytes=10), 4096)
    assert limits.max_stored_response == 10


def test_limits_are_inclusive() -> None:
    limits = SizeLimits.resolve(IdempotencyConfig(max_request_body_bytes=100), 10)
    assert not limits.request_body_too_large(100)
    assert limits.request_body_too_large(101)
    assert limits.stores_body(10)
    assert not limits.stores_body(11)


def test_a_response_copy_keeps_the_body_up_to_the_limit_then_only_counts() -> None:
    copy = SizeLimits(max_request_body=1, max_stored_response=6).response_copy()
    copy.add(b"abc")
    copy.add(b"def")
    assert copy.body == b"abcdef"
    copy.add(b"g")
    assert copy.body is None
    copy.add(b"hi")
    assert copy.size == 9
    assert copy.body is None


def test_a_given_up_copy_keeps_nothing() -> None:
    copy = SizeLimits(max_request_body=1, max_stored_response=100).response_copy()
    copy.add(b"partial")
    copy.give_up()
    assert copy.body is None
    assert copy.size == 7
