"""The two exception families: what a client is told, and what a store tells the engine."""

from __future__ import annotations

import inspect

from idem_middleware import exceptions
from idem_middleware.exceptions import (
    IdempotencyError,
    IdempotencyHTTPError,
    IdempotencyPersistenceError,
)


def _classes() -> list[type[IdempotencyError]]:
    return [
        value
        for value in vars(exceptions).values()
        if inspect.isclass(value) and issubclass(value, IdempotencyError)
    ]


def test_every_exception_is_in_exactly_one_family() -> None:
    for error in _classes():
        if error in (IdempotencyError, IdempotencyHTTPError, IdempotencyPersistenceError):
            continue
        families = [
            family
            for family in (IdempotencyHTTPError, IdempotencyPersistenceError)
            if issubclass(error, family)
        ]
        assert len(families) == 1, error


def test_every_problem_has_its_own_code_and_a_title() -> None:
    problems = [error for error in _classes() if issubclass(error, IdempotencyHTTPError)]
    concrete = [error for error in problems if error is not IdempotencyHTTPError]
    codes = [error.code for error in concrete]
    assert len(codes) == len(set(codes))
    assert all(error.title and 400 <= error.status < 600 for error in concrete)


def test_the_module_map_names_every_exception() -> None:
    assert exceptions.__doc__ is not None
    for error in _classes():
        assert error.__name__ in exceptions.__doc__, error
