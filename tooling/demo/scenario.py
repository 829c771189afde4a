"""What the demo does to one running payments server, and what it expects to see.

One payment request, then the retries real clients send: many at once while the first is still
charging the card (answered 409, or, on a server that lets duplicates wait, held until the
first completes and answered with its response), one with a changed body under the same key,
one after the first has completed. Then a streamed CSV export, read as it arrives, and its
retry, which gets the whole stream back. Every step yields a :class:`Check`: what idempotency
promises, what the server did.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from dataclasses import dataclass

import httpx

PAYMENT = {"amount": 1250, "currency": "EUR", "description": "demo order #1234"}
CHANGED_PAYMENT = {**PAYMENT, "amount": 9900}
REPLAY_HEADER = "idempotent-replayed"
# Fields that describe one transmission: a replay legitimately carries fresh ones.
PER_TRANSMISSION_HEADERS = frozenset({"date", "server", "connection", "keep-alive", REPLAY_HEADER})
# How a body is framed: a stream goes out chunked, its replay in one piece.
FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding"})


@dataclass(frozen=True)
class Check:
    """One step of the demo: what it did, what idempotency promises, what the server did."""

    step: str
    expected: str
    observed: str
    ok: bool


def _body(payment: dict[str, object]) -> bytes:
    return json.dumps(payment).encode()


def _problem_code(response: httpx.Response) -> str | None:
    try:
        document = response.json()
    except ValueError:
        return None
    code = document.get("code") if isinstance(document, dict) else None
    return code if isinstance(code, str) else None


def _end_to_end_headers(
    response: httpx.Response, ignored: frozenset[str] = PER_TRANSMISSION_HEADERS
) -> list[tuple[str, str]]:
    return sorted(
        (name, value) for name, value in response.headers.multi_items() if name not in ignored
    )


def _is_replay_of(
    response: httpx.Response, first: httpx.Response, *, streamed: bool = False
) -> bool:
    """Byte for byte the first response (status, body, end-to-end headers), marked a replay."""
    ignored = PER_TRANSMISSION_HEADERS | FRAMING_HEADERS if streamed else PER_TRANSMISSION_HEADERS
    return (
        response.headers.get(REPLAY_HEADER) == "true"
        and response.status_code == first.status_code
        and response.content == first.content
        and _end_to_end_headers(response, ignored) == _end_to_end_headers(first, ignored)
    )


@dataclass(frozen=True)
class Streamed:
    """A response read chunk by chunk as it arrived: when the first came, when it ended."""

    response: httpx.Response  # with the whole body
    chunks: int
    first_chunk: bytes
    first_seconds: float
    total_seconds: float


async def _read_streamed(client: httpx.AsyncClient, path: str, headers: dict[str, str]) -> Streamed:
    started = time.monotonic()
    chunks: list[bytes] = []
    first_seconds = 0.0
    async with client.stream("POST", path, headers=headers) as response:
        async for chunk in response.aiter_raw():
            if chunk and not chunks:
                first_seconds = time.monotonic() - started
            if chunk:
                chunks.append(chunk)
    whole = httpx.Response(response.status_code, headers=response.headers, content=b"".join(chunks))
    return Streamed(
        whole, len(chunks), chunks[0] if chunks else b"", first_seconds, time.monotonic() - started
    )


def _describe(response: httpx.Response) -> str:
    code = _problem_code(response)
    return f"{response.status_code} {code}" if code else str(response.status_code)


async def exercise(
    base_url: str,
    *,
    user: str = "demo",
    concurrent_retries: int = 20,
    retries_after_seconds: float = 0.2,
    conflict_wait_seconds: float = 0,
) -> list[Check]:
    """Run the seven steps against the payments API at ``base_url``.

    The concurrent retries are sent ``retries_after_seconds`` after the first request, which
    must be less than the server's card delay so that they arrive while it is in flight.
    ``conflict_wait_seconds`` is the server's (``IDEM_CONFLICT_WAIT_SECONDS``): above 0, each
    of them must wait for the first to complete and get its answer, never a 409.
    """
    key = f"demo-{uuid.uuid4().hex[:16]}"
    headers = {
        "Authorization": f"Bearer {user}",
        "Idempotency-Key": key,
        "Content-Type": "application/json",
    }
    body = _body(PAYMENT)
    # A fresh connection per request (no keep-alive), so the retries spread over every worker.
    limits = httpx.Limits(max_connections=concurrent_retries + 2, max_keepalive_connections=0)
    checks: list[Check] = []
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=30) as client:

        async def post(content: bytes) -> httpx.Response:
            return await client.post("/payments", headers=headers, content=content)

        async def timed_post(content: bytes) -> tuple[httpx.Response, float]:
            sent = time.monotonic()
            response = await post(content)
            return response, time.monotonic() - sent

        started = time.monotonic()
        first_request = asyncio.ensure_future(post(body))
        await asyncio.sleep(retries_after_seconds)
        timed = await asyncio.gather(*(timed_post(body) for _ in range(concurrent_retries)))
        retries = [response for response, _ in timed]
        first = await first_request
        first_seconds = time.monotonic() - started

        # 1. The first request runs the handler.
        checks.append(
            Check(
                "POST /payments with a new Idempotency-Key",
                "the handler runs: 201",
                f"{_describe(first)} after {first_seconds:.2f} s",
                first.status_code == 201 and first.headers.get(REPLAY_HEADER) is None,
            )
        )

        # 2. Retries while it runs: each waits its turn (409) or gets the stored answer; on a
        # server that lets duplicates wait, each is held until the first completes.
        in_use = sum(
            1
            for r in retries
            if r.status_code == 409
            and _problem_code(r) == "idempotency_key_in_use"
            and "retry-after" in r.headers
        )
        replayed = sum(1 for r in retries if _is_replay_of(r, first))
        others = Counter(
            _describe(r)
            for r in retries
            if not _is_replay_of(r, first)
            and not (r.status_code == 409 and _problem_code(r) == "idempotency_key_in_use")
        )
        if conflict_wait_seconds > 0:
            longest = max(seconds for _, seconds in timed)
            observed = f"{replayed} waited (up to {longest:.2f} s) and got a replay, {in_use} a 409"
            step = (
                f"{concurrent_retries} retries at once, while the first still runs; they may "
                f"wait up to {conflict_wait_seconds:g} s"
            )
            expected = (
                "each waits for the first to complete, then gets its answer (a replay), no 409"
            )
            ok = replayed == concurrent_retries
        else:
            observed = f"{in_use} got 409 idempotency_key_in_use, {replayed} a replay"
            step = f"{concurrent_retries} retries at once, while the first still runs"
            expected = "each gets 409 (try later) or a replay of the first answer"
            ok = in_use + replayed == concurrent_retries
        if others:
            observed += "; unexpected: " + ", ".join(
                f"{n} got {what}" for what, n in others.items()
            )
        checks.append(Check(step, expected, observed, ok))

        # 3. The same key with another body is a client bug, never a second payment.
        changed = await post(_body(CHANGED_PAYMENT))
        checks.append(
            Check(
                "the same key, with another amount",
                "refused: 422 idempotency_key_reused",
                _describe(changed),
                changed.status_code == 422 and _problem_code(changed) == "idempotency_key_reused",
            )
        )

        # 4. A retry after completion gets the first response back, byte for byte.
        replay = await post(body)
        same = _is_replay_of(replay, first)
        marker = replay.headers.get(REPLAY_HEADER)
        checks.append(
            Check(
                "a retry after the first completed",
                "the first answer, byte for byte, marked Idempotent-Replayed: true",
                f"{replay.status_code}, Idempotent-Replayed: {marker or '(absent)'}, "
                + (
                    f"same headers and body ({len(replay.content)} bytes)"
                    if same
                    else "headers or body differ"
                ),
                same,
            )
        )

        # 5. A streamed export goes out as it is produced, not once it is complete.
        export_headers = {**headers, "Idempotency-Key": f"{key}-export"}
        del export_headers["Content-Type"]
        export = await _read_streamed(client, "/exports", export_headers)
        lines = export.response.content.count(b"\n")
        checks.append(
            Check(
                "POST /exports: a CSV export, streamed as it is produced",
                "201; the first line arrives before the export is complete",
                f"{_describe(export.response)}, first line after {export.first_seconds:.2f} s, "
                f"all {lines} lines after {export.total_seconds:.2f} s ({export.chunks} chunks)",
                export.response.status_code == 201
                and REPLAY_HEADER not in export.response.headers
                and export.chunks > 1
                and len(export.first_chunk) < len(export.response.content),
            )
        )

        # 6. Its retry gets the whole stream back.
        again = await _read_streamed(client, "/exports", export_headers)
        same = _is_replay_of(again.response, export.response, streamed=True)
        checks.append(
            Check(
                "the same export, retried after it completed",
                "the whole export at once, byte for byte, marked Idempotent-Replayed: true",
                f"{again.response.status_code}, Idempotent-Replayed: "
                f"{again.response.headers.get(REPLAY_HEADER) or '(absent)'}, "
                + (
                    f"same export ({len(again.response.content)} bytes) in "
                    f"{again.total_seconds:.2f} s"
                    if same
                    else "headers or body differ"
                ),
                same,
            )
        )

        # 7. The ledger says how often the handlers really ran.
        total = 2 + concurrent_retries + 1
        stats = await client.get("/_stats")
        counts = stats.json() if stats.status_code == 200 else {}
        created = counts.get("payments_created")
        exports = counts.get("exports_created")
        checks.append(
            Check(
                "GET /_stats: how often the handlers charged a card and built an export",
                f"one charge for these {total} payment POSTs, one export for the 2 export POSTs",
                f"payments_created: {created}, exports_created: {exports}",
                created == 1 and exports == 1,
            )
        )
    return checks
