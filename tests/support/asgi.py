"""An ASGI request driven as a server would drive it, for tests that call an app directly."""

from __future__ import annotations

from typing import Any

import anyio

from idem_middleware.persistence import InMemoryPersistenceLayer

Message = dict[str, Any]


def record_statuses(layer: InMemoryPersistenceLayer) -> list[str]:
    """The status of every record the memory layer holds."""
    return [record.status for record in layer._records.values()]


class ASGIClient:
    """One request driven as a server would: the body, then ``http.disconnect`` only once the
    response is complete or the test disconnects. Records what it was sent, and when.
    """

    def __init__(self, layer: InMemoryPersistenceLayer | None = None, body: bytes = b"{}") -> None:
        self.layer = layer
        self.body = body
        self.body_sent = False
        self.sent: list[Message] = []
        self.statuses_at_body: list[tuple[bytes, bool, list[str]]] = []
        self.first_chunk = anyio.Event()
        self.gone = anyio.Event()
        self.hung_up = False
        self.fail_sends = False

    async def receive(self) -> Message:
        if not self.body_sent:
            self.body_sent = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        if self.hung_up:
            if self.fail_sends:  # ASGI spec 2.4: a send to a closed connection raises
                raise OSError("connection reset by peer")
            return  # before 2.4 (uvicorn): dropped, the app learns of it from receive
        self.sent.append(message)
        if message["type"] == "http.response.body":
            statuses = record_statuses(self.layer) if self.layer is not None else []
            more = message.get("more_body", False)
            self.statuses_at_body.append((message.get("body", b""), more, statuses))
            if message.get("body"):
                self.first_chunk.set()
            if not more:
                self.gone.set()

    def disconnect(self, *, fail_sends: bool = False) -> None:
        self.hung_up = True
        self.fail_sends = fail_sends
        self.gone.set()

    @property
    def status(self) -> int:
        return int(self.sent[0]["status"])

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        return list(self.sent[0]["headers"])

    @property
    def body_received(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")
