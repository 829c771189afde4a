"""Section "streaming": time to first byte of a covered streamed response, against the bare app.

A covered ``StreamingResponse`` goes out as the app produces it; only its final message waits
until the record is completed. What the middleware adds before the first event reaches the
client is reading the request body, the key and fingerprint, and the claim (one store call).
The target: the first byte within 5 ms of the bare app's.

The app is ``POST /export`` on Starlette, a CSV export streamed in ``EVENTS`` chunks, the first
at once and the next ones ``GAP_SECONDS`` apart (``StreamingResponse``, no Content-Length). Each
request uses a new key. It is measured twice:

* **in-process**: a minimal ASGI driver calls the app and notes when the first body chunk is
  sent. (httpx's ``ASGITransport`` cannot measure this: it hands the response over only once the
  app has finished.) Memory and SQLite stores; replays too, which send the whole stream at once.
* **on uvicorn** (one worker per variant, loopback, one keep-alive connection each): the time
  from sending the request to reading the first chunk of the body, with ``http.client``.

Variants run interleaved, request by request, so a noisy neighbour slows all of them alike;
medians (and p90) over the requests::

    python -m benchmarks.streaming [--requests 300] [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import os
import re
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from benchmarks.inprocess import post_scope
from idem_middleware import IdempotencyMiddleware
from idem_middleware.persistence import (
    BasePersistenceLayer,
    InMemoryPersistenceLayer,
    SQLitePersistenceLayer,
)

Message = MutableMapping[str, Any]
ASGIApp = Callable[[MutableMapping[str, Any], Any, Any], Awaitable[None]]

EXPORT_PATH = "/export"
EXPORT_BODY = b'{"report":"payments","month":"2026-11"}'
EVENTS = 4
GAP_SECONDS = 0.005
#: The target: a covered stream's first byte within this much of the bare app's.
TARGET_MS = 5.0
#: Requests per variant before the measured ones: imports, caches, connections.
WARMUP = 20
ROOT = Path(__file__).resolve().parents[1]
MARKDOWN = ROOT / "BENCHMARKS.md"
BLOCK_START = "<!-- streaming:start (written by python -m benchmarks) -->"
BLOCK_END = "<!-- streaming:end -->"


# The app ------------------------------------------------------------------------------------


async def export(request: Request) -> StreamingResponse:
    await request.body()

    async def rows() -> AsyncIterator[bytes]:
        yield b"id,amount,currency\n"
        for n in range(1, EVENTS):
            await asyncio.sleep(GAP_SECONDS)
            yield f"pay_{n},{n * 1250},EUR\n".encode()

    return StreamingResponse(rows(), status_code=201, media_type="text/csv")


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok", "pid": os.getpid()})


def build_app() -> Starlette:
    return Starlette(
        routes=[
            Route(EXPORT_PATH, export, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
        ]
    )


def served_app() -> Any:
    """``uvicorn --factory benchmarks.streaming:served_app``: bare, or behind the middleware over
    the store ``IDEM_STORE_URL`` names when ``BENCH_IDEMPOTENCY=on``.
    """
    app = build_app()
    if os.environ.get("BENCH_IDEMPOTENCY", "off") != "on":
        return app
    from example_apps.store import persistence_layer_from_env

    return IdempotencyMiddleware(app, persistence_layer=persistence_layer_from_env())


# In-process ---------------------------------------------------------------------------------

_SCOPE = post_scope(EXPORT_PATH, EXPORT_BODY)
_HEADERS = _SCOPE.pop("headers")


async def first_byte_ms(app: ASGIApp, key: bytes | None) -> Outcome:
    """One request: ms until the first non-empty body chunk was sent, until the last, whether
    the response was a replay, and the whole body.
    """
    headers = list(_HEADERS)
    if key is not None:
        headers.append((b"idempotency-key", key))
    scope = {**_SCOPE, "headers": headers}
    delivered = False
    done = asyncio.Event()
    first: float | None = None
    replayed = False
    body: list[bytes] = []

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": EXPORT_BODY, "more_body": False}
        await done.wait()  # Starlette listens for a disconnect while it streams
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal first, replayed
        if message["type"] == "http.response.start":
            replayed = any(name == b"idempotent-replayed" for name, _ in message["headers"])
            if message["status"] != 201:
                raise RuntimeError(f"status {message['status']}")
        elif message["type"] == "http.response.body":
            chunk = message.get("body", b"")
            if chunk and first is None:
                first = time.perf_counter()
            body.append(chunk)
            if not message.get("more_body", False):
                done.set()

    started = time.perf_counter()
    await app(scope, receive, send)
    assert first is not None
    last = time.perf_counter()
    return (first - started) * 1000, (last - started) * 1000, replayed, b"".join(body)


#: One request's outcome: ms to the first body chunk and to the end of the response, whether it
#: was a replay, the whole body.
Outcome = tuple[float, float, bool, bytes]


@dataclass
class Variant:
    name: str
    replayed: bool = False
    samples_ms: list[float] = field(default_factory=list)
    last_byte_ms: list[float] = field(default_factory=list)

    def record(self, n: int, outcome: Outcome) -> None:
        ms, last_ms, replayed, body = outcome
        if replayed != self.replayed or body.count(b"\n") != EVENTS:
            raise RuntimeError(f"{self.name}: replayed={replayed}, body={body!r}")
        if n >= 0:  # negative: warm-up
            self.samples_ms.append(ms)
            self.last_byte_ms.append(last_ms)


@dataclass
class Row:
    setting: str  # "in-process" or "uvicorn"
    variant: str
    median_ms: float
    p90_ms: float
    last_byte_ms: float  # median time to the end of the response
    over_bare_ms: float | None  # median minus the bare app's median; None for the bare app

    @property
    def passed(self) -> bool | None:
        if self.over_bare_ms is None or "replay" in self.variant:
            return None
        return self.over_bare_ms <= TARGET_MS


def _rows(setting: str, variants: list[Variant]) -> list[Row]:
    bare = statistics.median(variants[0].samples_ms)
    rows = []
    for index, variant in enumerate(variants):
        samples = sorted(variant.samples_ms)
        median = statistics.median(samples)
        rows.append(
            Row(
                setting,
                variant.name,
                median,
                samples[int(len(samples) * 0.9)],
                statistics.median(variant.last_byte_ms),
                None if index == 0 else median - bare,
            )
        )
    return rows


def slug(name: str) -> str:
    """A variant's name as part of an idempotency key (visible ASCII, no spaces)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower())


def run_inprocess(requests: int, workdir: Path) -> list[Row]:
    def ours(layer: BasePersistenceLayer) -> ASGIApp:
        return IdempotencyMiddleware(build_app(), persistence_layer=layer)

    memory = ours(InMemoryPersistenceLayer())
    apps: list[tuple[Variant, ASGIApp, bool]] = [  # (variant, app, keyed)
        (Variant("bare Starlette"), build_app(), False),
        (Variant("ours, memory, new key"), memory, True),
        (
            Variant("ours, SQLite, new key"),
            ours(SQLitePersistenceLayer(str(workdir / "s.db"))),
            True,
        ),
    ]
    replay = Variant("ours, memory, replay", replayed=True)
    run_id = uuid.uuid4().hex[:8]

    async def measure() -> None:
        for n in range(-WARMUP, requests):
            shift = n % len(apps)
            for variant, app, keyed in apps[shift:] + apps[:shift]:
                key = f"{run_id}-{slug(variant.name)}-{n}".encode() if keyed else None
                variant.record(n, await first_byte_ms(app, key))
            # Replays the memory variant's new key of this round.
            key = f"{run_id}-{slug(apps[1][0].name)}-{n}".encode()
            replay.record(n, await first_byte_ms(memory, key))

    asyncio.run(measure())
    return _rows("in-process", [variant for variant, _, _ in apps] + [replay])


# On uvicorn ---------------------------------------------------------------------------------


class Connection:
    """One keep-alive connection to a server; ``post`` returns (ms to first body chunk,
    replayed, body).
    """

    def __init__(self, base_url: str) -> None:
        host, port = base_url.removeprefix("http://").split(":")
        self.connection = http.client.HTTPConnection(host, int(port), timeout=30)

    def post(self, key: str | None) -> Outcome:
        headers = {"Content-Type": "application/json"}
        if key is not None:
            headers["Idempotency-Key"] = key
        started = time.perf_counter()
        self.connection.request("POST", EXPORT_PATH, body=EXPORT_BODY, headers=headers)
        response = self.connection.getresponse()
        first = response.read1()
        elapsed = (time.perf_counter() - started) * 1000
        body = first + response.read()
        last = (time.perf_counter() - started) * 1000
        if response.status != 201 or not first:
            raise RuntimeError(f"status {response.status}, body {body!r}")
        return elapsed, last, response.getheader("idempotent-replayed") == "true", body


def run_uvicorn(requests: int, workdir: Path) -> list[Row]:
    from tooling import servers

    stores = {
        "bare Starlette": None,
        "ours, memory, new key": "memory://",
        "ours, SQLite, new key": f"sqlite:///{workdir}/served.sqlite3",
    }
    variants: list[tuple[Variant, Connection, bool]] = []  # (variant, connection, keyed)
    with ExitStack() as stack:
        for name, store in stores.items():
            env = {"BENCH_IDEMPOTENCY": "on", "IDEM_STORE_URL": store} if store else {}
            server = servers.start_uvicorn(
                "benchmarks.streaming:served_app",
                env=env,
                log_dir=workdir,
                extra_args=["--factory"],
            )
            stack.enter_context(servers.running(server))
            connection = Connection(server.base_url)
            stack.callback(connection.connection.close)
            variants.append((Variant(name), connection, store is not None))
        run_id = uuid.uuid4().hex[:8]
        for n in range(-WARMUP, requests):
            shift = n % len(variants)
            for variant, connection, keyed in variants[shift:] + variants[:shift]:
                variant.record(n, connection.post(f"{run_id}-{n}" if keyed else None))
    return _rows("uvicorn", [variant for variant, _, _ in variants])


# Results ------------------------------------------------------------------------------------


@dataclass
class StreamingResult:
    requests: int
    rows: list[Row]


def run(requests: int = 300, uvicorn_requests: int = 200) -> StreamingResult:
    with tempfile.TemporaryDirectory(prefix="idem-bench-stream-") as tmp:
        rows = run_inprocess(requests, Path(tmp))
        rows += run_uvicorn(uvicorn_requests, Path(tmp))
    return StreamingResult(requests, rows)


def markdown(result: StreamingResult) -> str:
    from benchmarks.report import machine

    info = machine()
    lines = [
        "### 5. Streaming: time to first byte of a covered streamed response",
        "",
        f"Run on {info['date']}: {info['machine']}; {info['python']}.",
        "",
        "| setting | variant | first byte, median ms | p90 ms | over bare ms "
        "| last byte, median ms | target |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for row in result.rows:
        over = "" if row.over_bare_ms is None else f"{row.over_bare_ms:+.2f}"
        verdict = {None: "", True: "pass", False: "**FAIL**"}[row.passed]
        lines.append(
            f"| {row.setting} | {row.variant} | {row.median_ms:.2f} | {row.p90_ms:.2f} "
            f"| {over} | {row.last_byte_ms:.2f} | {verdict} |"
        )
    lines += [
        "",
        f"`POST {EXPORT_PATH}` on Starlette: a CSV `StreamingResponse` of {EVENTS} chunks, the "
        f"first at once, the next {GAP_SECONDS * 1000:g} ms apart; a new key per request. "
        "In-process: a minimal ASGI driver, time from calling the app to the first body chunk "
        f"sent, {result.requests} requests per variant. On uvicorn: one worker per variant over "
        "loopback, a keep-alive connection each, time from sending the request to reading the "
        "first body chunk (`http.client`). Variants interleaved request by request; target: "
        f"median within {TARGET_MS:g} ms of the bare app (replays send the whole stored stream "
        "at once, so they have no target).",
    ]
    return "\n".join(lines)


def update_markdown(result: StreamingResult, path: Path = MARKDOWN) -> None:
    """Replace the streaming block of BENCHMARKS.md (after the results block when it is new)."""
    block = f"{BLOCK_START}\n{markdown(result)}\n{BLOCK_END}"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(BLOCK_START) + ".*?" + re.escape(BLOCK_END), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        anchor = "<!-- results:end -->"
        at = text.find(anchor)
        at = len(text) if at < 0 else at + len(anchor)
        text = f"{text[:at].rstrip()}\n\n{block}\n\n{text[at:].lstrip()}"
    path.write_text(text, encoding="utf-8")


def print_table(result: StreamingResult) -> None:
    print(markdown(result), file=sys.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=300, help="per variant, in-process")
    parser.add_argument("--uvicorn-requests", type=int, default=200, help="per variant")
    parser.add_argument("--no-write", action="store_true", help="leave BENCHMARKS.md as it is")
    args = parser.parse_args(argv)
    result = run(args.requests, args.uvicorn_requests)
    print_table(result)
    if not args.no_write:
        update_markdown(result)
    return 0 if all(row.passed is not False for row in result.rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
