"""A WSGI request environ and a minimal server, for tests that call a WSGI app directly."""

from __future__ import annotations

import io
import sys
from typing import Any


def environ(
    body: bytes = b"{}",
    *,
    path: str = "/pay",
    key: str | None = "k-1",
    content_length: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A PEP 3333 environ of a covered POST; an ``extra`` value of ``None`` removes that
    variable (``CONTENT_LENGTH=None``: a body without a length).
    """
    env: dict[str, Any] = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "SERVER_NAME": "testserver",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
        "CONTENT_LENGTH": str(len(body) if content_length is None else content_length),
    }
    if key is not None:
        env["HTTP_IDEMPOTENCY_KEY"] = key
    env.update(extra)
    return {name: value for name, value in env.items() if value is not None}


class WSGIServer:
    """Calls a WSGI app the way a server does and records what it was given."""

    def __init__(self) -> None:
        self.status: str | None = None
        self.headers: list[tuple[str, str]] = []

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Any:
        self.status = status
        self.headers = headers
        return lambda data: None

    def call(self, app: Any, env: dict[str, Any]) -> bytes:
        iterable = app(env, self.start_response)
        try:
            return b"".join(iterable)
        finally:
            close = getattr(iterable, "close", None)
            if close is not None:
                close()

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)
