"""Issue 8, the adapters' part: uploads cut short under gunicorn, keyless uploads, byte-exact
WSGI replays, finishing calls that never queue behind claims, and a broken store at startup.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from idem_middleware import IdempotencyConfig, IdempotencyMiddleware, IdempotencyWSGIMiddleware
from idem_middleware.exceptions import IdempotencyPersistenceLayerError
from idem_middleware.persistence import DataRecord, InMemoryPersistenceLayer
from idem_middleware.persistence.record import STATUS_COMPLETED
from idem_middleware.responses import StoredResponse
from tests.support.harness import Harness
from tests.support.wsgi import WSGIServer, environ
from tooling.servers import ServerStartError, running, start_gunicorn, start_uvicorn

Message = dict[str, Any]
LIMIT = 64


def counting_wsgi_app(seen: list[bytes]) -> Any:
    def app(env: dict[str, Any], start_response: Any) -> list[bytes]:
        body = env["wsgi.input"].read()
        seen.append(body)
        start_response("201 Created", [("Content-Type", "text/plain")])
        return [b"created:" + body]

    return app


def wsgi_middleware(app: Any, **config: Any) -> IdempotencyWSGIMiddleware:
    return IdempotencyWSGIMiddleware(
        app, persistence_layer=InMemoryPersistenceLayer(), config=IdempotencyConfig(**config)
    )


# 1. gunicorn's wsgi.input_terminated ----------------------------------------------------------


def test_wsgi_terminated_input_shorter_than_content_length_is_400_and_claims_nothing() -> None:
    """gunicorn sets ``wsgi.input_terminated`` and returns EOF when the client dies mid-upload.

    Fails before the fix: the body was read to EOF, the handler ran on 10 of 24 bytes, its 201
    was stored, and the honest retry got 422 for 24 hours.
    """
    seen: list[bytes] = []
    wrapped = wsgi_middleware(counting_wsgi_app(seen))
    body = b'{"amount": 1250, "x": 1}'
    assert len(body) == 24
    cut = environ(body[:10], CONTENT_LENGTH="24", **{"wsgi.input_terminated": True})
    server = WSGIServer()
    problem = server.call(wrapped, cut)
    assert (server.status or "").startswith("400")
    assert b"request_body_incomplete" in problem
    assert seen == []
    retry = WSGIServer()
    assert retry.call(wrapped, environ(body, **{"wsgi.input_terminated": True})) == (
        b"created:" + body
    )
    assert retry.status == "201 Created"
    assert seen == [body]


def test_wsgi_terminated_input_with_content_length_over_the_limit_is_413_before_reading() -> None:
    seen: list[bytes] = []
    wrapped = wsgi_middleware(counting_wsgi_app(seen), max_request_body_bytes=LIMIT)
    env = environ(b"x" * (LIMIT + 1), **{"wsgi.input_terminated": True})
    server = WSGIServer()
    server.call(wrapped, env)
    assert (server.status or "").startswith("413")
    assert env["wsgi.input"].tell() == 0
    assert seen == []


def test_wsgi_terminated_input_without_content_length_is_read_to_eof() -> None:
    seen: list[bytes] = []
    wrapped = wsgi_middleware(counting_wsgi_app(seen))
    env = environ(b"chunked body", CONTENT_LENGTH=None, **{"wsgi.input_terminated": True})
    assert WSGIServer().call(wrapped, env) == b"created:chunked body"


@pytest.mark.e2e
def test_gunicorn_upload_cut_short_is_400_and_the_honest_retry_runs(tmp_path: Path) -> None:
    server = start_gunicorn(
        "tests.support.harness:wsgi_server_app()",
        env={"IDEM_HARNESS_STORE": "memory"},
        log_dir=tmp_path,
        threads=2,
    )
    body = b'{"amount": 1250, "x": 1}'
    with running(server) as live:
        host, port = live.base_url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(
                b"POST /orders HTTP/1.1\r\nHost: test\r\nIdempotency-Key: upload-1\r\n"
                b"Content-Type: application/json\r\nContent-Length: 24\r\n\r\n" + body[:10]
            )
            sock.shutdown(socket.SHUT_WR)  # the client dies mid-upload
            answer = b""
            with contextlib.suppress(OSError):
                while chunk := sock.recv(65536):
                    answer += chunk
        # The 400 may or may not reach a client that has gone; what matters is what was stored.
        assert not answer or answer.startswith(b"HTTP/1.1 400"), answer
        with httpx.Client(base_url=live.base_url, timeout=10) as client:
            retry = client.post(
                "/orders",
                headers={"Idempotency-Key": "upload-1", "Content-Type": "application/json"},
                content=body,
            )
            assert retry.status_code == 201, retry.text
            assert retry.json()["received"] == body.decode()
            assert client.get("/_stats").json()["orders"] == 1


# 2. Keyless covered requests are not buffered -------------------------------------------------


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
def test_keyless_upload_over_the_body_limit_passes_through(kind: str) -> None:
    """Fails before the fix: the body was buffered (and refused with 413) before the middleware
    looked for a key, so adding it broke every upload endpoint.
    """
    harness = Harness(
        kind, InMemoryPersistenceLayer(), IdempotencyConfig(max_request_body_bytes=LIMIT)
    )
    reply = harness.request("POST", "/orders", body=b"u" * (LIMIT * 4))
    assert reply.status == 201
    assert reply.json()["received"] == "u" * (LIMIT * 4)
    keyed = harness.request(
        "POST", "/orders", headers=[("Idempotency-Key", "k")], body=b"u" * (LIMIT * 4)
    )
    assert keyed.status == 413


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
def test_keyless_request_with_require_key_is_400_without_reading_the_body(kind: str) -> None:
    harness = Harness(
        kind,
        InMemoryPersistenceLayer(),
        IdempotencyConfig(max_request_body_bytes=LIMIT, require_key=True),
    )
    reply = harness.request("POST", "/orders", body=b"u" * (LIMIT * 4))
    assert reply.status == 400
    assert reply.json()["code"] == "idempotency_key_missing"
    assert harness.calls["orders"] == 0


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
def test_body_keys_still_read_and_limit_the_body(kind: str) -> None:
    harness = Harness(
        kind,
        InMemoryPersistenceLayer(),
        IdempotencyConfig(max_request_body_bytes=LIMIT, key_source="header_or_body"),
    )
    assert harness.request("POST", "/orders", body=b"u" * (LIMIT * 4)).status == 413
    first = harness.request("POST", "/orders", body=b"small")
    again = harness.request("POST", "/orders", body=b"small")
    assert again.replayed
    assert again.body == first.body


def test_wsgi_keyless_request_gets_the_servers_own_input() -> None:
    streams: list[Any] = []

    def app(env: dict[str, Any], start_response: Any) -> list[bytes]:
        streams.append(env["wsgi.input"])
        start_response("200 OK", [])
        return [b"ok"]

    env = environ(b"x" * (LIMIT * 2), HTTP_IDEMPOTENCY_KEY=None)
    original = env["wsgi.input"]
    assert WSGIServer().call(wsgi_middleware(app, max_request_body_bytes=LIMIT), env) == b"ok"
    assert streams == [original]
    assert original.tell() == 0


@pytest.mark.anyio
async def test_asgi_keyless_request_gets_the_servers_own_receive() -> None:
    receives: list[Any] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        receives.append(receive)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def receive() -> Message:
        raise AssertionError("the middleware read the body of a keyless request")

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    middleware = IdempotencyMiddleware(app, persistence_layer=InMemoryPersistenceLayer())
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/upload",
        "query_string": b"",
        "headers": [(b"content-length", b"99999999")],
    }
    await middleware(scope, receive, send)
    assert receives == [receive]
    assert sent[0]["status"] == 200


# 3. Byte-exact WSGI replays --------------------------------------------------------------------


def test_wsgi_replay_keeps_the_reason_phrase_and_header_names() -> None:
    """Fails before the fix: ``201 CREATED`` came back as ``201 Created`` and ``Content-Length``
    as ``content-length``.
    """

    def app(env: dict[str, Any], start_response: Any) -> list[bytes]:
        env["wsgi.input"].read()
        start_response(
            "201 CREATED",
            [("Content-Type", "text/plain"), ("Content-Length", "2"), ("X-Order-ID", "7")],
        )
        return [b"ok"]

    wrapped = wsgi_middleware(app)
    first = WSGIServer()
    first.call(wrapped, environ())
    replay = WSGIServer()
    assert replay.call(wrapped, environ()) == b"ok"
    assert replay.status == "201 CREATED"
    assert replay.headers == [
        ("Content-Type", "text/plain"),
        ("Content-Length", "2"),
        ("X-Order-ID", "7"),
        ("Idempotent-Replayed", "true"),
    ]


def test_wsgi_replay_of_an_unknown_status_keeps_its_reason() -> None:
    def app(env: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("299 Custom Thing", [])
        return [b"custom"]

    wrapped = wsgi_middleware(app)
    WSGIServer().call(wrapped, environ())
    replay = WSGIServer()
    assert replay.call(wrapped, environ()) == b"custom"
    assert replay.status == "299 Custom Thing"


def test_stored_response_reason_round_trips_and_old_records_still_decode() -> None:
    response = StoredResponse(201, (("Content-Type", "text/plain"),), b"ok", reason="CREATED")
    assert StoredResponse.decode(response.encode()) == response
    # A record written before reasons were stored.
    old = '{"status":201,"headers":[["Content-Type","text/plain"]],"body":"ok"}'
    decoded = StoredResponse.decode(old)
    assert decoded == StoredResponse(201, (("Content-Type", "text/plain"),), b"ok")
    assert decoded.reason is None
    assert StoredResponse(201, (), b"").encode() == '{"status":201,"headers":[],"body":""}'


def test_stored_reason_survives_excluded_headers_and_omitted_bodies() -> None:
    def app(env: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("201 CREATED", [("Set-Cookie", "s=1"), ("Content-Type", "text/plain")])
        return [b"x" * 100]

    wrapped = wsgi_middleware(app, max_stored_response_bytes=10)
    WSGIServer().call(wrapped, environ())
    replay = WSGIServer()
    assert replay.call(wrapped, environ()) == b""
    assert replay.status == "201 CREATED"
    assert ("Idempotent-Body-Omitted", "true") in replay.headers


# 6. Finishing calls have their own lane -------------------------------------------------------


class HeldClaimsLayer(InMemoryPersistenceLayer):
    """A blocking layer whose claims hang while ``held`` is set, as under a held SQLite lock."""

    blocking_io: ClassVar[bool] = True

    def __init__(self) -> None:
        super().__init__()
        self.hold_claims = threading.Event()
        self.release_claims = threading.Event()
        self.claims_waiting = 0
        self.threads_taken = threading.Event()
        self.lock = threading.Lock()

    def _put_record(self, data_record: DataRecord) -> None:
        if self.hold_claims.is_set():
            with self.lock:
                self.claims_waiting += 1
                if self.claims_waiting == 2:  # every claim thread is stuck
                    self.threads_taken.set()
            self.release_claims.wait(10)
        super()._put_record(data_record)


def asgi_scope(key: bytes) -> dict[str, Any]:
    return {
        "type": "http",
        "method": "POST",
        "path": "/pay",
        "query_string": b"",
        "headers": [(b"idempotency-key", key)],
    }


@pytest.mark.anyio
async def test_asgi_completion_does_not_queue_behind_claims_for_store_threads() -> None:
    """Fails before the fix: one limiter served claims and completions, so the in-flight
    request's completion waited until the stuck claims gave their threads back.
    """
    layer = HeldClaimsLayer()
    handler_running = anyio.Event()
    finish_handler = anyio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        if scope["headers"][0][1] == b"in-flight":
            handler_running.set()
            await finish_handler.wait()
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})

    middleware = IdempotencyMiddleware(app, persistence_layer=layer)
    middleware.max_store_threads = 2
    done: list[Message] = []
    responded = anyio.Event()

    async def receive() -> Message:
        return {"type": "http.request", "body": b"{}"}

    async def record(message: Message) -> None:
        if message["type"] == "http.response.start":
            done.append(message)
            responded.set()

    async def ignore(message: Message) -> None:
        pass

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(middleware, asgi_scope(b"in-flight"), receive, record)
        await handler_running.wait()
        layer.hold_claims.set()
        for n in range(4):  # more stuck claims than store threads
            tasks.start_soon(middleware, asgi_scope(f"stuck-{n}".encode()), receive, ignore)
        await anyio.to_thread.run_sync(layer.threads_taken.wait, 5)
        finish_handler.set()
        try:
            with anyio.fail_after(30):  # a hang's bound, generous for a loaded machine
                await responded.wait()
        finally:
            layer.release_claims.set()
    assert done[0]["status"] == 201
    statuses = [r.status for r in layer._records.values()]
    assert statuses.count(STATUS_COMPLETED) == 5


# 7. A broken store fails the server's startup --------------------------------------------------


class BrokenStoreLayer(InMemoryPersistenceLayer):
    blocking_io: ClassVar[bool] = True

    def __init__(self) -> None:
        super().__init__()
        self.check_threads: list[int] = []

    def check(self) -> None:
        self.check_threads.append(threading.get_ident())
        raise IdempotencyPersistenceLayerError("table 'idempotency' does not exist")


class LifespanServer:
    """Runs the lifespan protocol as uvicorn does and records the app's answers."""

    def __init__(self) -> None:
        self.sent: list[Message] = []
        self.incoming = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
        self.startup_answered = anyio.Event()

    async def receive(self) -> Message:
        if len(self.incoming) == 1:
            await self.startup_answered.wait()
            if self.sent[-1]["type"] == "lifespan.startup.failed":
                await anyio.sleep_forever()  # a server exits: there is no shutdown
        return self.incoming.pop(0)

    async def send(self, message: Message) -> None:
        if self.startup_answered.is_set() and self.sent[0]["type"] == "lifespan.startup.failed":
            return  # the server has exited: nobody listens any more
        self.sent.append(message)
        if message["type"].startswith("lifespan.startup."):
            self.startup_answered.set()

    async def run(self, app: Any) -> None:
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tasks:

                async def serve() -> None:
                    await app(
                        {"type": "lifespan", "asgi": {"version": "3.0"}}, self.receive, self.send
                    )

                tasks.start_soon(serve)
                await self.startup_answered.wait()
                if self.sent[-1]["type"] == "lifespan.startup.failed":
                    tasks.cancel_scope.cancel()  # a server exits here


def lifespan_app(events: list[str]) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        events.append("app startup")
        yield
        events.append("app shutdown")

    async def home(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    return Starlette(routes=[Route("/", home)], lifespan=lifespan)


@pytest.mark.anyio
async def test_asgi_startup_fails_when_the_store_check_fails() -> None:
    """Fails before the fix: the app's startup.complete was forwarded and every request got 503."""
    events: list[str] = []
    layer = BrokenStoreLayer()
    middleware = IdempotencyMiddleware(lifespan_app(events), persistence_layer=layer)
    server = LifespanServer()
    await server.run(middleware)
    # The app's own startup ran first, and it was shut down before the server heard.
    assert events == ["app startup", "app shutdown"]
    assert [m["type"] for m in server.sent] == ["lifespan.startup.failed"]
    assert "table 'idempotency' does not exist" in server.sent[0]["message"]
    assert layer.check_threads
    assert threading.get_ident() not in layer.check_threads


@pytest.mark.anyio
async def test_asgi_startup_goes_on_under_passthrough_and_logs_the_problem(
    caplog: pytest.LogCaptureFixture,
) -> None:
    events: list[str] = []
    middleware = IdempotencyMiddleware(
        lifespan_app(events),
        persistence_layer=BrokenStoreLayer(),
        config=IdempotencyConfig(on_store_error="passthrough"),
    )
    server = LifespanServer()
    with caplog.at_level("WARNING", logger="idem_middleware"):
        await server.run(middleware)
    assert [m["type"] for m in server.sent] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]
    assert "table 'idempotency' does not exist" in caplog.text


@pytest.mark.anyio
async def test_asgi_app_that_ends_its_lifespan_without_shutting_down_still_fails_startup() -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "lifespan.startup.complete"})

    server = LifespanServer()
    await server.run(IdempotencyMiddleware(app, persistence_layer=BrokenStoreLayer()))
    assert [m["type"] for m in server.sent] == ["lifespan.startup.failed"]


@pytest.mark.anyio
async def test_asgi_startup_with_a_usable_store_is_the_apps_own() -> None:
    events: list[str] = []
    layer = InMemoryPersistenceLayer()
    checks: list[int] = []
    original = layer.check

    def check() -> None:
        checks.append(1)
        original()

    layer.check = check  # type: ignore[method-assign]
    middleware = IdempotencyMiddleware(lifespan_app(events), persistence_layer=layer)
    server = LifespanServer()
    await server.run(middleware)
    assert checks == [1]
    assert [m["type"] for m in server.sent] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]
    assert events == ["app startup", "app shutdown"]


@pytest.mark.anyio
async def test_asgi_app_startup_failure_is_forwarded_unchanged() -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "app says no"})

    middleware = IdempotencyMiddleware(app, persistence_layer=BrokenStoreLayer())
    server = LifespanServer()
    await server.run(middleware)
    assert server.sent == [{"type": "lifespan.startup.failed", "message": "app says no"}]


@pytest.mark.e2e
def test_uvicorn_refuses_to_start_on_a_store_it_cannot_use(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-directory" / "idempotency.sqlite3"
    with pytest.raises(ServerStartError) as failed:
        start_uvicorn(
            "tests.support.harness:asgi_server_app",
            env={"IDEM_HARNESS_STORE": f"sqlite:{missing}"},
            log_dir=tmp_path,
            extra_args=["--factory"],
        )
    assert "exited" in failed.value.summary
    assert "idempotency store unusable" in failed.value.log
    assert "no-such-directory" in failed.value.log
    assert "Traceback" not in failed.value.log  # the app was shut down, nothing left hanging


# 4. A client that goes away never causes a second execution -----------------------------------


def started_then_stopped_app(calls: list[int], *, how: str) -> Any:
    """An app that starts a stored response, then stops short: it returns when ``receive`` says
    the client went away (as Starlette's StreamingResponse does), or raises.
    """

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        calls.append(1)
        await receive()
        await send({"type": "http.response.start", "status": 201, "headers": [(b"x-id", b"1")]})
        await send({"type": "http.response.body", "body": b"part", "more_body": True})
        message = await receive()
        assert message["type"] == "http.disconnect"
        if how == "raises":
            raise RuntimeError("handler failed after the client went away? still a failure")

    return app


async def drive(middleware: IdempotencyMiddleware) -> list[Message]:
    incoming: list[Message] = [{"type": "http.request", "body": b"{}"}]
    sent: list[Message] = []

    async def receive() -> Message:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    await middleware(asgi_scope(b"k-gone"), receive, send)
    return sent


@pytest.mark.anyio
async def test_asgi_app_that_stops_when_the_client_goes_away_keeps_the_key() -> None:
    """Fails before the fix: the app returned without finishing its response, the middleware
    released the key, and the client's retry ran the handler a second time.
    """
    calls: list[int] = []
    layer = InMemoryPersistenceLayer()
    middleware = IdempotencyMiddleware(
        started_then_stopped_app(calls, how="returns"), persistence_layer=layer
    )
    await drive(middleware)
    retry = await drive(middleware)
    assert calls == [1]
    assert retry[0]["status"] == 201
    assert (b"x-id", b"1") in retry[0]["headers"]
    assert (b"idempotent-body-omitted", b"true") in retry[0]["headers"]
    assert retry[1]["body"] == b""


@pytest.mark.anyio
async def test_asgi_app_that_raises_mid_response_still_releases_the_key() -> None:
    calls: list[int] = []
    layer = InMemoryPersistenceLayer()
    middleware = IdempotencyMiddleware(
        started_then_stopped_app(calls, how="raises"), persistence_layer=layer
    )
    with pytest.raises(RuntimeError):
        await drive(middleware)
    assert layer._records == {}
