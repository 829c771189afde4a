"""What only the ASGI adapter does: buffering ``receive``, capturing ``send``, the event loop."""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

import anyio
import pytest

from idem_middleware import IdempotencyConfig, IdempotencyMiddleware
from idem_middleware.asgi import route_path
from idem_middleware.persistence import DataRecord, InMemoryPersistenceLayer
from idem_middleware.persistence.record import STATUS_COMPLETED, STATUS_INPROGRESS

pytestmark = pytest.mark.anyio

Message = dict[str, Any]
KEY_HEADER = (b"idempotency-key", b"k-1")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def http_scope(
    method: str = "POST", path: str = "/pay", headers: list[tuple[bytes, bytes]] | None = None
) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "scheme": "http",
        "server": ("testserver", 80),
        "client": ("127.0.0.1", 1234),
        "headers": headers if headers is not None else [KEY_HEADER],
    }


class Client:
    """Drives one request through an ASGI app with scripted ``receive`` messages."""

    def __init__(self, messages: list[Message] | None = None) -> None:
        self.incoming = list(messages or [{"type": "http.request", "body": b"{}"}])
        self.sent: list[Message] = []

    async def receive(self) -> Message:
        if self.incoming:
            return self.incoming.pop(0)
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        self.sent.append(message)

    @property
    def status(self) -> int:
        return int(self.sent[0]["status"])

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        return list(self.sent[0]["headers"])

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")


App = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


def chunked_app(calls: list[int]) -> App:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        calls.append(1)
        request = await receive()
        await send(
            {
                "type": "http.response.start",
                "status": 201,
                "headers": [
                    (b"content-type", b"text/plain"),
                    (b"x-dup", b"one"),
                    (b"x-dup", b"two"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": b"got:", "more_body": True})
        await send({"type": "http.response.body", "body": request["body"], "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


async def test_non_http_scopes_pass_straight_through() -> None:
    seen: list[tuple[Any, Any, Any]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append((scope, receive, send))

    middleware = IdempotencyMiddleware(app, persistence_layer=InMemoryPersistenceLayer())
    client = Client()
    scope = {"type": "websocket", "path": "/ws", "headers": []}
    await middleware(scope, client.receive, client.send)
    assert seen[-1] == (scope, client.receive, client.send)
    # Lifespan reaches the app too, its messages watched to check the store at startup.
    lifespan = {"type": "lifespan"}
    await middleware(lifespan, client.receive, client.send)
    assert seen[-1][0] is lifespan


async def test_uncovered_requests_are_not_buffered() -> None:
    seen: list[Any] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(receive)

    middleware = IdempotencyMiddleware(app, persistence_layer=InMemoryPersistenceLayer())
    client = Client()
    await middleware(http_scope(method="GET"), client.receive, client.send)
    assert seen == [client.receive]
    assert len(client.incoming) == 1  # nothing was read on the app's behalf


async def test_multi_chunk_response_and_duplicate_headers_are_replayed() -> None:
    calls: list[int] = []
    middleware = IdempotencyMiddleware(
        chunked_app(calls), persistence_layer=InMemoryPersistenceLayer()
    )
    first = Client([{"type": "http.request", "body": b"abc"}])
    await middleware(http_scope(), first.receive, first.send)
    retry = Client([{"type": "http.request", "body": b"abc"}])
    await middleware(http_scope(), retry.receive, retry.send)
    assert calls == [1]
    assert first.body == retry.body == b"got:abc"
    assert [v for k, v in retry.headers if k == b"x-dup"] == [b"one", b"two"]
    assert (b"idempotent-replayed", b"true") in retry.headers
    assert (b"content-length", b"7") in retry.headers


async def test_body_is_counted_while_reading_without_content_length() -> None:
    calls: list[int] = []
    layer = InMemoryPersistenceLayer()
    middleware = IdempotencyMiddleware(
        chunked_app(calls),
        persistence_layer=layer,
        config=IdempotencyConfig(max_request_body_bytes=10),
    )
    client = Client(
        [
            {"type": "http.request", "body": b"123456", "more_body": True},
            {"type": "http.request", "body": b"789012", "more_body": False},
        ]
    )
    await middleware(http_scope(), client.receive, client.send)
    assert client.status == 413
    assert calls == []
    assert layer._records == {}


async def test_declared_content_length_over_the_limit_is_refused_before_reading() -> None:
    calls: list[int] = []
    middleware = IdempotencyMiddleware(
        chunked_app(calls),
        persistence_layer=InMemoryPersistenceLayer(),
        config=IdempotencyConfig(max_request_body_bytes=10),
    )
    client = Client([{"type": "http.request", "body": b"x" * 11}])
    headers = [KEY_HEADER, (b"content-length", b"11")]
    await middleware(http_scope(headers=headers), client.receive, client.send)
    assert client.status == 413
    assert len(client.incoming) == 1


async def test_client_disconnect_while_buffering_claims_nothing() -> None:
    calls: list[int] = []
    layer = InMemoryPersistenceLayer()
    middleware = IdempotencyMiddleware(chunked_app(calls), persistence_layer=layer)
    client = Client(
        [{"type": "http.request", "body": b"part", "more_body": True}, {"type": "http.disconnect"}]
    )
    await middleware(http_scope(), client.receive, client.send)
    assert calls == []
    assert client.sent == []
    assert layer._records == {}


async def test_app_receives_the_body_then_the_servers_own_messages() -> None:
    received: list[Message] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        received.append(await receive())
        received.append(await receive())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    middleware = IdempotencyMiddleware(app, persistence_layer=InMemoryPersistenceLayer())
    client = Client(
        [
            {"type": "http.request", "body": b"a", "more_body": True},
            {"type": "http.request", "body": b"b", "more_body": False},
        ]
    )
    await middleware(http_scope(), client.receive, client.send)
    assert received == [
        {"type": "http.request", "body": b"ab", "more_body": False},
        {"type": "http.disconnect"},
    ]


async def test_record_is_completed_before_the_response_is_sent() -> None:
    layer = InMemoryPersistenceLayer()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"whole"})

    middleware = IdempotencyMiddleware(app, persistence_layer=layer)
    statuses_at_send: list[str] = []
    client = Client()

    async def send(message: Message) -> None:
        statuses_at_send.extend(record.status for record in layer._records.values())
        await client.send(message)

    await middleware(http_scope(), client.receive, send)
    assert statuses_at_send == [STATUS_COMPLETED, STATUS_COMPLETED]


async def test_streamed_body_goes_out_at_once_and_its_final_message_after_the_record() -> None:
    layer = InMemoryPersistenceLayer()
    middleware = IdempotencyMiddleware(chunked_app([]), persistence_layer=layer)
    sent: list[tuple[str, bool, list[str]]] = []
    client = Client()

    async def send(message: Message) -> None:
        statuses = [record.status for record in layer._records.values()]
        sent.append((message["type"], message.get("more_body", False), statuses))
        await client.send(message)

    await middleware(http_scope(), client.receive, send)
    assert sent == [
        ("http.response.start", False, [STATUS_INPROGRESS]),
        ("http.response.body", True, [STATUS_INPROGRESS]),
        ("http.response.body", True, [STATUS_INPROGRESS]),
        ("http.response.body", False, [STATUS_COMPLETED]),
    ]


@pytest.mark.parametrize("when", ["before_start", "after_start", "mid_body"])
async def test_app_exception_releases_the_record_and_propagates_unchanged(when: str) -> None:
    layer = InMemoryPersistenceLayer()
    error = RuntimeError("handler failed")

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        if when != "before_start":
            await send({"type": "http.response.start", "status": 200, "headers": []})
        if when == "mid_body":
            await send({"type": "http.response.body", "body": b"x", "more_body": True})
        raise error

    middleware = IdempotencyMiddleware(app, persistence_layer=layer)
    client = Client()
    with pytest.raises(RuntimeError) as raised:
        await middleware(http_scope(), client.receive, client.send)
    assert raised.value is error
    assert layer._records == {}
    # Nothing complete was sent: before the start the server can still answer 500; a streamed
    # body that broke never got its final message.
    assert not any(
        m["type"] == "http.response.body" and not m.get("more_body") for m in client.sent
    )
    assert bool(client.sent) == (when == "mid_body")


async def test_exception_after_the_response_was_sent_keeps_the_record() -> None:
    layer = InMemoryPersistenceLayer()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})
        raise RuntimeError("background task failed")

    middleware = IdempotencyMiddleware(app, persistence_layer=layer)
    client = Client()
    with pytest.raises(RuntimeError):
        await middleware(http_scope(), client.receive, client.send)
    assert [record.status for record in layer._records.values()] == [STATUS_COMPLETED]


async def test_app_that_sends_no_response_releases_the_record() -> None:
    layer = InMemoryPersistenceLayer()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()

    middleware = IdempotencyMiddleware(app, persistence_layer=layer)
    client = Client()
    await middleware(http_scope(), client.receive, client.send)
    assert layer._records == {}


async def test_uncapturable_server_extensions_are_hidden_from_covered_requests() -> None:
    seen: list[dict[str, Any]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope["extensions"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    middleware = IdempotencyMiddleware(app, persistence_layer=InMemoryPersistenceLayer())
    scope = http_scope()
    scope["extensions"] = {"http.response.pathsend": {}, "http.response.debug": {}}
    client = Client()
    await middleware(scope, client.receive, client.send)
    assert seen == [{"http.response.debug": {}}]
    assert "http.response.pathsend" in scope["extensions"]  # the server's scope is not mutated


class ThreadRecordingLayer(InMemoryPersistenceLayer):
    """An in-memory layer that claims to block, recording the thread of each primitive."""

    blocking_io: ClassVar[bool] = True

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[int] = []

    def _put_record(self, data_record: DataRecord) -> None:
        self.threads.append(threading.get_ident())
        super()._put_record(data_record)

    def _update_record(self, data_record: DataRecord) -> None:
        self.threads.append(threading.get_ident())
        super()._update_record(data_record)


async def test_blocking_store_calls_run_off_the_event_loop() -> None:
    layer = ThreadRecordingLayer()
    middleware = IdempotencyMiddleware(chunked_app([]), persistence_layer=layer)
    client = Client()
    await middleware(http_scope(), client.receive, client.send)
    assert client.status == 201
    assert len(layer.threads) == 2
    assert threading.get_ident() not in layer.threads


async def test_non_blocking_store_calls_run_inline() -> None:
    layer = InMemoryPersistenceLayer()
    threads: list[int] = []
    original = layer._put_record

    def put(record: DataRecord) -> None:
        threads.append(threading.get_ident())
        original(record)

    layer._put_record = put  # type: ignore[method-assign]
    middleware = IdempotencyMiddleware(chunked_app([]), persistence_layer=layer)
    client = Client()
    await middleware(http_scope(), client.receive, client.send)
    assert threads == [threading.get_ident()]


class SlowCountingLayer(InMemoryPersistenceLayer):
    """A blocking layer whose claim takes a while; counts the claims in flight at once.

    The first claims wait (10 s at most) until ``expected`` are in flight together, so that the
    limit is reached however late a loaded machine starts the threads; any more than that get
    the time to show in ``most_in_flight`` too.
    """

    blocking_io: ClassVar[bool] = True

    def __init__(self, expected: int) -> None:
        super().__init__()
        self.expected = expected
        self.changed = threading.Condition()
        self.in_flight = self.most_in_flight = 0

    def _put_record(self, data_record: DataRecord) -> None:
        with self.changed:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            self.changed.notify_all()
            self.changed.wait_for(lambda: self.most_in_flight >= self.expected, timeout=10)
        time.sleep(0.02)
        with self.changed:
            self.in_flight -= 1
        super()._put_record(data_record)


async def test_blocking_store_calls_use_at_most_max_store_threads() -> None:
    layer = SlowCountingLayer(expected=3)
    middleware = IdempotencyMiddleware(chunked_app([]), persistence_layer=layer)
    middleware.max_store_threads = 3
    clients = [Client() for _ in range(12)]
    async with anyio.create_task_group() as tasks:
        for n, client in enumerate(clients):
            scope = http_scope(headers=[(b"idempotency-key", f"k-{n}".encode())])
            tasks.start_soon(middleware, scope, client.receive, client.send)
    assert [client.status for client in clients] == [201] * 12
    assert layer.most_in_flight == 3


@pytest.mark.parametrize(
    ("path", "root_path", "expected"),
    [
        ("/pay", "", "/pay"),
        ("/api/pay", "/api", "/pay"),
        ("/api", "/api", "/"),
        ("/apis/pay", "/api", "/apis/pay"),  # a prefix of a segment is not a mount
        ("/pay", "/api", "/pay"),  # servers that leave root_path out of path
    ],
)
def test_route_path_is_relative_to_root_path(path: str, root_path: str, expected: str) -> None:
    assert route_path({"path": path, "root_path": root_path}) == expected


async def test_include_paths_match_routes_under_a_root_path() -> None:
    calls: list[int] = []
    middleware = IdempotencyMiddleware(
        chunked_app(calls),
        persistence_layer=InMemoryPersistenceLayer(),
        config=IdempotencyConfig(include_paths=("/pay",)),
    )
    for _ in range(2):
        scope = http_scope(path="/api/pay")
        scope["root_path"] = "/api"
        client = Client()
        await middleware(scope, client.receive, client.send)
    assert calls == [1]
