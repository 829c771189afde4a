"""IdempotencyWSGIMiddleware: PEP 3333 middleware for Flask and any WSGI app."""

from __future__ import annotations

import http
import io
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any

from idem_middleware.config import IdempotencyConfig
from idem_middleware.engine import IdempotencyEngine, PassThrough, Proceed, Respond
from idem_middleware.persistence.base import BasePersistenceLayer
from idem_middleware.request import Headers, IdempotencyRequest
from idem_middleware.responses import StoredResponse

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

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        method = environ["REQUEST_METHOD"]
        path = _request_path(environ)
        if not self.engine.covers(method, path):
            return self.app(environ, start_response)
        return WSGIExchange(self.engine, self.app, environ, start_response, path).run()


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
        self.status_line: str | None = None
        self.headers: list[tuple[str, str]] = []
        self.chunks: list[bytes] = []
        self.buffered_bytes = 0
        self.server_write: Write | None = None  # set once the response streams through
        self.finished = False

    def run(self) -> Iterable[bytes]:
        body = self.read_body()
        if isinstance(body, Respond):
            return self.send_stored(body.response)
        self.environ["wsgi.input"] = io.BytesIO(body)
        self.environ["CONTENT_LENGTH"] = str(len(body))
        request = IdempotencyRequest(
            method=self.method,
            path=self.path,
            query_string=self.environ.get("QUERY_STRING", ""),
            headers=Headers(list(_request_headers(self.environ))),
            body=body,
            raw=self.environ,
        )
        decision = self.engine.begin(request)
        if isinstance(decision, Respond):
            return self.send_stored(decision.response)
        if isinstance(decision, PassThrough):
            return self.app(self.environ, self.start_response)
        return self.run_app(decision)

    def read_body(self) -> bytes | Respond:
        """Exactly CONTENT_LENGTH bytes (to EOF when ``wsgi.input_terminated``), or a refusal."""
        limit = self.engine.config.max_request_body_bytes
        stream = self.environ["wsgi.input"]
        if self.environ.get("wsgi.input_terminated"):
            expected = None
        else:
            try:
                expected = max(0, int(self.environ.get("CONTENT_LENGTH") or 0))
            except ValueError:
                expected = 0
            if expected > limit:
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
                if size > limit:
                    return self.engine.body_too_large(self.method, self.path)
        except (OSError, ValueError):
            return self.engine.body_incomplete(self.method, self.path)
        if expected is not None and size < expected:
            return self.engine.body_incomplete(self.method, self.path)
        return b"".join(chunks)

    def run_app(self, attempt: Proceed) -> Iterable[bytes]:
        self.attempt = attempt
        try:
            iterable = self.app(self.environ, self.capture_start_response)
            iterator = iter(iterable)
            try:
                while self.server_write is None:
                    chunk = next(iterator, None)
                    if chunk is None:
                        break
                    self.write(chunk)
            except BaseException:
                _close(iterable)
                raise
            if self.server_write is not None:
                return self.stream_rest(iterable, iterator)
            _close(iterable)
            if self.status_line is None:
                raise RuntimeError("the WSGI application returned without calling start_response")
        except BaseException:
            if not self.finished:
                self.finished = True
                self.engine.release(attempt)
            raise
        self.finished = True
        response = self.captured_response()
        self.engine.complete(attempt, response)
        self.start_response(self.status_line, self.headers)
        return [response.body]

    def capture_start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None
    ) -> Write:
        if self.server_write is not None:
            # Headers already went to the server; it decides (PEP 3333: re-raise exc_info).
            return self.start_response(status, headers, exc_info)
        self.status_line = status
        self.headers = headers
        return self.write

    def write(self, chunk: bytes) -> None:
        """Buffer the app's output; past the stored-size limit, persist status and headers and
        let the rest stream through.
        """
        if self.server_write is not None:
            self.server_write(chunk)
            return
        self.chunks.append(chunk)
        self.buffered_bytes += len(chunk)
        if self.buffered_bytes > self.engine.max_stored_response_bytes:
            self.start_streaming()

    def start_streaming(self) -> None:
        assert self.attempt is not None
        if self.status_line is None:
            raise RuntimeError("the WSGI application sent body data before start_response")
        self.finished = True
        self.engine.complete(self.attempt, self.captured_response().without_body())
        self.server_write = self.start_response(self.status_line, self.headers)
        self.server_write(b"".join(self.chunks))
        self.chunks.clear()

    def stream_rest(self, iterable: Iterable[bytes], iterator: Iterator[bytes]) -> Iterator[bytes]:
        try:
            yield from iterator
        finally:
            _close(iterable)

    def captured_response(self) -> StoredResponse:
        assert self.status_line is not None
        return StoredResponse(
            status=int(self.status_line.split(" ", 1)[0]),
            headers=tuple(self.headers),
            body=b"".join(self.chunks),
        )

    def send_stored(self, response: StoredResponse) -> list[bytes]:
        self.start_response(_status_line(response.status), list(response.headers))
        return [response.body]


def _close(iterable: Iterable[bytes]) -> None:
    close: Any = getattr(iterable, "close", None)
    if close is not None:
        close()


def _status_line(status: int) -> str:
    try:
        return f"{status} {http.HTTPStatus(status).phrase}"
    except ValueError:
        return f"{status} Unknown"


def _request_path(environ: WSGIEnvironment) -> str:
    # PEP 3333 hands PATH_INFO over as latin-1-decoded bytes; recover the UTF-8 path.
    path: str = environ.get("PATH_INFO", "") or "/"
    return path.encode("latin-1").decode("utf-8", "replace")


def _request_headers(environ: WSGIEnvironment) -> Iterator[tuple[str, str]]:
    for name, value in environ.items():
        if name.startswith("HTTP_"):
            yield name[5:].replace("_", "-").lower(), value
        elif name in ("CONTENT_TYPE", "CONTENT_LENGTH") and value:
            yield name.replace("_", "-").lower(), value
