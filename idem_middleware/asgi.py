"""IdempotencyMiddleware: pure ASGI middleware for FastAPI, Starlette and any ASGI app."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from anyio.lowlevel import RunVar

from idem_middleware.config import IdempotencyConfig
from idem_middleware.engine import IdempotencyEngine, PassThrough, PendingClaim, Proceed, Respond
from idem_middleware.persistence.base import BasePersistenceLayer
from idem_middleware.request import Headers, IdempotencyRequest
from idem_middleware.responses import StoredResponse

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

T = TypeVar("T")

# Server extensions that let an app send a response we could not capture (a file path, trailers).
_UNCAPTURABLE_EXTENSIONS = (
    "http.response.pathsend",
    "http.response.zerocopysend",
    "http.response.trailers",
)


class IdempotencyMiddleware:
    """Runs each covered request once per idempotency key and replays its response to retries.

    ``app.add_middleware(IdempotencyMiddleware, persistence_layer=..., config=...)`` or
    ``IdempotencyMiddleware(app, persistence_layer=..., config=...)``. Requests the config does not
    cover (other methods, excluded paths, websockets, lifespan) pass straight through, unbuffered.
    """

    #: A store that blocks (DynamoDB, SQLite, Redis) is called from worker threads, at most this
    #: many at once per event loop. More threads add no throughput - they take turns at the GIL,
    #: and the event loop queues behind them (BENCHMARKS.md: the p99 of an uncovered request
    #: under load) - and would take anyio's shared pool from the app's sync endpoints.
    max_store_threads: int = 8

    def __init__(
        self,
        app: ASGIApp,
        *,
        persistence_layer: BasePersistenceLayer,
        config: IdempotencyConfig | None = None,
    ) -> None:
        self.app = app
        self.engine = IdempotencyEngine(persistence_layer, config)
        # One limiter per event loop, as anyio keeps its own default thread limiter.
        self._store_limiter: RunVar[anyio.CapacityLimiter] = RunVar(f"store-limiter-{id(self)}")

    def store_limiter(self) -> anyio.CapacityLimiter:
        """The limiter of this middleware's store threads in the running event loop."""
        try:
            return self._store_limiter.get()
        except LookupError:
            limiter = anyio.CapacityLimiter(self.max_store_threads)
            self._store_limiter.set(limiter)
            return limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        if not self.engine.covers(scope["method"], path):
            await self.app(scope, receive, send)
            return
        await IdempotentExchange(self, scope, receive, send, path).run()


def route_path(scope: Scope) -> str:
    """The path the app routes on: ``scope["path"]`` less ``root_path`` (a ``Mount``, or
    ``uvicorn --root-path``), so ``include_paths`` are written as the app's own routes, as they
    are under WSGI where ``PATH_INFO`` already excludes ``SCRIPT_NAME``.
    """
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    if root_path and path.startswith(root_path):
        rest = path[len(root_path) :]
        if not rest:
            return "/"
        if rest.startswith("/"):
            return rest
    return path


class IdempotentExchange:
    """The state of one covered request: its buffered body, its lease and the captured response."""

    def __init__(
        self,
        middleware: IdempotencyMiddleware,
        scope: Scope,
        receive: Receive,
        send: Send,
        path: str,
    ) -> None:
        self.middleware = middleware
        self.engine = middleware.engine
        self.app = middleware.app
        self.scope = scope
        self.path = path
        self.receive = receive
        self.send = send
        self.body = b""
        self.body_delivered = False
        self.attempt: Proceed | None = None
        self.start_message: Message | None = None
        self.chunks: list[bytes] = []
        self.buffered_bytes = 0
        self.streaming = False
        self.finished = False

    async def run(self) -> None:
        body = await self.read_body()
        if body is None:  # the client went away before sending its body: claim nothing
            return
        if isinstance(body, Respond):
            await self.send_stored(body.response)
            return
        self.body = body
        request = IdempotencyRequest(
            method=self.scope["method"],
            path=self.path,
            query_string=self.scope.get("query_string", b"").decode("latin-1"),
            headers=Headers.from_asgi(self.scope["headers"]),
            body=body,
            raw=self.scope,
        )
        if self.engine.store_blocks:
            decision = self.engine.prepare(request)
            if isinstance(decision, PendingClaim):
                decision = await self.store_call(self.engine.claim, decision)
        else:
            decision = self.engine.begin(request)  # no I/O: nothing to move off the loop
        if isinstance(decision, Respond):
            await self.send_stored(decision.response)
        elif isinstance(decision, PassThrough):
            await self.app(self.scope, self.receive_buffered, self.send)
        else:
            await self.run_app(decision)

    async def read_body(self) -> bytes | Respond | None:
        """The whole request body, counted while reading; a 413 decision past the limit."""
        limit = self.engine.config.max_request_body_bytes
        method, path = self.scope["method"], self.path
        for name, value in self.scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                return self.engine.body_too_large(method, path)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return self.engine.body_too_large(method, path)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def receive_buffered(self) -> Message:
        """The app's ``receive``: the buffered body once, then the server's own messages, so the
        app still learns of a disconnect.
        """
        if not self.body_delivered:
            self.body_delivered = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        return await self.receive()

    async def run_app(self, attempt: Proceed) -> None:
        self.attempt = attempt
        extensions = self.scope.get("extensions")
        scope = self.scope
        if extensions and any(name in extensions for name in _UNCAPTURABLE_EXTENSIONS):
            scope = dict(self.scope)
            scope["extensions"] = {
                name: value
                for name, value in extensions.items()
                if name not in _UNCAPTURABLE_EXTENSIONS
            }
        try:
            await self.app(scope, self.receive_buffered, self.capture)
        except BaseException:
            if not self.finished:
                with anyio.CancelScope(shield=True):
                    await self.store_call(self.engine.release, attempt)
            raise
        if not self.finished:  # the app returned without completing a response
            await self.store_call(self.engine.release, attempt)

    async def capture(self, message: Message) -> None:
        """The app's ``send``: hold the response until it is complete and persisted."""
        if self.streaming:
            await self.send(message)
            return
        assert self.attempt is not None
        if message["type"] == "http.response.start":
            self.start_message = message
            if not self.engine.stores(message["status"]):
                # Not stored (a 5xx by default): release now and let the response through.
                self.finished = self.streaming = True
                await self.store_call(self.engine.release, self.attempt, message["status"])
                await self.send(message)
            return
        if message["type"] != "http.response.body":
            await self.send(message)
            return
        chunk = message.get("body", b"")
        more_body = message.get("more_body", False)
        if not more_body and not self.chunks:
            body = chunk  # the whole body in one message, as most responses come
        else:
            self.chunks.append(chunk)
            self.buffered_bytes += len(chunk)
            if more_body and self.buffered_bytes <= self.engine.max_stored_response_bytes:
                return
            body = b"".join(self.chunks)
            self.chunks.clear()
        over_limit = len(body) > self.engine.max_stored_response_bytes
        response = self.captured_response(b"" if over_limit else body, body_omitted=over_limit)
        self.finished = True
        await self.store_call(self.engine.complete, self.attempt, response)
        assert self.start_message is not None
        await self.send(self.start_message)
        await self.send({"type": "http.response.body", "body": body, "more_body": more_body})
        self.streaming = more_body

    def captured_response(self, body: bytes, *, body_omitted: bool = False) -> StoredResponse:
        assert self.start_message is not None
        return StoredResponse(
            self.start_message["status"],
            tuple(
                [
                    (name.decode("latin-1"), value.decode("latin-1"))
                    for name, value in self.start_message.get("headers", ())
                ]
            ),
            body,
            body_omitted,
        )

    async def send_stored(self, response: StoredResponse) -> None:
        await self.send(
            {
                "type": "http.response.start",
                "status": response.status,
                "headers": [
                    (name.lower().encode("latin-1"), value.encode("latin-1"))
                    for name, value in response.headers
                ],
            }
        )
        await self.send({"type": "http.response.body", "body": response.body})

    async def store_call(self, function: Callable[..., T], *args: Any) -> T:
        """Run an engine step that may touch the store, off the event loop when it blocks."""
        if self.engine.store_blocks:
            limiter = self.middleware.store_limiter()
            return await anyio.to_thread.run_sync(function, *args, limiter=limiter)
        return function(*args)
