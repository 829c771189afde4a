"""The Django example app (``example_apps.django_app``): Django's WSGI and ASGI applications
wrapped by the middleware, in process and on real servers (gunicorn, uvicorn).
"""

from __future__ import annotations

import asyncio
import importlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any
from unittest import mock

import httpx
import pytest

from idem_middleware.testing import IdempotencyChecker
from tooling.servers import Server, running, start_gunicorn, start_uvicorn

PAYMENT = {"amount": 1250, "currency": "EUR", "description": "order 1234"}
ALICE = {"Authorization": "Bearer alice"}


def payment(i: int) -> dict[str, Any]:
    return {**PAYMENT, "amount": 1250 + i}


# In process -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def django_modules() -> Iterator[dict[str, ModuleType]]:
    """The app's modules, imported once per process (Django is set up once), with the examples'
    defaults: memory store, in-memory ledger.
    """
    with pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):
            if name.startswith(("IDEM_", "EXAMPLE_")):
                patch.delenv(name)
        yield {
            name: importlib.import_module(f"example_apps.django_app.{name}")
            for name in ("views", "wsgi", "asgi")
        }


@pytest.fixture(params=["wsgi", "asgi"])
def django_app(request: pytest.FixtureRequest, django_modules: dict[str, ModuleType]) -> Any:
    return django_modules[request.param].application


def created(views: ModuleType) -> int:
    return int(views.ledger.stats()["payments_created"])


def test_the_testing_kit_passes_on_django(
    django_app: Any, django_modules: dict[str, ModuleType]
) -> None:
    views = django_modules["views"]
    checker = IdempotencyChecker(
        django_app, "/payments", body=payment, headers=ALICE, effects=lambda: created(views)
    )

    def card_down() -> Any:
        return mock.patch.object(views, "charge_card", side_effect=RuntimeError("card down"))

    assert len(checker.check_all(failure=card_down)) == 4


def send(app: Any, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """One request in process, over httpx's ASGI or WSGI transport."""
    if asyncio.iscoroutinefunction(type(app).__call__):

        async def call() -> httpx.Response:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
                return await c.request(method, path, **kwargs)

        return asyncio.run(call())
    with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://testserver") as c:
        return c.request(method, path, **kwargs)


def test_payments_need_a_key_and_csrf_does_not_block_them(django_app: Any) -> None:
    """The view is exempt from CSRF (the project keeps CsrfViewMiddleware): a keyed POST with no
    CSRF token is created; a POST without a key is refused by the middleware, not by CSRF.
    """
    missing = send(django_app, "POST", "/payments", json=PAYMENT, headers=ALICE)
    assert missing.status_code == 400
    assert missing.json()["code"] == "idempotency_key_missing"
    keyed = {**ALICE, "Idempotency-Key": f"k-{uuid.uuid4()}"}
    first = send(django_app, "POST", "/payments", json=PAYMENT, headers=keyed)
    assert first.status_code == 201, first.text
    assert first.headers["location"] == f"/payments/{first.json()['id']}"
    fetched = send(django_app, "GET", first.headers["location"], headers=ALICE)
    assert fetched.json()["id"] == first.json()["id"]


def test_reads_are_not_covered(django_app: Any) -> None:
    headers = {"Idempotency-Key": "health"}
    for _ in range(2):
        health = send(django_app, "GET", "/health", headers=headers)
        assert health.status_code == 200
        assert "idempotent-replayed" not in health.headers


# On real servers --------------------------------------------------------------------------------

DJANGO_WSGI = "example_apps.django_app.wsgi:application"
DJANGO_ASGI = "example_apps.django_app.asgi:application"


def start(server: str, tmp_path: Path) -> Server:
    env = {
        "IDEM_STORE_URL": f"sqlite:///{tmp_path / 'idempotency.sqlite3'}",
        "EXAMPLE_LEDGER_PATH": str(tmp_path / "ledger.sqlite3"),
        "EXAMPLE_CHARGE_DELAY_SECONDS": "0.3",
        "LOG_LEVEL": "DEBUG",
    }
    if server == "gunicorn":
        return start_gunicorn(DJANGO_WSGI, env=env, log_dir=tmp_path, workers=2, threads=4)
    return start_uvicorn(DJANGO_ASGI, env=env, log_dir=tmp_path)


def payments_created(base_url: str) -> int:
    response = httpx.get(f"{base_url}/_stats", timeout=10)
    response.raise_for_status()
    return int(response.json()["payments_created"])


@pytest.mark.e2e
@pytest.mark.parametrize("server", ["gunicorn", "uvicorn"])
def test_a_retried_payment_runs_the_view_once_on_a_real_server(server: str, tmp_path: Path) -> None:
    with running(start(server, tmp_path)) as live:
        url = live.base_url
        headers = {**ALICE, "Idempotency-Key": f"order-{uuid.uuid4()}"}
        first = httpx.post(f"{url}/payments", json=PAYMENT, headers=headers, timeout=10)
        retry = httpx.post(f"{url}/payments", json=PAYMENT, headers=headers, timeout=10)
        assert first.status_code == 201, first.text
        assert "idempotent-replayed" not in first.headers
        assert (retry.status_code, retry.headers["idempotent-replayed"]) == (201, "true")
        assert retry.content == first.content
        assert retry.headers["location"] == first.headers["location"]
        assert payments_created(url) == 1

        # The testing kit, over HTTP: concurrent duplicates overlap the 0.3 s charge.
        checker = IdempotencyChecker(
            url, "/payments", body=payment, headers=ALICE, effects=lambda: payments_created(url)
        )
        responses = checker.check_concurrent_duplicates()
        assert any(r.status_code == 409 for r in responses), "the duplicates never overlapped"
        checker.check_key_reused_with_another_body()
        checker.check_late_retry()
        assert payments_created(url) == 4
        assert "Traceback" not in live.log()
