"""Regressions found by attacking the middleware as a hostile client, a careless integrator and
a failing store: each test reproduces one bug with the exact input that exposed it.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from idem_middleware.keys import parse_key
from tests.support.harness import Harness, assert_problem

Make = Callable[..., Harness]


# Hostile client -----------------------------------------------------------------------------


def test_bare_keys_that_differ_after_a_semicolon_name_two_records(make: Make) -> None:
    # "order;1" is not an sf-item with parameters (a parameter name cannot start with a digit):
    # it is a bare key taken whole. Cutting it at ";" made "order;2" replay "order;1"'s answer.
    harness = make()
    first = harness.request("POST", "/orders", headers=[("Idempotency-Key", "order;1")])
    second = harness.request("POST", "/orders", headers=[("Idempotency-Key", "order;2")])
    assert first.status == second.status == 201
    assert second.header("idempotent-replayed") is None
    assert harness.calls["orders"] == 2


@pytest.mark.parametrize("value", ["order;1", "abc;", "a;b=c", "x;y"])
def test_parse_key_keeps_a_bare_key_whole(value: str) -> None:
    assert parse_key([value]) == value
