"""IdempotencyWSGIMiddleware: PEP 3333 middleware for Flask and any WSGI app.

A covered request's body is read before its key is claimed: exactly its ``CONTENT_LENGTH``
(enforced even when the server sets ``wsgi.input_terminated``, as gunicorn does, so an upload
cut short is ``400 request_body_incomplete`` and claims nothing), or to EOF when a terminated
input comes without one. With header keys, a request that carries no key passes through with
its body unread.

Responses: a list or tuple is produced already, so it is recorded, then returned whole. Any
other iterable (a generator: Flask's streamed and ``stream_with_context`` responses) is
forwarded chunk by chunk as the app yields it, keeping a copy up to the stored-size limit; the
record is completed when the iterable is exhausted, before the server ends the response, and a
chunk that completes a declared Content-Length waits for the record too, so a client never holds
a complete response that was not recorded. Retries while it streams get 409, later ones the
whole response. A stream the app breaks (an exception) releases the key; one the server stops
early (the client went away) is recorded without its body, so it never runs twice.

Routes marked ``@idempotent`` (Flask views) are found in the app's ``url_map`` on the first
request (or at :meth:`IdempotencyWSGIMiddleware.resolve_routes`); a handler running under a
claimed key finds an :class:`~idem_middleware.state.IdempotencyState` in
``environ["idem_middleware.idempotency"]``.
"""

from __future__ import annotations

import http
import io
from collections.abc import Callable, Generator, Iterable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any

from idem_middleware.config import IdempotencyConfig
from idem_middleware.engine import Conflict, IdempotencyEngine, PassThrough, Proceed, Respond
from idem_middleware.lease import LeaseKeeper, wait_for_answer
from idem_middleware.persistence.base import BasePersistenceLayer
from idem_middleware.request import Headers, IdempotencyRequest
from idem_middleware.responses import StoredResponse
from idem_middleware.route_table import RouteResolver
from idem_middleware.state import ENVIRON_KEY, IdempotencyState

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

ExcInfo = tuple[type[BaseException], BaseException, TracebackType] | tuple[None, None, None]
Write = Callable[[bytes], object]

_READ_CHUNK = 64 * 1024


class IdempotencyWSGIMiddleware:
    """Runs each covered request once per idempotency key and replays its response to retries.

    For Flask: ``app.wsgi_app = IdempotencyWSGIMiddleware(app.wsgi_app, persistence_layer=...)``.
    Requests the config does not cover pass straight through, unbuffered.
    """

    def __init__(
        self,
        app: WSGIApplication,
        *,
        persistence_layer: BasePersistenceLayer,
        config: IdempotencyConfig | None = None,
    ) -> None:
        self.app = app
        self.engine = IdempotencyEngine(persistence_layer, config)
        #: The engines of ``@idempotent`` routes, found in the app's routes on the first
        #: request (or at :meth:`resolve_routes`).
        self.routes = RouteResolver(app, self.engine)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if ENVIRON_KEY in environ:
            # An outer IdempotencyWSGIMiddleware holds this request's key already (the
            # middleware added twice): claiming it again would answer with its own 409.
            return self.app(environ, start_response)
        method = environ["REQUEST_METHOD"]
        path = _request_path(environ)
        engine: IdempotencyEngine | None = self.engine
        table = self.routes.table
        if table is not None:  # some route is decorated: one regex match says which engine
            engine = table.engine_for(method, path)
        if engine is None or not engine.covers(method, path):
            return self.app(environ, start_response)
        return WSGIExchange(engine, self.app, environ, start_response, path).run()

    def resolve_routes(self) -> None:
        """Read the app's routes and check their ``@idempotent`` options now, rather than on the
        first request: call it once the routes are registered (an app factory's end).

        Raises :class:`ValueError` (or :class:`TypeError`) naming the route and the field.
        """
        self.routes.resolve()


class WSGIExchange:
    """The state of one covered request: its buffered body, its lease and the captured response."""

    def __init__(
        self,
        engine: IdempotencyEngine,
        app: WSGIApplication,
        environ: WSGIEnvironment,
        start_response: StartResponse,
        path: str,
    ) -> None:
        self.engine = engine
        self.app = app
        self.environ = environ
        self.start_response = start_response
        self.method: str = environ["REQUEST_METHOD"]
        self.path = path
        self.attempt: Proceed | None = None
        self.keeper: LeaseKeeper | None = None
        self.status_line: str | None = None
        self.headers: list[tuple[str, str]] = []
        self.declared_length: int | None = None
        self.copy = engine.sizes.response_copy()  # the body the app produced, for the record
        self.pending: list[bytes] = []  # produced, not yet sent: they wait for the record
        self.server_write: Write | None = None  # set once the response streams
        self.passing = False  # a status that is not stored: the key is released, bytes pass
        self.finished = False  # completed or released: nothing more to do with the key
        self.iterable: Iterable[bytes] | None = None
        self.closed = False

    def run(self) -> Iterable[bytes]:
        headers = Headers(list(_request_headers(self.environ)))
        early = self.engine.decide_before_body(self.method, self.path, headers)
        if isinstance(early, Respond):
            return self.send_stored(early.response)
        if early is not None:
            return self.app(self.environ, self.start_response)
        body = self.read_body()
        if isinstance(body, Respond):
            return self.send_stored(body.response)
        self.environ["wsgi.input"] = io.BytesIO(body)
        self.environ["CONTENT_LENGTH"] = str(len(body))
        request = IdempotencyRequest(
            method=self.method,
            path=_decoded(self.environ.get("SCRIPT_NAME", "")).rstrip("/") + self.path,
            query_string=self.environ.get("QUERY_STRING", ""),
            headers=headers,
            body=body,
            raw=self.environ,
        )
        decision = self.engine.begin(request)
        if isinstance(decision, Conflict):  # conflict_wait_seconds: wait for the answer
            decision = wait_for_answer(self.engine, decision)
        if isinstance(decision, Respond):
            return self.send_stored(decision.response)
        if isinstance(decision, PassThrough):
            return self.app(self.environ, self.start_response)
        return self.run_app(decision)

    def read_body(self) -> bytes | Respond:
        """Exactly CONTENT_LENGTH bytes, or to EOF when ``wsgi.input_terminated`` and no length
        was given; a refusal when the body is over the limit or ends early.
        """
        sizes = self.engine.sizes
        stream = self.environ["wsgi.input"]
        declared = self.environ.get("CONTENT_LENGTH")
        expected: int | None
        try:
            expected = max(0, int(declared)) if declared else None
        except ValueError:
            expected = None
        if expected is None and not self.environ.get("wsgi.input_terminated"):
            expected = 0  # PEP 3333: without a length, an unterminated input must not be read
        if expected is not None and sizes.request_body_too_large(expected):
            return self.engine.body_too_large(self.method, self.path)
        chunks: list[bytes] = []
        size = 0
        try:
            while expected is None or size < expected:
                wanted = _READ_CHUNK if expected is None else min(_READ_CHUNK, expected - size)
                chunk = stream.read(wanted)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if sizes.request_body_too_large(size):
                    return self.engine.body_too_large(self.method, self.path)
        except (OSError, ValueError):
            return self.engine.body_incomplete(self.method, self.path)
        if expected is not None and size < expected:
            return self.engine.body_incomplete(self.method, self.path)
        return b"".join(chunks)

    # The response ---------------------------------------------------------------------------

    def run_app(self, attempt: Proceed) -> Iterable[bytes]:
        self.attempt = attempt
        # The handler's view of its request (flask.g.idempotency with the Flask extension).
        self.environ[ENVIRON_KEY] = IdempotencyState(attempt.lease.idempotency_key)
        self.keeper = LeaseKeeper(self.engine, attempt).start()
        try:
            iterable = self.iterable = self.app(self.environ, self.capture_start_response)
            # A list is produced already: streaming it would gain nothing.
            streamable = not isinstance(iterable, list | tuple)
            iterator = iter(iterable)
            for chunk in iterator:
                if self.server_write is not None:  # write() started the stream
                    first = [chunk] if self.passing else self.route(chunk)
                else:
                    self.copy.add(chunk)
                    if not streamable or self.must_wait():
                        self.pending.append(chunk)
                        continue
                    self.start_streaming()
                    # What write() buffered comes first; none of it completes the length.
                    first, self.pending = [*self.pending, chunk], []
                return StreamedResponse(self, self.stream(first, iterator))
            self.close_app()
            if self.status_line is None:
                raise RuntimeError("the WSGI application returned without calling start_response")
        except BaseException:
            try:
                self.close_app()
            finally:
                self.fail()
            raise
        self.complete()
        if self.server_write is None:
            self.start_response(self.status_line, self.headers)
        return self.pending

    def stream(self, first: list[bytes], iterator: Iterator[bytes]) -> Generator[bytes, None, None]:
        """The rest of a streamed response: each chunk as the app yields it, then the record,
        then what waited for it.
        """
        try:
            yield from first
            for chunk in iterator:
                if self.passing:
                    yield chunk
                else:
                    yield from self.route(chunk)
            self.complete()
            held, self.pending = self.pending, []
            yield from held
        except GeneratorExit:  # the server stopped reading: the client went away
            self.abandon()
            raise
        except BaseException:
            self.fail()
            raise
        finally:
            self.close_app()

    def capture_start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None
    ) -> Write:
        if self.server_write is not None:
            # Headers already went to the server; it decides (PEP 3333: re-raise exc_info).
            return self.start_response(status, headers, exc_info)
        self.status_line = status
        self.headers = headers
        self.declared_length = _content_length(headers)
        return self.write

    def write(self, chunk: bytes) -> None:
        """The app's ``write()``: buffered like the iterable's output; past the stored-size limit
        the response streams, as a legacy app that writes a large body expects.
        """
        if self.server_write is not None:
            for sent in [chunk] if self.passing else self.route(chunk):
                self.server_write(sent)
            return
        if self.status_line is None:
            raise RuntimeError("the WSGI application sent body data before start_response")
        self.copy.add(chunk)
        self.pending.append(chunk)
        if not self.engine.sizes.stores_body(self.copy.size) and not self.must_wait():
            self.start_streaming()
            assert self.server_write is not None
            written, self.pending = self.pending, []
            self.server_write(b"".join(written))

    def must_wait(self) -> bool:
        """Whether the client would hold the whole response once sent what was produced."""
        return self.declared_length is not None and self.copy.size >= self.declared_length

    def route(self, chunk: bytes) -> list[bytes]:
        """While streaming: what of ``chunk`` may go to the client now (nothing once the
        declared length is reached: that waits for the record).
        """
        self.copy.add(chunk)
        if self.pending or self.must_wait():
            self.pending.append(chunk)
            return []
        return [chunk]

    def start_streaming(self) -> None:
        assert self.attempt is not None
        if self.status_line is None:
            raise RuntimeError("the WSGI application sent body data before start_response")
        status = _status_code(self.status_line)
        if not self.engine.stores(status):
            # Not stored (a 5xx by default): release now and let the response through.
            self.finished = self.passing = True
            self.copy.give_up()
            self.stop_keeper()
            self.engine.release(self.attempt, status)
        self.server_write = self.start_response(self.status_line, self.headers)

    def stop_keeper(self) -> None:
        """Stop, then complete or release: the write goes under the last renewed lease."""
        if self.keeper is not None:
            self.keeper.stop()

    def complete(self) -> None:
        """Record the response (the engine releases a status that is not stored)."""
        if not self.finished:
            assert self.attempt is not None
            self.finished = True
            self.stop_keeper()
            self.engine.complete(self.attempt, self.captured_response())

    def abandon(self) -> None:
        """The server stopped the response early: record it without its body, never release."""
        if not self.finished:
            self.copy.give_up()
            self.complete()

    def fail(self) -> None:
        """The app failed: release the key so that a retry runs it again."""
        if not self.finished:
            assert self.attempt is not None
            self.finished = True
            self.stop_keeper()
            self.engine.release(self.attempt)

    def close_app(self) -> None:
        if self.iterable is not None and not self.closed:
            self.closed = True
            _close(self.iterable)

    def captured_response(self) -> StoredResponse:
        assert self.status_line is not None
        code, _, reason = self.status_line.partition(" ")
        body = self.copy.body
        return StoredResponse(
            status=int(code),
            headers=tuple(self.headers),
            body=b"" if body is None else body,
            body_omitted=body is None,
            reason=reason or None,
        )

    def send_stored(self, response: StoredResponse) -> list[bytes]:
        self.start_response(_status_line(response), list(response.headers))
        return [response.body]


class StreamedResponse:
    """What the server iterates for a streamed response. Closing it before the end (the client
    went away, or the server never iterated it) records the response without its body, and
    always closes the app's iterable.
    """

    def __init__(self, exchange: WSGIExchange, chunks: Generator[bytes, None, None]) -> None:
        self.exchange = exchange
        self.chunks = chunks

    def __iter__(self) -> Iterator[bytes]:
        return self.chunks

    def close(self) -> None:
        try:
            self.chunks.close()
        finally:
            try:
                self.exchange.abandon()
            finally:
                self.exchange.close_app()


def _close(iterable: Iterable[bytes]) -> None:
    close: Any = getattr(iterable, "close", None)
    if close is not None:
        close()


def _status_code(status_line: str) -> int:
    return int(status_line.split(" ", 1)[0])


def _content_length(headers: list[tuple[str, str]]) -> int | None:
    for name, value in headers:
        if name.lower() == "content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _status_line(response: StoredResponse) -> str:
    if response.reason is not None:
        return f"{response.status} {response.reason}"
    try:
        return f"{response.status} {http.HTTPStatus(response.status).phrase}"
    except ValueError:
        return f"{response.status} Unknown"


def _request_path(environ: WSGIEnvironment) -> str:
    """The path the app routes on (``SCRIPT_NAME``, the mount point, excluded)."""
    return _decoded(environ.get("PATH_INFO", "") or "/")


def _decoded(path: str) -> str:
    # PEP 3333 hands paths over as latin-1-decoded bytes; recover the UTF-8 path.
    return path.encode("latin-1").decode("utf-8", "replace")


def _request_headers(environ: WSGIEnvironment) -> Iterator[tuple[str, str]]:
    for name, value in environ.items():
        if name.startswith("HTTP_"):
            yield name[5:].replace("_", "-").lower(), value
        elif name in ("CONTENT_TYPE", "CONTENT_LENGTH") and value:
            yield name.replace("_", "-").lower(), value
