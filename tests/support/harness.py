"""One test app, twice: Starlette behind IdempotencyMiddleware and Flask behind
IdempotencyWSGIMiddleware, driven through the same synchronous ``Harness.request`` so that the
HTTP behaviour table runs unchanged over ASGI and WSGI.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from flask import Flask, Response, request
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.responses import Response as StarletteResponse
from starlette.routing import Route
from werkzeug.test import Client

from idem_middleware import IdempotencyConfig, IdempotencyMiddleware, IdempotencyWSGIMiddleware
from idem_middleware.persistence import (
    BasePersistenceLayer,
    InMemoryPersistenceLayer,
    SQLitePersistenceLayer,
    from_url,
)

Headers = list[tuple[str, str]]


@dataclass
class Reply:
    status: int
    headers: Headers  # names lower-cased, in order, repeats kept
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.headers_named(name)
        return values[0] if values else None

    def headers_named(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name.lower()]

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def replayed(self) -> bool:
        return self.header("idempotent-replayed") == "true"


@dataclass
class AppState:
    """What the handlers did, shared by both apps so tests can count executions."""

    calls: Counter[str] = field(default_factory=Counter)
    harness: Harness | None = None


def _order_payload(state: AppState, body: bytes, path: str) -> dict[str, Any]:
    state.calls["orders"] += 1
    return {
        "order": state.calls["orders"],
        "path": path,
        "received": body.decode("utf-8", "replace"),
    }


def build_asgi_app(state: AppState) -> Starlette:
    async def orders(req: Request) -> StarletteResponse:
        payload = _order_payload(state, await req.body(), req.url.path)
        response = JSONResponse(payload, status_code=201)
        response.headers["x-order-count"] = str(state.calls["orders"])
        response.set_cookie("session", "abc")
        # As a server would add them: they describe one transmission, and are never replayed.
        response.headers["server"] = "harness/1.0"
        response.headers["date"] = "Sat, 28 Nov 2026 12:00:00 GMT"
        return response

    async def list_orders(req: Request) -> StarletteResponse:
        state.calls["list"] += 1
        return JSONResponse({"count": state.calls["orders"]})

    async def reentrant(req: Request) -> StarletteResponse:
        state.calls["reentrant"] += 1
        assert state.harness is not None
        nested = await state.harness.arequest(
            "POST",
            "/reentrant",
            headers=list(_forwarded(req.headers.items())),
            body=await req.body(),
        )
        return JSONResponse(_nested_summary(nested))

    async def boom(req: Request) -> StarletteResponse:
        state.calls["boom"] += 1
        raise RuntimeError("handler failed")

    async def server_error(req: Request) -> StarletteResponse:
        state.calls["server_error"] += 1
        return JSONResponse({"error": "unavailable"}, status_code=503)

    async def bad_request(req: Request) -> StarletteResponse:
        state.calls["bad_request"] += 1
        return JSONResponse({"error": "amount must be positive"}, status_code=400)

    async def no_content(req: Request) -> StarletteResponse:
        state.calls["no_content"] += 1
        return StarletteResponse(status_code=204)

    async def big(req: Request) -> StarletteResponse:
        state.calls["big"] += 1
        size = int(req.query_params["size"])
        return StarletteResponse(b"x" * size, media_type="application/octet-stream")

    async def binary(req: Request) -> StarletteResponse:
        state.calls["binary"] += 1
        return StarletteResponse(bytes(range(256)) * 4, media_type="application/octet-stream")

    async def with_status(req: Request) -> StarletteResponse:
        state.calls["status"] += 1
        return JSONResponse({"status": "chosen"}, status_code=int(req.query_params["code"]))

    async def stream(req: Request) -> StarletteResponse:
        state.calls["stream"] += 1
        parts, gate = _stream_options(req.query_params)

        async def events() -> AsyncIterator[bytes]:
            for n in range(parts):
                if n and gate:
                    # A file another process creates: polled, there is nothing to await.
                    while not os.path.exists(gate):  # noqa: ASYNC110, ASYNC240
                        await asyncio.sleep(0.01)
                yield _event(n)

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"X-Stream": str(state.calls["stream"])},
        )

    async def slow(req: Request) -> StarletteResponse:
        seconds, gate, key = _slow_options(req.query_params, req.headers)
        _log_run("start", key)
        deadline = time.monotonic() + seconds
        # The gate is a file another process creates: polled, there is nothing to await.
        while time.monotonic() < deadline and not (gate and os.path.exists(gate)):  # noqa: ASYNC110, ASYNC240
            await asyncio.sleep(0.02)
        _log_run("end", key)
        return JSONResponse(_slow_result(), status_code=201)

    async def health(req: Request) -> StarletteResponse:
        return JSONResponse({"status": "ok", "pid": os.getpid()})

    async def stats(req: Request) -> StarletteResponse:
        return JSONResponse(dict(state.calls))

    return Starlette(
        routes=[
            Route("/stream", stream, methods=["POST"]),
            Route("/slow", slow, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
            Route("/_stats", stats, methods=["GET"]),
            Route("/orders", orders, methods=["POST", "PATCH", "PUT"]),
            Route("/orders", list_orders, methods=["GET"]),
            Route("/orders/{order_id}", orders, methods=["POST", "PATCH"]),
            Route("/public/{name}", orders, methods=["POST"]),
            Route("/reentrant", reentrant, methods=["POST"]),
            Route("/boom", boom, methods=["POST"]),
            Route("/server-error", server_error, methods=["POST"]),
            Route("/bad-request", bad_request, methods=["POST"]),
            Route("/no-content", no_content, methods=["POST"]),
            Route("/big", big, methods=["POST"]),
            Route("/binary", binary, methods=["POST"]),
            Route("/status", with_status, methods=["POST"]),
        ]
    )


def build_wsgi_app(state: AppState) -> Flask:
    app = Flask("harness")

    @app.route("/orders", methods=["POST", "PATCH", "PUT"])
    @app.route("/orders/<order_id>", methods=["POST", "PATCH"])
    @app.route("/public/<name>", methods=["POST"])
    def orders(order_id: str | None = None, name: str | None = None) -> Response:
        payload = _order_payload(state, request.get_data(), request.path)
        response = app.response_class(
            json.dumps(payload, separators=(",", ":")), 201, mimetype="application/json"
        )
        response.headers["x-order-count"] = str(state.calls["orders"])
        response.set_cookie("session", "abc")
        # As a server would add them: they describe one transmission, and are never replayed.
        response.headers["server"] = "harness/1.0"
        response.headers["date"] = "Sat, 28 Nov 2026 12:00:00 GMT"
        return response

    @app.get("/orders")
    def list_orders() -> Any:
        state.calls["list"] += 1
        return {"count": state.calls["orders"]}

    @app.post("/reentrant")
    def reentrant() -> Any:
        state.calls["reentrant"] += 1
        assert state.harness is not None
        nested = state.harness.request(
            "POST",
            "/reentrant",
            headers=list(_forwarded(request.headers.items())),
            body=request.get_data(),
        )
        return _nested_summary(nested)

    @app.post("/boom")
    def boom() -> Any:
        state.calls["boom"] += 1
        raise RuntimeError("handler failed")

    @app.post("/server-error")
    def server_error() -> Any:
        state.calls["server_error"] += 1
        return {"error": "unavailable"}, 503

    @app.post("/bad-request")
    def bad_request() -> Any:
        state.calls["bad_request"] += 1
        return {"error": "amount must be positive"}, 400

    @app.post("/no-content")
    def no_content() -> Any:
        state.calls["no_content"] += 1
        return "", 204

    @app.post("/big")
    def big() -> Any:
        state.calls["big"] += 1
        size = int(request.args["size"])
        return app.response_class(b"x" * size, mimetype="application/octet-stream")

    @app.post("/binary")
    def binary() -> Any:
        state.calls["binary"] += 1
        return app.response_class(bytes(range(256)) * 4, mimetype="application/octet-stream")

    @app.post("/status")
    def with_status() -> Any:
        state.calls["status"] += 1
        return {"status": "chosen"}, int(request.args["code"])

    @app.post("/stream")
    def stream() -> Response:
        state.calls["stream"] += 1
        parts, gate = _stream_options(request.args)

        def events() -> Iterator[bytes]:
            for n in range(parts):
                if n and gate:
                    deadline = time.monotonic() + 30
                    while not os.path.exists(gate) and time.monotonic() < deadline:
                        time.sleep(0.01)
                yield _event(n)

        return app.response_class(
            events(), mimetype="text/event-stream", headers={"X-Stream": str(state.calls["stream"])}
        )

    @app.post("/slow")
    def slow() -> Any:
        seconds, gate, key = _slow_options(request.args, request.headers)
        _log_run("start", key)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not (gate and os.path.exists(gate)):
            time.sleep(0.02)
        _log_run("end", key)
        return _slow_result(), 201

    @app.get("/health")
    def health() -> Any:
        return {"status": "ok", "pid": os.getpid()}

    @app.get("/_stats")
    def stats() -> Any:
        return dict(state.calls)

    return app


def _stream_options(params: Any) -> tuple[int, str | None]:
    """``/stream?parts=N&gate=PATH``: N server-sent events; with a gate, every event after the
    first waits until the file PATH exists (an event a test in another process controls).
    """
    return int(params.get("parts", "3")), params.get("gate")


def _event(n: int) -> bytes:
    return f"id: {n}\ndata: event {n}\n\n".encode()


def _slow_options(params: Any, headers: Any) -> tuple[float, str | None, str]:
    """``/slow?seconds=S&gate=PATH``: a handler that runs S seconds (default 4), or until the
    file PATH exists; the third value is the request's idempotency key, for the run log.
    """
    return (
        float(params.get("seconds", "4")),
        params.get("gate"),
        headers.get("idempotency-key", "-"),
    )


def _log_run(event: str, key: str) -> None:
    """Append ``<event> <key> <pid>`` to the file ``IDEM_HARNESS_RUN_LOG`` names: every worker
    process of a server appends to the same file, so a test counts how many times a handler
    started and ended, and in which process. One short ``O_APPEND`` write: lines never mix.
    """
    path = os.environ.get("IDEM_HARNESS_RUN_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as log:
            log.write(f"{event} {key} {os.getpid()}\n")


def _slow_result() -> dict[str, Any]:
    # A fresh id per run: a replay carries the first run's, a second run another.
    return {"run": uuid.uuid4().hex, "pid": os.getpid()}


def _server_layer() -> BasePersistenceLayer:
    """The store of an app served by a real server: ``IDEM_STORE_URL`` (any
    :func:`~idem_middleware.persistence.from_url` URL) when set, else ``IDEM_HARNESS_STORE``,
    ``memory`` or ``sqlite:<path>``.
    """
    url = os.environ.get("IDEM_STORE_URL")
    if url:
        return from_url(url)
    store = os.environ.get("IDEM_HARNESS_STORE", "memory")
    if store.startswith("sqlite:"):
        return SQLitePersistenceLayer(store.removeprefix("sqlite:"))
    return InMemoryPersistenceLayer()


def _server_config() -> IdempotencyConfig:
    """The defaults, but for the lease (``IDEM_HARNESS_LEASE_SECONDS``) and the wait of a
    duplicate (``IDEM_HARNESS_CONFLICT_WAIT_SECONDS``) when set.
    """
    options: dict[str, Any] = {}
    lease = os.environ.get("IDEM_HARNESS_LEASE_SECONDS")
    if lease:
        options["in_progress_expires_after_seconds"] = int(lease)
    wait = os.environ.get("IDEM_HARNESS_CONFLICT_WAIT_SECONDS")
    if wait:
        options["conflict_wait_seconds"] = float(wait)
    return IdempotencyConfig(**options)


def _server_logging() -> None:
    """With ``LOG_LEVEL`` set, the middleware's decisions go to stderr (the server's log),
    each line naming the worker's pid.
    """
    level = os.environ.get("LOG_LEVEL")
    logger = logging.getLogger("idem_middleware")
    if not level or logger.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[%(process)d] %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level.upper())


def asgi_server_app() -> IdempotencyMiddleware:
    """The ASGI harness app for a real server:
    ``uvicorn --factory tests.support.harness:asgi_server_app``.
    """
    _server_logging()
    return IdempotencyMiddleware(
        build_asgi_app(AppState()), persistence_layer=_server_layer(), config=_server_config()
    )


def wsgi_server_app() -> Flask:
    """The WSGI harness app for a real server:
    ``gunicorn 'tests.support.harness:wsgi_server_app()'``.
    """
    _server_logging()
    flask_app = build_wsgi_app(AppState())
    flask_app.wsgi_app = IdempotencyWSGIMiddleware(  # type: ignore[method-assign]
        flask_app.wsgi_app, persistence_layer=_server_layer(), config=_server_config()
    )
    return flask_app


def asgi_server_app_logging_received() -> Any:
    """:func:`asgi_server_app`, appending ``received <key> <pid>`` to the run log once the
    middleware has read the whole body of a request with an idempotency key: a test then knows
    the request is in the middleware (claiming, or waiting for the answer) before it hangs up,
    as a server answers a request whose client left before its body was read with
    ``http.disconnect``.
    ``uvicorn --factory tests.support.harness:asgi_server_app_logging_received``.
    """
    middleware = asgi_server_app()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        key = _asgi_key(scope) if scope["type"] == "http" else None
        if key is None:
            await middleware(scope, receive, send)
            return

        async def logged_receive() -> Any:
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                _log_run("received", key)
            return message

        await middleware(scope, logged_receive, send)

    return app


def wsgi_server_app_logging_received() -> Flask:
    """:func:`wsgi_server_app`, appending ``received <key> <pid>`` to the run log when the
    server hands a request with an idempotency key to the middleware (its body is then on the
    socket for it to read).
    ``gunicorn 'tests.support.harness:wsgi_server_app_logging_received()'``.
    """
    flask_app = wsgi_server_app()
    middleware = flask_app.wsgi_app

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        key = environ.get("HTTP_IDEMPOTENCY_KEY")
        if key is not None:
            _log_run("received", key)
        return middleware(environ, start_response)

    flask_app.wsgi_app = app  # type: ignore[method-assign]
    return flask_app


def _asgi_key(scope: dict[str, Any]) -> str | None:
    for name, value in scope["headers"]:
        if name == b"idempotency-key":
            return str(value.decode("latin-1"))
    return None


def _nested_summary(nested: Reply) -> dict[str, Any]:
    return {
        "nested_status": nested.status,
        "nested": nested.json(),
        "nested_retry_after": nested.header("retry-after"),
    }


def _forwarded(headers: Any) -> Any:
    for name, value in headers:
        if name.lower() in ("idempotency-key", "content-type", "authorization"):
            yield name, value


class Harness:
    """Sends requests to the app behind the middleware, over ASGI or WSGI."""

    def __init__(
        self, kind: str, persistence_layer: BasePersistenceLayer, config: IdempotencyConfig
    ) -> None:
        self.kind = kind
        self.state = AppState(harness=self)
        self.persistence_layer = persistence_layer
        if kind == "asgi":
            self.asgi_app = IdempotencyMiddleware(
                build_asgi_app(self.state), persistence_layer=persistence_layer, config=config
            )
        else:
            flask_app = build_wsgi_app(self.state)
            flask_app.wsgi_app = IdempotencyWSGIMiddleware(  # type: ignore[method-assign]
                flask_app.wsgi_app, persistence_layer=persistence_layer, config=config
            )
            self.wsgi_client = Client(flask_app)

    @property
    def calls(self) -> Counter[str]:
        return self.state.calls

    def request(
        self,
        method: str,
        path: str,
        *,
        headers: Headers | None = None,
        body: bytes | str = b"",
        json_body: Any = None,
    ) -> Reply:
        headers = list(headers or [])
        if json_body is not None:
            body = json.dumps(json_body)
            headers.append(("content-type", "application/json"))
        data = body.encode() if isinstance(body, str) else body
        if self.kind == "asgi":
            return asyncio.run(self.arequest(method, path, headers=headers, body=data))
        # WSGI carries header bytes as latin-1 text (PEP 3333).
        wsgi_headers = [(name, value.encode().decode("latin-1")) for name, value in headers]
        response = self.wsgi_client.open(path, method=method, headers=wsgi_headers, data=data)
        return Reply(
            status=response.status_code,
            headers=[(name.lower(), value) for name, value in response.headers.items()],
            body=response.get_data(),
        )

    async def arequest(
        self, method: str, path: str, *, headers: Headers, body: bytes = b""
    ) -> Reply:
        transport = httpx.ASGITransport(app=self.asgi_app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            response = await client.request(
                method, path, headers=[(n, v.encode()) for n, v in headers], content=body
            )
        return Reply(
            status=response.status_code,
            headers=[(name.lower(), value) for name, value in response.headers.multi_items()],
            body=response.content,
        )


def assert_problem(reply: Reply, status: int, code: str) -> dict[str, Any]:
    """The reply is the RFC 9457 problem this package answers with; returns its document."""
    assert reply.status == status, reply.body
    assert reply.header("content-type") == "application/problem+json"
    problem: dict[str, Any] = reply.json()
    assert problem["status"] == status
    assert problem["code"] == code
    assert problem["type"].endswith(code)
    assert problem["title"]
    assert problem["detail"]
    return problem
