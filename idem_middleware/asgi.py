"""IdempotencyMiddleware: pure ASGI middleware for FastAPI, Starlette and any ASGI app.

A covered request's body is read before its key is claimed; with header keys, a request that
carries no key passes through with its body unread.

Responses: a body sent in one message (as most are) is recorded, then sent. A streamed body
(``StreamingResponse``: server-sent events, token streams, exports) goes out message by message
as the app sends it, keeping a copy up to the stored-size limit; only the message that completes
the response (and a chunk that completes a declared Content-Length) waits until the record is
completed, so a client never holds a complete response that was not recorded. Retries while it
streams get 409, later ones the whole stream. An app that raises releases the key; once it has
started a response that is stored, a client that goes away never does: the record keeps status
and headers (``Idempotent-Body-Omitted``), so the handler never runs twice.

At lifespan startup the persistence layer is checked (``check()``); a store it cannot use fails
the server's startup with a message naming the problem. So do invalid ``@idempotent`` options:
the app's routes are read then (or on the first request, without a lifespan), and each request
of an app with decorated routes is resolved to its route's engine with one regex match.

A handler running under a claimed key finds an :class:`~idem_middleware.state.IdempotencyState`
in ``request.state.idempotency`` (``scope["state"]["idempotency"]``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from anyio.lowlevel import RunVar

from idem_middleware.config import IdempotencyConfig
from idem_middleware.engine import (
    Conflict,
    IdempotencyEngine,
    PassThrough,
    PendingClaim,
    Proceed,
    Respond,
)
from idem_middleware.lease import AsyncLeaseKeeper, wait_for_answer_async
from idem_middleware.persistence.base import BasePersistenceLayer
from idem_middleware.persistence.steps import StoreStep
from idem_middleware.request import Headers, IdempotencyRequest
from idem_middleware.responses import StoredResponse
from idem_middleware.route_table import RouteResolver
from idem_middleware.state import STATE_NAME, IdempotencyState

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

T = TypeVar("T")

logger = logging.getLogger("idem_middleware")

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
    cover (other methods, excluded paths, websockets) pass straight through, unbuffered.
    """

    #: A store that blocks (DynamoDB, SQLite, Redis) is called from worker threads, at most this
    #: many claims at once per event loop, and as many completions and releases in a lane of
    #: their own (a finished request never waits behind new claims). More threads add no
    #: throughput - they take turns at the GIL, and the event loop queues behind them
    #: (BENCHMARKS.md: the p99 of an uncovered request under load) - and would take anyio's
    #: shared pool from the app's sync endpoints. ``None``: the persistence layer's own
    #: ``max_store_threads`` when it has one (DynamoDB's, whose calls are CPU-heavy), else 8.
    max_store_threads: int | None = None

    def __init__(
        self,
        app: ASGIApp,
        *,
        persistence_layer: BasePersistenceLayer,
        config: IdempotencyConfig | None = None,
    ) -> None:
        self.app = app
        self.engine = IdempotencyEngine(persistence_layer, config)
        #: The engines of ``@idempotent`` routes, found in the app's routes at startup.
        self.routes = RouteResolver(app, self.engine)
        # Limiters per event loop, as anyio keeps its own default thread limiter.
        self._store_limiter: RunVar[anyio.CapacityLimiter] = RunVar(f"store-limiter-{id(self)}")
        self._finish_limiter: RunVar[anyio.CapacityLimiter] = RunVar(f"finish-limiter-{id(self)}")

    def store_limiter(self) -> anyio.CapacityLimiter:
        """The limiter of this middleware's claims in the running event loop."""
        return self._limiter(self._store_limiter)

    def finish_limiter(self) -> anyio.CapacityLimiter:
        """The limiter of this middleware's completions and releases in the running event loop."""
        return self._limiter(self._finish_limiter)

    def store_threads(self) -> int:
        """The size of each lane: ``max_store_threads``, else the layer's hint, else 8."""
        if self.max_store_threads is not None:
            return self.max_store_threads
        hint = getattr(self.engine.persistence_layer, "max_store_threads", None)
        return hint if isinstance(hint, int) and hint > 0 else 8

    def _limiter(self, var: RunVar[anyio.CapacityLimiter]) -> anyio.CapacityLimiter:
        try:
            return var.get()
        except LookupError:
            limiter = anyio.CapacityLimiter(self.store_threads())
            var.set(limiter)
            return limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await LifespanCheck(self, receive, send).run(scope)
            else:
                await self.app(scope, receive, send)
            return
        state = scope.get("state")
        if state is not None and STATE_NAME in state:
            # An outer IdempotencyMiddleware holds this request's key already (the middleware
            # added twice): claiming it again would answer the request with its own 409.
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        engine: IdempotencyEngine | None = self.engine
        table = self.routes.table
        if table is not None:  # some route is decorated: one regex match says which engine
            engine = table.engine_for(scope["method"], path)
        if engine is None or not engine.covers(scope["method"], path):
            await self.app(scope, receive, send)
            return
        await IdempotentExchange(self, scope, receive, send, path, engine).run()

    def resolve_routes(self) -> None:
        """Read the app's routes and check their ``@idempotent`` options now (the lifespan
        startup does; without a lifespan, the first request would).

        Raises :class:`ValueError` (or :class:`TypeError`) naming the route and the field.
        """
        self.routes.resolve()

    def routes_error(self) -> ValueError | TypeError | None:
        """What is wrong with the ``@idempotent`` options of the app's routes, or ``None``."""
        try:
            self.resolve_routes()
        except (ValueError, TypeError) as exc:
            return exc
        return None

    async def store_problem(self) -> str | None:
        """Why the persistence layer cannot serve requests, or ``None`` when it can."""
        layer = self.engine.persistence_layer
        try:
            if self.engine.store_blocks:
                await anyio.to_thread.run_sync(layer.check)
            else:
                layer.check()
        except Exception as exc:  # any failure, not only the documented one, fails startup
            return f"idempotency store unusable ({type(layer).__name__}): {exc}"
        return None

    async def close_store(self) -> None:
        """Close what the persistence layer opened on this event loop. A store that fails to
        close is logged: the app's shutdown has run, and the server stops either way.
        """
        layer = self.engine.persistence_layer
        try:
            await layer.aclose()
        except Exception:
            logger.warning("closing the idempotency store failed", exc_info=True)


class LifespanCheck:
    """The app's lifespan, with the store checked once the app's own startup is complete (it
    may have created the table). A store that cannot be used fails the server's startup with a
    message naming the problem, rather than every request answering 503; the app is shut down
    first, so it releases what its startup acquired. Under ``on_store_error="passthrough"`` the
    app is meant to run without its store: the problem is logged and startup goes on.
    """

    def __init__(self, middleware: IdempotencyMiddleware, receive: Receive, send: Send) -> None:
        self.middleware = middleware
        self.server_receive = receive
        self.server_send = send
        self.problem: str | None = None
        self.reported = False
        self.error: Exception | None = None  # invalid per-route options, raised at the end

    async def run(self, scope: Scope) -> None:
        await self.middleware.app(scope, self.receive, self.send)
        if self.problem is not None and not self.reported:  # the app ended without shutting down
            await self.report()
        if self.error is not None:
            # Raised after the report, as Starlette's own lifespan does: a server has already
            # heard, and Starlette's TestClient raises it from ``with TestClient(app)``.
            raise self.error

    async def receive(self) -> Message:
        if self.problem is not None:
            return {"type": "lifespan.shutdown"}
        return await self.server_receive()

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "lifespan.startup.complete":
            # Per-route options are checked once the app's startup has run (it may add routes).
            self.error = self.middleware.routes_error()
            if self.error is not None:
                self.problem = f"invalid per-route idempotency options: {self.error}"
                return  # the app shuts down first (its next receive), then the server hears
            problem = await self.middleware.store_problem()
            if problem is not None:
                if self.middleware.engine.config.on_store_error == "passthrough":
                    logger.warning("%s; requests run un-deduplicated until it is fixed", problem)
                else:
                    self.problem = problem
                    return  # the app shuts down first (its next receive), then the server hears
        elif self.problem is not None and kind.startswith("lifespan.shutdown."):
            await self.middleware.close_store()
            await self.report()
            return
        elif kind.startswith("lifespan.shutdown."):
            await self.middleware.close_store()
        await self.server_send(message)

    async def report(self) -> None:
        self.reported = True
        assert self.problem is not None
        await self.server_send({"type": "lifespan.startup.failed", "message": self.problem})


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


def full_path(scope: Scope, route: str) -> str:
    """The route path with the app's mount point (``root_path``) before it: what names the
    operation in keys and fingerprints, so two mounted apps sharing a store never answer for
    each other (``/v1/orders`` and ``/v2/orders``).
    """
    root_path: str = scope.get("root_path", "")
    return root_path.rstrip("/") + route if root_path else route


class IdempotentExchange:
    """The state of one covered request: its buffered body, its lease and the captured response."""

    def __init__(
        self,
        middleware: IdempotencyMiddleware,
        scope: Scope,
        receive: Receive,
        send: Send,
        path: str,
        engine: IdempotencyEngine,
    ) -> None:
        self.middleware = middleware
        self.engine = engine
        self.app = middleware.app
        self.scope = scope
        self.path = path
        self.receive = receive
        self.send = send
        self.body = b""
        self.body_delivered = False
        self.attempt: Proceed | None = None
        self.keeper: AsyncLeaseKeeper | None = None
        self.start_message: Message | None = None
        self.copy = self.engine.sizes.response_copy()  # the body the app sent, for the record
        self.held: list[bytes] = []  # body the client must not get before the record
        self.declared_length: int | None = None
        self.sending = False  # the start message went out: the body streams
        self.passing = False  # a status that is not stored: released, messages pass untouched
        self.finished = False  # completed or released: nothing more to do with the key
        self.send_failed = False  # the server could not send to the client: it went away

    async def run(self) -> None:
        headers = Headers.from_asgi(self.scope["headers"])
        early = self.engine.decide_before_body(self.scope["method"], self.path, headers)
        if early is not None:
            if isinstance(early, Respond):
                await self.send_stored(early.response)
            else:  # no key: the app reads its own body, unbuffered
                await self.app(self.scope, self.receive, self.send)
            return
        body = await self.read_body()
        if body is None:  # the client went away before sending its body: claim nothing
            return
        if isinstance(body, Respond):
            await self.send_stored(body.response)
            return
        self.body = body
        request = IdempotencyRequest(
            method=self.scope["method"],
            path=full_path(self.scope, self.path),
            query_string=self.scope.get("query_string", b"").decode("latin-1"),
            headers=headers,
            body=body,
            raw=self.scope,
        )
        if self.engine.store_blocks:
            decision = self.engine.prepare(request)
            if isinstance(decision, PendingClaim):
                decision = await self.store_call(self.engine.claim, decision)
        else:
            decision = self.engine.begin(request)  # no I/O: nothing to move off the loop
        if isinstance(decision, Conflict):  # conflict_wait_seconds: wait for the answer
            decision = await wait_for_answer_async(
                self.engine, decision, store_call=self.store_call
            )
        if isinstance(decision, Respond):
            await self.send_stored(decision.response)
        elif isinstance(decision, PassThrough):
            await self.app(self.scope, self.receive_buffered, self.send)
        else:
            await self.run_app(decision)

    async def read_body(self) -> bytes | Respond | None:
        """The whole request body, counted while reading; a 413 decision past the limit."""
        sizes = self.engine.sizes
        method, path = self.scope["method"], self.path
        for name, value in self.scope["headers"]:
            if (
                name == b"content-length"
                and value.isdigit()
                and sizes.request_body_too_large(int(value))
            ):
                return self.engine.body_too_large(method, path)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if sizes.request_body_too_large(size):
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
        # The handler's view of its request: request.state.idempotency (Starlette, FastAPI).
        self.scope.setdefault("state", {})[STATE_NAME] = IdempotencyState(
            attempt.lease.idempotency_key
        )
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
            self.keeper = AsyncLeaseKeeper(self.engine, attempt, store_call=self.finish_lane)
            async with self.keeper:
                await self.app(scope, self.receive_buffered, self.capture)
        except BaseException:
            if not self.finished:
                with anyio.CancelScope(shield=True):
                    # An app that raises releases, unless what it raised came from a send to a
                    # client that went away (ASGI 2.4; Starlette raises ClientDisconnect).
                    await self.unfinished(attempt, cut_short=self.send_failed)
            raise
        finally:
            # The keeper holds self.finish_lane: a reference cycle that only the garbage
            # collector would free, and every request that leaves one makes it run more often.
            self.keeper = None
        if not self.finished:
            # The app returned mid-response: a client that went away stopped it (Starlette's
            # StreamingResponse listens for http.disconnect).
            await self.unfinished(attempt, cut_short=True)

    async def unfinished(self, attempt: Proceed, *, cut_short: bool) -> None:
        """The app stopped before its response was complete. Once it started a response that is
        stored, a client's hang-up never frees the key: the record keeps status and headers.
        An app that failed (or sent no response) releases it, so a retry runs again.
        """
        self.finished = True
        if cut_short and self.start_message is not None:
            response = self.captured_response(b"", body_omitted=True)
            await self.finish_call(self.engine.complete, attempt, response)
        else:
            await self.finish_call(self.engine.release, attempt)

    async def capture(self, message: Message) -> None:
        """The app's ``send``: the body goes out as the app sends it, but the message that
        completes the response waits until the record is completed.
        """
        if self.passing:
            await self.send(message)
            return
        assert self.attempt is not None
        kind = message["type"]
        if kind == "http.response.start":
            self.start_message = message
            status = message["status"]
            if not self.engine.stores(status):
                # Not stored (a 5xx by default): release now and let the response through.
                self.finished = self.passing = True
                await self.finish_call(self.engine.release, self.attempt, status)
                await self.send(message)
            return
        if kind != "http.response.body":
            await self.send(message)
            return
        chunk = message.get("body", b"")
        if not message.get("more_body", False):
            if self.sending or self.copy.size:
                await self.complete_stream(chunk)
                return
            # The whole body in one message, as most responses come: inline, it is the hot path.
            assert self.start_message is not None
            over_limit = not self.engine.sizes.stores_body(len(chunk))
            response = self.captured_response(b"" if over_limit else chunk, body_omitted=over_limit)
            self.finished = True
            await self.finish_call(self.engine.complete, self.attempt, response)
            await self.send(self.start_message)
            await self.send(message)
            return
        if not self.sending and not self.copy.size:  # the first chunk of a stream
            self.declared_length = _declared_length(self.start_message)
        self.copy.add(chunk)
        if self.held or (
            self.declared_length is not None and self.copy.size >= self.declared_length
        ):
            self.held.append(chunk)  # the client would hold the whole response: not yet
            return
        await self.forward(message)

    async def complete_stream(self, chunk: bytes) -> None:
        assert self.attempt is not None
        self.copy.add(chunk)
        kept = self.copy.body
        response = self.captured_response(b"" if kept is None else kept, body_omitted=kept is None)
        self.finished = True
        await self.finish_call(self.engine.complete, self.attempt, response)
        body = b"".join([*self.held, chunk]) if self.held else chunk
        self.held.clear()
        await self.forward({"type": "http.response.body", "body": body, "more_body": False})

    async def forward(self, message: Message) -> None:
        try:
            if not self.sending:
                assert self.start_message is not None
                self.sending = True
                await self.send(self.start_message)
            await self.send(message)
        except OSError:  # ASGI 2.4: the client went away
            self.send_failed = True
            raise

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
        """Run a claim: on the event loop through the layer's native async path when it has
        one, else off the loop when the store blocks.
        """
        if self.engine.store_async and isinstance(function, StoreStep):
            result: T = await function.native(*args)
            return result
        if self.engine.store_blocks:
            limiter = self.middleware.store_limiter()
            return await anyio.to_thread.run_sync(function, *args, limiter=limiter)
        return function(*args)

    async def finish_call(self, function: Callable[..., None], *args: Any) -> None:
        """Run a completion or a release, after the lease keeper has stopped (so it writes under
        the last renewed lease), off the event loop when the store blocks, in a lane of their
        own: a request that is done never queues behind new claims for a store thread.
        """
        if self.keeper is not None:
            await self.keeper.stop()
        await self.finish_lane(function, *args)

    async def finish_lane(self, function: Callable[..., T], *args: Any) -> T:
        """Run a store call of a request in flight (completion, release, lease renewal)."""
        if self.engine.store_async and isinstance(function, StoreStep):
            # Shielded, as a worker thread's call is never cut short: a completion cancelled
            # halfway would leave a handler that ran with its record still in progress.
            with anyio.CancelScope(shield=True):
                result: T = await function.native(*args)
            return result
        if self.engine.store_blocks:
            limiter = self.middleware.finish_limiter()
            return await anyio.to_thread.run_sync(function, *args, limiter=limiter)
        return function(*args)


def _declared_length(start_message: Message | None) -> int | None:
    """The Content-Length the app declared: once sent that much, the client holds it all."""
    for name, value in start_message.get("headers", ()) if start_message else ():
        if name.lower() == b"content-length":
            return int(value) if value.isdigit() else None
    return None
