"""What only the WSGI adapter does: reading wsgi.input, capturing start_response, write() and
close(), per PEP 3333.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import pytest

from idem_middleware import IdempotencyConfig, IdempotencyWSGIMiddleware
from idem_middleware.persistence import InMemoryPersistenceLayer
from idem_middleware.persistence.record import STATUS_COMPLETED, STATUS_INPROGRESS
from tests.support.wsgi import WSGIServer, environ


class ClosingIterable:
    def __init__(self, chunks: list[bytes], fail_at: int | None = None) -> None:
        self.chunks = chunks
        self.fail_at = fail_at
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        for index, chunk in enumerate(self.chunks):
            if index == self.fail_at:
                raise RuntimeError("iteration failed")
            yield chunk

    def close(self) -> None:
        self.closed = True


def echo_app(seen: list[dict[str, Any]]) -> Any:
    def app(env: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        body = env["wsgi.input"].read()
        seen.append({"body": body, "content_length": env["CONTENT_LENGTH"]})
        start_response(
            "201 Created", [("Content-Type", "text/plain"), ("X-Dup", "1"), ("X-Dup", "2")]
        )
        return [b"got:", body]

    return app


def middleware(app: Any, **config: Any) -> IdempotencyWSGIMiddleware:
    layer = config.pop("layer", None)
    if layer is None:
        layer = InMemoryPersistenceLayer()
    return IdempotencyWSGIMiddleware(
        app, persistence_layer=layer, config=IdempotencyConfig(**config)
    )


def test_reads_exactly_content_length_and_hands_the_app_a_fresh_stream() -> None:
    seen: list[dict[str, Any]] = []
    wrapped = middleware(echo_app(seen))
    stream = io.BytesIO(b"abcEXTRA")
    env = environ(content_length=3, **{"wsgi.input": stream})
    body = WSGIServer().call(wrapped, env)
    assert body == b"got:abc"
    assert seen == [{"body": b"abc", "content_length": "3"}]
    assert stream.read() == b"EXTRA"  # nothing past Content-Length was consumed


def test_input_terminated_is_read_to_eof() -> None:
    seen: list[dict[str, Any]] = []
    wrapped = middleware(echo_app(seen))
    env = environ(b"chunked-body", **{"wsgi.input_terminated": True})
    del env["CONTENT_LENGTH"]
    assert WSGIServer().call(wrapped, env) == b"got:chunked-body"
    assert seen[0]["content_length"] == str(len(b"chunked-body"))


def test_body_shorter_than_content_length_is_400_and_claims_nothing() -> None:
    layer = InMemoryPersistenceLayer()
    seen: list[dict[str, Any]] = []
    wrapped = middleware(echo_app(seen), layer=layer)
    server = WSGIServer()
    body = server.call(wrapped, environ(b"abc", content_length=10))
    assert server.status is not None
    assert server.status.startswith("400")
    assert b"request_body_incomplete" in body
    assert seen == []
    assert layer._records == {}


def test_declared_length_over_the_limit_is_413_without_reading() -> None:
    stream = io.BytesIO(b"x" * 50)
    server = WSGIServer()
    server.call(
        middleware(echo_app([]), max_request_body_bytes=10),
        environ(content_length=50, **{"wsgi.input": stream}),
    )
    assert server.status is not None
    assert server.status.startswith("413")
    assert stream.tell() == 0


def test_replay_keeps_duplicate_headers_and_recomputes_content_length() -> None:
    wrapped = middleware(echo_app([]))
    WSGIServer().call(wrapped, environ(b"abc"))
    server = WSGIServer()
    body = server.call(wrapped, environ(b"abc"))
    assert body == b"got:abc"
    assert server.status == "201 Created"
    assert [v for k, v in server.headers if k == "X-Dup"] == ["1", "2"]
    assert server.header("content-length") == "7"
    assert server.header("idempotent-replayed") == "true"


def test_lazy_start_response_during_iteration_is_captured() -> None:
    calls: list[int] = []

    def app(env: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        calls.append(1)
        start_response("202 Accepted", [("Content-Type", "text/plain")])
        yield b"lazy"

    wrapped = middleware(app)
    first = WSGIServer()
    assert first.call(wrapped, environ()) == b"lazy"
    assert first.status == "202 Accepted"
    retry = WSGIServer()
    assert retry.call(wrapped, environ()) == b"lazy"
    assert retry.header("idempotent-replayed") == "true"
    assert calls == [1]


def test_write_callable_output_is_captured_before_the_iterable() -> None:
    def app(env: dict[str, Any], start_response: Any) -> list[bytes]:
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"written,")
        return [b"returned"]

    wrapped = middleware(app)
    assert WSGIServer().call(wrapped, environ()) == b"written,returned"
    assert WSGIServer().call(wrapped, environ()) == b"written,returned"


def test_start_response_with_exc_info_replaces_the_captured_response() -> None:
    def app(env: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        try:
            raise ValueError("late failure")
        except ValueError:
            start_response("400 Bad Request", [("Content-Type", "text/plain")], sys.exc_info())
        return [b"bad input"]

    wrapped = middleware(app)
    server = WSGIServer()
    assert server.call(wrapped, environ()) == b"bad input"
    assert server.status == "400 Bad Request"
    replay = WSGIServer()
    replay.call(wrapped, environ())
    assert replay.status == "400 Bad Request"
    assert replay.header("idempotent-replayed") == "true"


def test_close_is_called_on_success() -> None:
    iterable = ClosingIterable([b"a", b"b"])

    def app(env: dict[str, Any], start_response: Any) -> ClosingIterable:
        start_response("200 OK", [])
        return iterable

    assert WSGIServer().call(middleware(app), environ()) == b"ab"
    assert iterable.closed


def test_exception_during_iteration_closes_releases_and_propagates() -> None:
    layer = InMemoryPersistenceLayer()
    iterable = ClosingIterable([b"a", b"b"], fail_at=1)

    def app(env: dict[str, Any], start_response: Any) -> ClosingIterable:
        start_response("200 OK", [])
        return iterable

    with pytest.raises(RuntimeError, match="iteration failed"):
        WSGIServer().call(middleware(app, layer=layer), environ())
    assert iterable.closed
    assert layer._records == {}


def test_app_exception_releases_the_record_and_propagates() -> None:
    layer = InMemoryPersistenceLayer()
    error = KeyError("boom")

    def app(env: dict[str, Any], start_response: Any) -> list[bytes]:
        raise error

    with pytest.raises(KeyError) as raised:
        WSGIServer().call(middleware(app, layer=layer), environ())
    assert raised.value is error
    assert layer._records == {}


def test_record_is_completed_before_the_response_is_returned() -> None:
    layer = InMemoryPersistenceLayer()
    statuses: list[str] = []
    server = WSGIServer()
    original = server.start_response

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        statuses.extend(record.status for record in layer._records.values())
        return original(status, headers, exc_info)

    server.start_response = start_response  # type: ignore[method-assign]
    server.call(middleware(echo_app([]), layer=layer), environ())
    assert statuses == [STATUS_COMPLETED]


def test_oversized_response_streams_and_the_app_iterable_is_closed_on_client_abort() -> None:
    layer = InMemoryPersistenceLayer()
    iterable = ClosingIterable([b"x" * 600, b"y" * 600, b"z" * 600])

    def app(env: dict[str, Any], start_response: Any) -> ClosingIterable:
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return iterable

    wrapped = middleware(app, layer=layer, max_stored_response_bytes=1000)
    result = wrapped(environ(), WSGIServer().start_response)
    first = next(iter(result))  # the client reads one chunk and goes away
    assert [record.status for record in layer._records.values()] == [STATUS_INPROGRESS]
    result.close()  # type: ignore[attr-defined]
    assert first == b"x" * 600  # forwarded as the app produced it
    assert iterable.closed
    record = next(iter(layer._records.values()))
    assert record.status == STATUS_COMPLETED
    assert record.response is not None
    assert record.response.body_omitted


def test_uncovered_request_is_passed_through_untouched() -> None:
    captured: list[Any] = []

    def app(env: dict[str, Any], start_response: Any) -> list[bytes]:
        captured.append(env["wsgi.input"])
        start_response("200 OK", [])
        return [b"ok"]

    env = environ(REQUEST_METHOD="GET")
    stream = env["wsgi.input"]
    assert WSGIServer().call(middleware(app), env) == b"ok"
    assert captured == [stream]


class BrokenStream:
    def read(self, size: int = -1) -> bytes:
        raise OSError("connection reset by peer")


def test_a_body_that_cannot_be_read_is_400_and_claims_nothing() -> None:
    layer = InMemoryPersistenceLayer()
    seen: list[dict[str, Any]] = []
    server = WSGIServer()
    body = server.call(
        middleware(echo_app(seen), layer=layer),
        environ(content_length=10, **{"wsgi.input": BrokenStream()}),
    )
    assert server.status is not None
    assert server.status.startswith("400")
    assert b"request_body_incomplete" in body
    assert seen == []
    assert layer._records == {}


def test_an_unparsable_content_length_reads_no_body() -> None:
    seen: list[dict[str, Any]] = []
    env = environ(b"ignored")
    env["CONTENT_LENGTH"] = "twelve"
    assert WSGIServer().call(middleware(echo_app(seen)), env) == b"got:"
    assert seen == [{"body": b"", "content_length": "0"}]


def test_terminated_input_over_the_limit_is_413() -> None:
    seen: list[dict[str, Any]] = []
    env = environ(b"x" * 20, **{"wsgi.input_terminated": True})
    del env["CONTENT_LENGTH"]
    server = WSGIServer()
    server.call(middleware(echo_app(seen), max_request_body_bytes=10), env)
    assert server.status is not None
    assert server.status.startswith("413")
    assert seen == []


def test_app_that_never_calls_start_response_fails_and_releases() -> None:
    layer = InMemoryPersistenceLayer()

    def app(env: dict[str, Any], start_response: Any) -> list[bytes]:
        return [b"no status"]

    with pytest.raises(RuntimeError, match="start_response"):
        WSGIServer().call(middleware(app, layer=layer), environ())
    assert layer._records == {}


def test_once_streaming_write_and_exc_info_go_to_the_server() -> None:
    written: list[bytes] = []
    restarts: list[Any] = []

    def app(env: dict[str, Any], start_response: Any) -> list[bytes]:
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"a" * 20)  # past the limit: the response now streams
        write(b"tail")
        try:
            raise ValueError("late failure")
        except ValueError:
            start_response("500 Internal Server Error", [], sys.exc_info())
        return []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        restarts.append(exc_info)
        if exc_info is not None:
            raise exc_info[1].with_traceback(exc_info[2])
        return written.append

    wrapped = middleware(app, max_stored_response_bytes=10)
    with pytest.raises(ValueError, match="late failure"):
        wrapped(environ(), start_response)
    assert written == [b"a" * 20, b"tail"]
    assert restarts[0] is None
    assert restarts[1] is not None


def test_a_status_without_a_known_phrase_is_replayed() -> None:
    def app(env: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("299 Custom", [])
        return [b"custom"]

    wrapped = middleware(app)
    WSGIServer().call(wrapped, environ())
    replay = WSGIServer()
    assert replay.call(wrapped, environ()) == b"custom"
    assert replay.status == "299 Custom"  # the app's reason phrase, as it wrote it


def test_exception_on_the_first_chunk_closes_releases_and_propagates() -> None:
    layer = InMemoryPersistenceLayer()
    iterable = ClosingIterable([b"a", b"b"], fail_at=0)

    def app(env: dict[str, Any], start_response: Any) -> ClosingIterable:
        start_response("200 OK", [])
        return iterable

    with pytest.raises(RuntimeError, match="iteration failed"):
        WSGIServer().call(middleware(app, layer=layer), environ())
    assert iterable.closed
    assert layer._records == {}
