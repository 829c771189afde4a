"""The testing kit (``idem_middleware.testing``) against the example apps, which keep every
promise, and against apps that break one: the kit must pass the first and fail the others with
an AssertionError that says what went wrong.
"""

from __future__ import annotations

import asyncio
import importlib
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from itertools import count
from types import ModuleType
from typing import Any
from unittest import mock

import pytest
from flask import Flask, jsonify
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from idem_middleware import IdempotencyConfig, IdempotencyMiddleware, IdempotencyWSGIMiddleware
from idem_middleware.persistence import InMemoryPersistenceLayer
from idem_middleware.testing import IdempotencyChecker

ALICE = {"Authorization": "Bearer alice"}


def payment(i: int) -> dict[str, Any]:
    return {"amount": 1000 + i, "currency": "EUR"}


@pytest.fixture
def fresh_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("IDEM_", "EXAMPLE_")):
            monkeypatch.delenv(name)


@pytest.fixture(params=["fastapi", "starlette", "flask"])
def example(request: pytest.FixtureRequest, fresh_env: None) -> ModuleType:
    """An example app module imported afresh: new store, new ledger."""
    return importlib.reload(importlib.import_module(f"example_apps.{request.param}_app"))


def card_down(module: ModuleType) -> Callable[[], AbstractContextManager[object]]:
    return lambda: mock.patch.object(
        module, "charge_card", side_effect=RuntimeError("card processor down")
    )


def checker_for(module: ModuleType, **options: Any) -> IdempotencyChecker:
    return IdempotencyChecker(
        module.app,
        "/payments",
        body=payment,
        headers=ALICE,
        effects=lambda: int(module.ledger.stats()["payments_created"]),
        **options,
    )


# The example apps keep every promise --------------------------------------------------------


def test_example_apps_pass_every_check(example: ModuleType) -> None:
    checker = checker_for(example)
    assert checker.interface == ("wsgi" if example.__name__.endswith("flask_app") else "asgi")
    ran = checker.check_all(failure=card_down(example))
    assert ran == [
        "concurrent_duplicates",
        "key_reused_with_another_body",
        "late_retry",
        "retry_after_5xx",
    ]
    # 1 concurrent + 1 key reuse + 1 late retry + 1 retry after the 5xx
    assert example.ledger.stats()["payments_created"] == 4


def test_concurrent_duplicates_overlap_in_process(example: ModuleType) -> None:
    """The duplicates really are concurrent: with a slow handler some of them get 409."""
    checker = checker_for(example, concurrency=8)
    with mock.patch.dict(os.environ, {"EXAMPLE_CHARGE_DELAY_SECONDS": "0.2"}):
        responses = checker.check_concurrent_duplicates()
    assert len(responses) == 8
    assert any(r.status_code == 409 for r in responses)


def test_checks_without_an_effects_counter(example: ModuleType) -> None:
    checker = IdempotencyChecker(example.app, "/payments", body=payment, headers=ALICE)
    assert checker.check_all() == [
        "concurrent_duplicates",
        "key_reused_with_another_body",
        "late_retry",
    ]


def test_usable_from_inside_a_running_event_loop(example: ModuleType) -> None:
    async def in_an_async_test() -> int:
        return checker_for(example).check_late_retry().status_code

    assert asyncio.run(in_an_async_test()) == 201


def test_bodies_may_be_bytes(example: ModuleType) -> None:
    checker = IdempotencyChecker(
        example.app,
        "/payments",
        body=lambda i: b'{"amount": %d, "currency": "EUR"}' % (100 + i),
        headers={**ALICE, "Content-Type": "application/json"},
    )
    assert checker.check_late_retry().status_code == 201


# Apps that break a promise fail the checks --------------------------------------------------


class Counted:
    """A payments endpoint with a call counter, on Starlette (ASGI) or Flask (WSGI)."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail = False
        self._ids = count(1)

    def effect(self) -> int:
        if self.fail:
            raise RuntimeError("card processor down")
        self.calls += 1
        return next(self._ids)

    def starlette(self) -> Starlette:
        async def create(request: Request) -> JSONResponse:
            return JSONResponse({"id": self.effect()}, status_code=201)

        return Starlette(routes=[Route("/payments", create, methods=["POST"])])

    def flask(self) -> Flask:
        app = Flask(__name__)

        @app.post("/payments")
        def create() -> Any:
            return jsonify(id=self.effect()), 201

        return app

    def failing(self) -> Iterator[None]:
        self.fail = True
        try:
            yield
        finally:
            self.fail = False


def bare_app(kind: str, counted: Counted) -> Any:
    return counted.starlette() if kind == "asgi" else counted.flask()


def protected(kind: str, counted: Counted, config: IdempotencyConfig) -> Any:
    layer = InMemoryPersistenceLayer()
    if kind == "asgi":
        return IdempotencyMiddleware(counted.starlette(), persistence_layer=layer, config=config)
    app = counted.flask()
    app.wsgi_app = IdempotencyWSGIMiddleware(  # type: ignore[method-assign]
        app.wsgi_app, persistence_layer=layer, config=config
    )
    return app


def kit(app: Any, counted: Counted) -> IdempotencyChecker:
    return IdempotencyChecker(app, "/payments", body=payment, effects=lambda: counted.calls)


@pytest.fixture(params=["asgi", "wsgi"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_an_app_without_the_middleware_fails_every_deduplication_check(kind: str) -> None:
    counted = Counted()
    checker = kit(bare_app(kind, counted), counted)
    with pytest.raises(AssertionError, match=r"expected the handler to answer exactly one .* 10 "):
        checker.check_concurrent_duplicates()
    with pytest.raises(AssertionError, match=r"expected 422 application/problem\+json .*reused"):
        checker.check_key_reused_with_another_body()
    with pytest.raises(AssertionError, match=r"a late retry should be a replay .* ran again"):
        checker.check_late_retry()
    with pytest.raises(AssertionError):
        checker.check_all()


def test_effects_counter_catches_a_handler_run_behind_a_replay(kind: str) -> None:
    """Responses alone can lie (a proxy adding the replay header): the counter cannot."""
    counted = Counted()
    app = protected(kind, counted, IdempotencyConfig())
    checker = kit(app, counted)
    checker.effects = lambda: counted.calls * 2  # two effects per run: "ran twice"
    with pytest.raises(AssertionError, match=r"effect happened 2 time\(s\), expected 1"):
        checker.check_concurrent_duplicates()


def test_stored_server_errors_fail_the_retry_check(kind: str) -> None:
    """``store_server_errors=True`` (Stripe's choice) replays the 500: the kit says so."""
    counted = Counted()
    app = protected(kind, counted, IdempotencyConfig(store_server_errors=True))
    checker = kit(app, counted)
    checker.check_late_retry()
    with pytest.raises(AssertionError, match="a server error must release the key"):
        checker.check_retry_after_5xx(lambda: contextmanager_of(counted.failing))


def test_a_failure_that_does_not_fail_is_reported(kind: str) -> None:
    counted = Counted()
    checker = kit(protected(kind, counted, IdempotencyConfig()), counted)
    with pytest.raises(AssertionError, match="should fail with a 5xx"):
        checker.check_retry_after_5xx(lambda: mock.patch.object(counted, "fail", False))
    checker.check_retry_after_5xx(lambda: contextmanager_of(counted.failing))


def test_an_uncovered_path_fails(kind: str) -> None:
    counted = Counted()
    app = protected(kind, counted, IdempotencyConfig(include_paths=("/orders",)))
    with pytest.raises(AssertionError, match="exactly one"):
        kit(app, counted).check_concurrent_duplicates()


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="body"):
        IdempotencyChecker("http://127.0.0.1:1", "/payments", body=lambda i: {"same": True})
    with pytest.raises(ValueError, match="concurrency"):
        IdempotencyChecker("http://127.0.0.1:1", "/payments", body=payment, concurrency=1)
    assert IdempotencyChecker("http://x", "/p", body=payment).interface == "url"


def contextmanager_of(generator: Callable[[], Iterator[None]]) -> AbstractContextManager[None]:
    from contextlib import contextmanager

    return contextmanager(generator)()
