"""A testing kit: check that your own app keeps this package's promises on one endpoint.

Run it from pytest, unittest or a plain script against an ASGI app, a WSGI app or the base URL
of a running server. Each check sends real requests through httpx and raises
:class:`AssertionError`, with what was expected and what came back, when a promise is broken::

    from idem_middleware.testing import IdempotencyChecker

    checker = IdempotencyChecker(
        app,                                   # FastAPI/Starlette/Flask/Django app, or a URL
        "/payments",
        body=lambda i: {"amount": 1000 + i, "currency": "EUR"},
        headers={"Authorization": "Bearer alice"},
        effects=lambda: ledger.count(),        # optional: how often the handler really ran
    )
    checker.check_all(failure=lambda: mock.patch.object(app_module, "charge", side_effect=OSError))

``body(i)`` must give a different request body for each ``i``: the kit uses ``body(0)`` as the
request and ``body(1)`` as "the same key with another body". A ``bytes`` or ``str`` body is sent
as is, anything else as JSON.

In-process ASGI apps are called without their lifespan (as httpx's ``ASGITransport`` does): an
app that needs its startup to have run is best checked at a base URL. Needs httpx: install
``idem-middleware[testing]``.
"""

from __future__ import annotations

import asyncio
import inspect
import uuid
from collections.abc import Callable, Coroutine, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import httpx

__all__ = ["IdempotencyChecker"]

#: Fields that describe one transmission: a replay legitimately carries fresh ones.
PER_TRANSMISSION_HEADERS = frozenset(
    {"date", "server", "connection", "keep-alive", "transfer-encoding", "content-length"}
)
CheckName = Literal[
    "concurrent_duplicates", "key_reused_with_another_body", "late_retry", "retry_after_5xx"
]


def _httpx() -> Any:
    try:
        import httpx
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "idem_middleware.testing needs httpx: pip install 'idem-middleware[testing]'"
        ) from exc
    return httpx


class IdempotencyChecker:
    """Checks one covered endpoint of an app (or of a server at a base URL).

    ``app`` is an ASGI app, a WSGI app (told apart by whether ``__call__`` is a coroutine
    function; force it with ``interface``) or a base URL such as ``"http://127.0.0.1:8000"``.
    ``effects``, when given, returns how many times the handler's side effect has happened so
    far (rows created, calls to a fake): the checks then count executions exactly instead of
    inferring them from the responses.
    """

    def __init__(
        self,
        app: object,
        path: str,
        *,
        body: Callable[[int], object],
        method: str = "POST",
        headers: Mapping[str, str] | None = None,
        effects: Callable[[], int] | None = None,
        header_name: str = "Idempotency-Key",
        replay_header: str = "Idempotent-Replayed",
        concurrency: int = 10,
        interface: Literal["asgi", "wsgi"] | None = None,
        timeout: float = 30.0,
    ) -> None:
        if concurrency < 2:
            raise ValueError(f"concurrency: must be at least 2, got {concurrency!r}")
        if _encoded(body(0)) == _encoded(body(1)):
            raise ValueError("body: body(0) and body(1) must differ (the key-reuse check needs it)")
        self.app = app
        self.path = path
        self.body = body
        self.method = method
        self.headers = dict(headers or {})
        self.effects = effects
        self.header_name = header_name
        self.replay_header = replay_header.lower()
        self.concurrency = concurrency
        self.timeout = timeout
        if isinstance(app, str):
            self.interface: Literal["asgi", "wsgi", "url"] = "url"
        elif interface is not None:
            self.interface = interface
        else:
            self.interface = "asgi" if _is_asgi(app) else "wsgi"

    # The checks -------------------------------------------------------------------------------

    def check_all(
        self, failure: Callable[[], AbstractContextManager[object]] | None = None
    ) -> list[CheckName]:
        """Run every check; the retry-after-5xx one only when ``failure`` is given. Returns the
        names of the checks that ran.
        """
        ran: list[CheckName] = []
        self.check_concurrent_duplicates()
        ran.append("concurrent_duplicates")
        self.check_key_reused_with_another_body()
        ran.append("key_reused_with_another_body")
        self.check_late_retry()
        ran.append("late_retry")
        if failure is not None:
            self.check_retry_after_5xx(failure)
            ran.append("retry_after_5xx")
        return ran

    def check_concurrent_duplicates(self) -> list[httpx.Response]:
        """``concurrency`` identical requests at once, one key: the handler runs once; every
        other request gets 409 ``idempotency_key_in_use`` or a byte-exact replay.
        """
        key = self._new_key()
        before = self._effects()
        responses = self._send([(key, 0)] * self.concurrency)
        originals = [r for r in responses if not self._replayed(r) and r.status_code != 409]
        _check(
            len(originals) == 1,
            f"{self.concurrency} concurrent requests with one {self.header_name}: expected the "
            f"handler to answer exactly one (the others 409 or replays), but {len(originals)} "
            f"were answered by the handler: {_summary(responses)}",
        )
        original = originals[0]
        _check(
            original.status_code < 500,
            f"the first request failed ({_summary([original])}): nothing to deduplicate",
        )
        for response in responses:
            if response is original:
                continue
            if response.status_code == 409:
                self._check_problem(response, 409, "idempotency_key_in_use")
                _check(
                    "retry-after" in response.headers,
                    f"a 409 idempotency_key_in_use has no Retry-After: {_summary([response])}",
                )
            else:
                self._check_replay_of(response, original, "a concurrent duplicate")
        self._check_effects(before, 1, "concurrent duplicates")
        return responses

    def check_key_reused_with_another_body(self) -> httpx.Response:
        """The same key with another body: 422 ``idempotency_key_reused``, the handler not run,
        and the first response still replayed afterwards.
        """
        key = self._new_key()
        (first,) = self._send([(key, 0)])
        self._check_handled(first, "the first request")
        before = self._effects()
        (reused,) = self._send([(key, 1)])
        self._check_problem(reused, 422, "idempotency_key_reused")
        self._check_effects(before, 0, "the same key with another body")
        (again,) = self._send([(key, 0)])
        self._check_replay_of(again, first, "the original request after a refused reuse")
        return reused

    def check_late_retry(self) -> httpx.Response:
        """A retry after the first request completed: the stored response, byte for byte
        (status, end-to-end headers, body), marked with the replay header; the handler not run.
        """
        key = self._new_key()
        (first,) = self._send([(key, 0)])
        self._check_handled(first, "the first request")
        before = self._effects()
        (retry,) = self._send([(key, 0)])
        self._check_replay_of(retry, first, "a late retry")
        self._check_effects(before, 0, "a late retry")
        return retry

    def check_retry_after_5xx(
        self, failure: Callable[[], AbstractContextManager[object]]
    ) -> httpx.Response:
        """A request that fails with a 5xx (while ``failure()`` is entered, e.g. a
        ``mock.patch`` making a dependency raise) is not stored: its retry runs the handler.
        """
        key = self._new_key()
        with failure():
            (failed,) = self._send([(key, 0)])
        _check(
            failed.status_code >= 500,
            f"the request sent inside failure() should fail with a 5xx, got {_summary([failed])}"
            ": make failure() break the handler",
        )
        before = self._effects()
        (retry,) = self._send([(key, 0)])
        _check(
            not self._replayed(retry),
            f"the retry after a {failed.status_code} was answered with a replay "
            f"({_summary([retry])}): a server error must release the key, not be stored",
        )
        self._check_handled(retry, "the retry after a 5xx")
        self._check_effects(before, 1, "the retry after a 5xx")
        return retry

    # Assertions -------------------------------------------------------------------------------

    def _replayed(self, response: httpx.Response) -> bool:
        return bool(response.headers.get(self.replay_header) == "true")

    def _check_handled(self, response: httpx.Response, what: str) -> None:
        _check(
            response.status_code < 500 and not self._replayed(response),
            f"{what} should run the handler and succeed, got {_summary([response])}",
        )

    def _check_replay_of(
        self, response: httpx.Response, original: httpx.Response, what: str
    ) -> None:
        _check(
            self._replayed(response),
            f"{what} should be a replay marked '{self.replay_header}: true', got "
            f"{_summary([response])}: the handler ran again",
        )
        _check(
            response.status_code == original.status_code and response.content == original.content,
            f"{what} is not byte-identical to the first response: "
            f"{response.status_code} {response.content[:200]!r} != "
            f"{original.status_code} {original.content[:200]!r}",
        )
        replayed, first = _end_to_end(response, self.replay_header), _end_to_end(original, "")
        _check(
            replayed == first,
            f"{what} does not carry the first response's headers: {replayed} != {first}",
        )

    def _check_problem(self, response: httpx.Response, status: int, code: str) -> None:
        try:
            document = response.json()
        except ValueError:
            document = None
        found = document.get("code") if isinstance(document, dict) else None
        _check(
            response.status_code == status
            and response.headers.get("content-type", "").startswith("application/problem+json")
            and found == code,
            f"expected {status} application/problem+json with code {code!r}, got "
            f"{_summary([response])}",
        )

    def _effects(self) -> int | None:
        return self.effects() if self.effects is not None else None

    def _check_effects(self, before: int | None, expected: int, what: str) -> None:
        if before is None:
            return
        assert self.effects is not None
        happened = self.effects() - before
        _check(
            happened == expected,
            f"{what}: the handler's effect happened {happened} time(s), expected {expected}",
        )

    # Sending ----------------------------------------------------------------------------------

    def _new_key(self) -> str:
        return f"idem-check-{uuid.uuid4()}"

    def _send(self, requests: Sequence[tuple[str, int]]) -> list[httpx.Response]:
        """Send every request at once (``(key, body index)``); responses in the same order."""
        if self.interface == "wsgi":
            return self._send_wsgi(requests)
        return _run(self._send_async(requests))

    def _request_kwargs(self, key: str, index: int) -> dict[str, Any]:
        headers = {**self.headers, self.header_name: key}
        body = self.body(index)
        if isinstance(body, (bytes, str)):
            return {"headers": headers, "content": body}
        return {"headers": headers, "json": body}

    async def _send_async(self, requests: Sequence[tuple[str, int]]) -> list[httpx.Response]:
        http = _httpx()
        if self.interface == "url":
            # A connection per request, so a multi-worker server spreads them over its workers.
            options: dict[str, Any] = {
                "base_url": self.app,
                "limits": http.Limits(max_keepalive_connections=0),
            }
        else:
            transport = http.ASGITransport(app=self.app, raise_app_exceptions=False)
            options = {"base_url": "http://testserver", "transport": transport}
        async with http.AsyncClient(timeout=self.timeout, **options) as client:
            return list(
                await asyncio.gather(
                    *(
                        client.request(self.method, self.path, **self._request_kwargs(k, i))
                        for k, i in requests
                    )
                )
            )

    def _send_wsgi(self, requests: Sequence[tuple[str, int]]) -> list[httpx.Response]:
        http = _httpx()
        transport = http.WSGITransport(app=self.app, raise_app_exceptions=False)

        def send(request: tuple[str, int]) -> httpx.Response:
            with http.Client(transport=transport, base_url="http://testserver") as client:
                response: httpx.Response = client.request(
                    self.method, self.path, **self._request_kwargs(*request)
                )
                return response

        if len(requests) == 1:
            return [send(requests[0])]
        with ThreadPoolExecutor(max_workers=len(requests)) as pool:
            return list(pool.map(send, requests))


def _is_asgi(app: object) -> bool:
    call = app if inspect.isfunction(app) else getattr(app, "__call__", None)  # noqa: B004
    return inspect.iscoroutinefunction(call)


def _run(coroutine: Coroutine[Any, Any, list[httpx.Response]]) -> list[httpx.Response]:
    """Run on a fresh event loop; from inside a running loop (an async test), on a thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def _encoded(body: object) -> object:
    return body.encode() if isinstance(body, str) else body


def _end_to_end(response: httpx.Response, replay_header: str) -> list[tuple[str, str]]:
    skip = PER_TRANSMISSION_HEADERS | {replay_header}
    return sorted((k, v) for k, v in response.headers.multi_items() if k not in skip)


def _summary(responses: Sequence[httpx.Response]) -> str:
    return ", ".join(f"{r.status_code} {r.content[:120]!r}" for r in responses)


def _check(condition: bool, message: str) -> None:
    # An explicit raise, not ``assert``: the checks must hold under ``python -O`` too.
    if not condition:
        raise AssertionError(message)
