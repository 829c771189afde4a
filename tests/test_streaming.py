"""Streams that start at once (issue 10) and streams that break (issue 8), over ASGI and WSGI.

A covered streamed response is forwarded as the app produces it; only its end (the final ASGI
message, the end of the WSGI iterable, or the chunk that completes a declared Content-Length)
waits until the record is completed. Ordering is asserted with events the test controls: an app
that must wait for the client to have seen its first chunk deadlocks (and times out) when the
middleware holds that chunk back.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from flask import Flask
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from idem_middleware import IdempotencyConfig, IdempotencyMiddleware, IdempotencyWSGIMiddleware
from idem_middleware.persistence import InMemoryPersistenceLayer
from idem_middleware.persistence.record import STATUS_COMPLETED, STATUS_INPROGRESS
from tests.support.asgi import ASGIClient, record_statuses
from tests.support.harness import Harness
from tests.support.wsgi import environ
from tooling.servers import running, start_gunicorn, start_uvicorn

Message = dict[str, Any]
KEY = (b"idempotency-key", b"stream-1")
PER_TRANSMISSION = {b"content-length", b"idempotent-replayed", b"idempotent-body-omitted"}
WAIT = 5  # seconds; only reached when the middleware holds back what it must forward


# ASGI ----------------------------------------------------------------------------------------


def scope(spec_version: str = "2.3", path: str = "/stream") -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": spec_version},
        "http_version": "1.1",
        "method": "POST",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "scheme": "http",
        "server": ("testserver", 80),
        "client": ("127.0.0.1", 1234),
        "headers": [KEY, (b"content-type", b"application/json")],
    }


class GatedStream:
    """A Starlette app whose StreamingResponse yields its first event, then waits for ``go``."""

    def __init__(self, parts: int = 3, fail_after: int | None = None, size: int = 0) -> None:
        self.calls = 0
        self.go = anyio.Event()
        self.parts = parts
        self.fail_after = fail_after
        self.size = size

    def event(self, n: int) -> bytes:
        return f"data: {n}\n\n".encode() + b"x" * self.size

    def app(self) -> Starlette:
        async def endpoint(request: Request) -> Response:
            self.calls += 1
            await request.body()

            async def events() -> AsyncIterator[bytes]:
                for n in range(self.parts):
                    if n == 1:
                        await self.go.wait()
                    if n == self.fail_after:
                        raise RuntimeError("the stream broke")
                    yield self.event(n)

            return StreamingResponse(
                events(), media_type="text/event-stream", headers={"X-Stream": "yes"}
            )

        return Starlette(routes=[Route("/stream", endpoint, methods=["POST"])])


def asgi_middleware(
    stream: GatedStream, layer: InMemoryPersistenceLayer, **config: Any
) -> IdempotencyMiddleware:
    return IdempotencyMiddleware(
        stream.app(), persistence_layer=layer, config=IdempotencyConfig(**config)
    )


async def asgi_call(
    middleware: IdempotencyMiddleware, layer: InMemoryPersistenceLayer
) -> ASGIClient:
    client = ASGIClient(layer)
    await middleware(scope(), client.receive, client.send)
    return client


@pytest.mark.anyio
async def test_asgi_stream_is_forwarded_at_once_and_replayed_whole() -> None:
    """Fails before the fix: the middleware holds the first event until the stream ends, and
    the stream waits for the client to have seen it.
    """
    layer = InMemoryPersistenceLayer()
    stream = GatedStream()
    middleware = asgi_middleware(stream, layer)
    first = ASGIClient(layer)
    conflict: list[ASGIClient] = []

    async def client_side() -> None:
        await first.first_chunk.wait()
        assert first.status == 200
        assert record_statuses(layer) == [STATUS_INPROGRESS]
        conflict.append(await asgi_call(middleware, layer))  # a retry while the stream runs
        stream.go.set()

    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(client_side)
            await middleware(scope(), first.receive, first.send)

    assert conflict[0].status == 409
    # Each event went out as produced; only the final message waited for the record.
    assert [(body, more) for body, more, _ in first.statuses_at_body] == [
        (stream.event(0), True),
        (stream.event(1), True),
        (stream.event(2), True),
        (b"", False),
    ]
    assert [statuses for _, _, statuses in first.statuses_at_body] == [
        [STATUS_INPROGRESS],
        [STATUS_INPROGRESS],
        [STATUS_INPROGRESS],
        [STATUS_COMPLETED],
    ]
    replay = await asgi_call(middleware, layer)
    assert stream.calls == 1
    assert replay.status == 200
    assert replay.body_received == first.body_received == b"".join(map(stream.event, range(3)))
    assert (b"idempotent-replayed", b"true") in replay.headers
    assert [h for h in replay.headers if h[0] not in PER_TRANSMISSION] == [
        h for h in first.headers if h[0] not in PER_TRANSMISSION
    ]


@pytest.mark.anyio
async def test_asgi_stream_over_the_stored_size_limit_is_completed_at_its_end() -> None:
    """Fails before the fix: passing the limit completed the record at once (body omitted),
    so a retry during the stream got a replay of a response that was still being produced.
    """
    layer = InMemoryPersistenceLayer()
    stream = GatedStream(size=100)
    middleware = asgi_middleware(stream, layer, max_stored_response_bytes=50)
    first = ASGIClient(layer)
    during: list[ASGIClient] = []

    async def client_side() -> None:
        await first.first_chunk.wait()
        during.append(await asgi_call(middleware, layer))
        stream.go.set()

    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(client_side)
            await middleware(scope(), first.receive, first.send)

    assert during[0].status == 409
    assert first.body_received == b"".join(map(stream.event, range(3)))
    assert first.statuses_at_body[-1][2] == [STATUS_COMPLETED]
    replay = await asgi_call(middleware, layer)
    assert stream.calls == 1
    assert replay.body_received == b""
    assert (b"idempotent-body-omitted", b"true") in replay.headers


@pytest.mark.anyio
async def test_asgi_stream_that_breaks_after_the_limit_is_not_stored() -> None:
    """Fails before the fix: the record was completed (body omitted) when the stream passed the
    limit, so the broken response was replayed as a success and the retry never ran.
    """
    layer = InMemoryPersistenceLayer()
    stream = GatedStream(size=100, fail_after=2)
    stream.go.set()
    middleware = asgi_middleware(stream, layer, max_stored_response_bytes=50)
    with anyio.fail_after(WAIT), pytest.raises(RuntimeError, match="the stream broke"):
        await asgi_call(middleware, layer)
    assert layer._records == {}
    stream.fail_after = None
    retry = await asgi_call(middleware, layer)
    assert stream.calls == 2
    assert retry.status == 200
    assert (b"idempotent-replayed", b"true") not in retry.headers


@pytest.mark.anyio
async def test_asgi_chunk_that_completes_a_declared_content_length_waits_for_the_record() -> None:
    layer = InMemoryPersistenceLayer()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        headers = [(b"content-length", b"6"), (b"content-type", b"text/plain")]
        await send({"type": "http.response.start", "status": 201, "headers": headers})
        await send({"type": "http.response.body", "body": b"abc", "more_body": True})
        await send({"type": "http.response.body", "body": b"def", "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    middleware = IdempotencyMiddleware(app, persistence_layer=layer)
    client = await asgi_call(middleware, layer)
    assert client.body_received == b"abcdef"
    # The client holds the whole response once it has 6 bytes: "def" waits for the record.
    sent = [(body, statuses) for body, _, statuses in client.statuses_at_body if body]
    assert sent == [(b"abc", [STATUS_INPROGRESS]), (b"def", [STATUS_COMPLETED])]


@pytest.mark.anyio
@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
async def test_asgi_client_that_disconnects_mid_stream_never_causes_a_second_execution(
    spec_version: str,
) -> None:
    """Issue 8: Starlette's StreamingResponse stops when the client goes away (it listens for
    ``http.disconnect`` under ASGI spec < 2.4; under 2.4 a failed send raises ClientDisconnect).

    Fails before the fix: the app returned (or raised) without finishing, the middleware
    released the key, and the client's retry ran the handler again.
    """
    layer = InMemoryPersistenceLayer()
    stream = GatedStream()
    middleware = asgi_middleware(stream, layer)
    client = ASGIClient(layer)

    async def client_side() -> None:
        await client.first_chunk.wait()
        client.disconnect(fail_sends=spec_version == "2.4")
        if spec_version == "2.4":
            stream.go.set()  # the next send fails; before 2.4 Starlette cancels the stream

    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(client_side)
            # Under 2.4 Starlette turns the failed send into ClientDisconnect.
            with pytest.raises(ClientDisconnect) if spec_version == "2.4" else nullcontext():
                await middleware(scope(spec_version), client.receive, client.send)

    assert client.body_received == stream.event(0)
    assert record_statuses(layer) == [STATUS_COMPLETED]
    retry = await asgi_call(middleware, layer)
    assert stream.calls == 1
    assert retry.status == 200
    assert (b"idempotent-replayed", b"true") in retry.headers
    assert (b"idempotent-body-omitted", b"true") in retry.headers
    assert (b"x-stream", b"yes") in retry.headers


@pytest.mark.anyio
async def test_asgi_app_that_raises_mid_stream_releases_the_key() -> None:
    layer = InMemoryPersistenceLayer()
    stream = GatedStream(fail_after=1)
    stream.go.set()
    middleware = asgi_middleware(stream, layer)
    with anyio.fail_after(WAIT), pytest.raises(RuntimeError, match="the stream broke"):
        await asgi_call(middleware, layer)
    assert layer._records == {}


# WSGI ----------------------------------------------------------------------------------------


class GatedFlaskStream:
    """A Flask view returning a generator: its first event, then wait for ``go``."""

    def __init__(self, parts: int = 3, fail_after: int | None = None, size: int = 0) -> None:
        self.calls = 0
        self.go = threading.Event()
        self.parts = parts
        self.fail_after = fail_after
        self.size = size

    def event(self, n: int) -> bytes:
        return f"data: {n}\n\n".encode() + b"x" * self.size

    def app(self) -> Flask:
        app = Flask("streaming")

        @app.post("/stream")
        def stream() -> Any:
            self.calls += 1

            def events() -> Iterator[bytes]:
                for n in range(self.parts):
                    if n == 1 and not self.go.wait(WAIT):
                        raise TimeoutError("the first event never reached the client")
                    if n == self.fail_after:
                        raise RuntimeError("the stream broke")
                    yield self.event(n)

            return app.response_class(
                events(), mimetype="text/event-stream", headers={"X-Stream": "yes"}
            )

        return app


class WSGIResponse:
    """What a server got from one call: the status line, the headers and the iterable."""

    def __init__(self, app: Any) -> None:
        self.status: str | None = None
        self.headers: list[tuple[str, str]] = []
        self.iterable = app(
            environ(path="/stream", key="stream-1", CONTENT_TYPE="application/json"),
            self.start_response,
        )
        self.iterator = iter(self.iterable)

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Any:
        self.status = status
        self.headers = headers
        return lambda data: None

    def rest(self) -> bytes:
        try:
            return b"".join(self.iterator)
        finally:
            self.close()

    def close(self) -> None:
        close = getattr(self.iterable, "close", None)
        if close is not None:
            close()


def wsgi_app(stream: GatedFlaskStream, layer: InMemoryPersistenceLayer, **config: Any) -> Flask:
    flask_app = stream.app()
    flask_app.wsgi_app = IdempotencyWSGIMiddleware(  # type: ignore[method-assign]
        flask_app.wsgi_app, persistence_layer=layer, config=IdempotencyConfig(**config)
    )
    return flask_app


def test_wsgi_generator_is_forwarded_at_once_and_replayed_whole() -> None:
    """Fails before the fix: the middleware iterated the whole generator before returning, and
    the generator waits for the client to have seen its first event.
    """
    layer = InMemoryPersistenceLayer()
    stream = GatedFlaskStream()
    app = wsgi_app(stream, layer)
    first = WSGIResponse(app)
    assert first.status == "200 OK"
    assert next(first.iterator) == stream.event(0)
    assert record_statuses(layer) == [STATUS_INPROGRESS]
    during = WSGIResponse(app)
    assert (during.status or "").startswith("409")
    during.rest()
    stream.go.set()
    body = stream.event(0) + first.rest()
    assert body == b"".join(map(stream.event, range(3)))
    assert record_statuses(layer) == [STATUS_COMPLETED]
    replay = WSGIResponse(app)
    assert replay.rest() == body
    assert stream.calls == 1
    assert replay.status == first.status
    assert ("Idempotent-Replayed", "true") in replay.headers
    assert [h for h in replay.headers if h[0].lower().encode() not in PER_TRANSMISSION] == [
        h for h in first.headers if h[0].lower().encode() not in PER_TRANSMISSION
    ]


def test_wsgi_end_of_the_stream_waits_for_the_record() -> None:
    layer = InMemoryPersistenceLayer()
    seen: list[tuple[bytes, list[str]]] = []

    def app(environ: Any, start_response: Any) -> Iterator[bytes]:
        start_response("201 Created", [("Content-Type", "text/plain")])
        yield from (b"a", b"b", b"c")

    wrapped = IdempotencyWSGIMiddleware(app, persistence_layer=layer)
    response = WSGIResponse(wrapped)
    for chunk in response.iterator:
        seen.append((chunk, record_statuses(layer)))
    statuses_at_end = record_statuses(layer)
    assert [chunk for chunk, _ in seen] == [b"a", b"b", b"c"]
    assert all(statuses == [STATUS_INPROGRESS] for _, statuses in seen)
    # Without a Content-Length the client knows the response is whole only when the server
    # ends it, after the iterable is exhausted: by then the record is completed.
    assert statuses_at_end == [STATUS_COMPLETED]


def test_wsgi_chunk_that_completes_a_declared_content_length_waits_for_the_record() -> None:
    layer = InMemoryPersistenceLayer()

    def app(environ: Any, start_response: Any) -> Iterator[bytes]:
        start_response("201 Created", [("Content-Type", "text/plain"), ("Content-Length", "6")])
        yield b"abc"
        yield b"def"

    wrapped = IdempotencyWSGIMiddleware(app, persistence_layer=layer)
    response = WSGIResponse(wrapped)
    assert next(response.iterator) == b"abc"
    assert record_statuses(layer) == [STATUS_INPROGRESS]
    assert next(response.iterator) == b"def"
    assert record_statuses(layer) == [STATUS_COMPLETED]
    assert response.rest() == b""


def test_wsgi_stream_over_the_stored_size_limit_is_completed_at_its_end() -> None:
    layer = InMemoryPersistenceLayer()
    stream = GatedFlaskStream(size=100)
    app = wsgi_app(stream, layer, max_stored_response_bytes=50)
    first = WSGIResponse(app)
    next(first.iterator)
    during = WSGIResponse(app)
    assert (during.status or "").startswith("409")
    during.rest()
    stream.go.set()
    first.rest()
    replay = WSGIResponse(app)
    assert replay.rest() == b""
    assert ("Idempotent-Body-Omitted", "true") in replay.headers
    assert stream.calls == 1


def test_wsgi_stream_that_breaks_after_the_limit_is_not_stored() -> None:
    """Fails before the fix: passing the limit completed the record (body omitted) before the
    generator broke; the retry got that replay instead of running again.
    """
    layer = InMemoryPersistenceLayer()
    stream = GatedFlaskStream(size=100, fail_after=2)
    stream.go.set()
    app = wsgi_app(stream, layer, max_stored_response_bytes=50)
    with pytest.raises(RuntimeError, match="the stream broke"):
        WSGIResponse(app).rest()
    assert layer._records == {}
    stream.fail_after = None
    retry = WSGIResponse(app)
    retry.rest()
    assert stream.calls == 2
    assert ("Idempotent-Replayed", "true") not in retry.headers


def test_wsgi_client_that_goes_away_mid_stream_never_causes_a_second_execution() -> None:
    """The server closes the iterable when it cannot write to the client any more."""
    layer = InMemoryPersistenceLayer()
    stream = GatedFlaskStream()
    app = wsgi_app(stream, layer)
    first = WSGIResponse(app)
    assert next(first.iterator) == stream.event(0)
    first.close()
    assert record_statuses(layer) == [STATUS_COMPLETED]
    stream.go.set()
    replay = WSGIResponse(app)
    assert replay.rest() == b""
    assert ("Idempotent-Body-Omitted", "true") in replay.headers
    assert stream.calls == 1


# Both adapters through the shared harness ----------------------------------------------------


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
def test_harness_stream_is_replayed_byte_exact(kind: str) -> None:
    harness = Harness(kind, InMemoryPersistenceLayer(), IdempotencyConfig())
    headers = [("Idempotency-Key", "sse-1")]
    first = harness.request("POST", "/stream?parts=4", headers=headers)
    replay = harness.request("POST", "/stream?parts=4", headers=headers)
    assert first.status == replay.status == 200
    assert first.body == replay.body
    assert first.body.count(b"data: event") == 4
    assert replay.replayed
    assert replay.header("x-stream") == "1"
    assert harness.calls["stream"] == 1


# Real servers --------------------------------------------------------------------------------


def read_first_event(chunks: Iterator[bytes]) -> bytes:
    """The first chunk of ``chunks`` (kept open: a closed iterator closes the connection)."""
    for chunk in chunks:
        if chunk:
            return chunk
    raise AssertionError("the stream ended before its first event")


@pytest.mark.e2e
@pytest.mark.parametrize("server", ["uvicorn", "gunicorn"])
def test_real_server_delivers_the_first_event_before_the_stream_ends(
    server: str, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    env = {"IDEM_HARNESS_STORE": "memory"}
    if server == "uvicorn":
        started = start_uvicorn(
            "tests.support.harness:asgi_server_app",
            env=env,
            log_dir=tmp_path,
            extra_args=["--factory"],
        )
    else:
        started = start_gunicorn(
            "tests.support.harness:wsgi_server_app()", env=env, log_dir=tmp_path, threads=4
        )
    headers = {"Idempotency-Key": "sse-e2e"}
    with running(started) as live, httpx.Client(base_url=live.base_url, timeout=10) as client:
        with client.stream("POST", f"/stream?parts=3&gate={gate}", headers=headers) as response:
            assert response.status_code == 200
            chunks = response.iter_raw()
            assert b"event 0" in read_first_event(chunks)  # the gate is still closed
            during = client.post(f"/stream?parts=3&gate={gate}", headers=headers)
            assert during.status_code == 409, (during.headers, during.text)
            gate.touch()
            rest = b"".join(chunks)
            assert rest.count(b"data: event") == 2
        replay = client.post(f"/stream?parts=3&gate={gate}", headers=headers)
        assert replay.headers["idempotent-replayed"] == "true"
        assert replay.content.count(b"data: event") == 3
        assert client.get("/_stats").json()["stream"] == 1
        assert "Traceback" not in live.log()


@pytest.mark.e2e
def test_uvicorn_client_that_disconnects_mid_stream_never_causes_a_second_execution(
    tmp_path: Path,
) -> None:
    """Issue 8 on a real server: the client reads the first event and hangs up; uvicorn tells
    the app ``http.disconnect``, Starlette stops the stream, and the app returns unfinished.
    """
    gate = tmp_path / "gate"  # never opened: the stream runs until the client hangs up
    started = start_uvicorn(
        "tests.support.harness:asgi_server_app",
        env={"IDEM_HARNESS_STORE": "memory"},
        log_dir=tmp_path,
        extra_args=["--factory"],
    )
    headers = {"Idempotency-Key": "sse-disconnect"}
    url = f"/stream?parts=3&gate={gate}"
    with running(started) as live, httpx.Client(base_url=live.base_url, timeout=10) as client:
        with (
            httpx.Client(base_url=live.base_url, timeout=10) as first,
            first.stream("POST", url, headers=headers) as response,
        ):
            assert b"event 0" in read_first_event(response.iter_raw())
        retry = client.post(url, headers=headers)
        # Until the server has noticed the hang-up: a generous bound, for a loaded machine.
        deadline = time.monotonic() + 30
        while retry.status_code == 409 and time.monotonic() < deadline:
            anyio.run(anyio.sleep, 0.05)
            retry = client.post(url, headers=headers)
        assert retry.status_code == 200, retry.text
        assert retry.headers["idempotent-replayed"] == "true"
        assert retry.headers["idempotent-body-omitted"] == "true"
        assert client.get("/_stats").json()["stream"] == 1
