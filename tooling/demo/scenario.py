"""What the demo does to one running payments server, and what it expects to see.

One payment request, then the retries real clients send: many at once while the first is still
charging the card, one with a changed body under the same key, one after the first has
completed. Every step yields a :class:`Check`: what idempotency promises, what the server did.
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


def _end_to_end_headers(response: httpx.Response) -> list[tuple[str, str]]:
    return sorted(
        (name, value)
        for name, value in response.headers.multi_items()
        if name not in PER_TRANSMISSION_HEADERS
    )


def _is_replay_of(response: httpx.Response, first: httpx.Response) -> bool:
    """Byte for byte the first response (status, body, end-to-end headers), marked a replay."""
    return (
        response.headers.get(REPLAY_HEADER) == "true"
        and response.status_code == first.status_code
        and response.content == first.content
        and _end_to_end_headers(response) == _end_to_end_headers(first)
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
) -> list[Check]:
    """Run the five steps against the payments API at ``base_url``.

    The concurrent retries are sent ``retries_after_seconds`` after the first request, which
    must be less than the server's card delay so that they arrive while it is in flight.
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

        started = time.monotonic()
        first_request = asyncio.ensure_future(post(body))
        await asyncio.sleep(retries_after_seconds)
        retries = await asyncio.gather(*(post(body) for _ in range(concurrent_retries)))
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

        # 2. Retries while it runs: each waits its turn (409) or gets the stored answer.
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
        observed = f"{in_use} got 409 idempotency_key_in_use, {replayed} a replay"
        if others:
            observed += "; unexpected: " + ", ".join(
                f"{n} got {what}" for what, n in others.items()
            )
        checks.append(
            Check(
                f"{concurrent_retries} retries at once, while the first still runs",
                "each gets 409 (try later) or a replay of the first answer",
                observed,
                in_use + replayed == concurrent_retries,
            )
        )

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

        # 5. The ledger says how often the handler really ran.
        total = 2 + concurrent_retries + 1
        stats = await client.get("/_stats")
        created = stats.json().get("payments_created") if stats.status_code == 200 else None
        checks.append(
            Check(
                "GET /_stats: how often the handler charged a card",
                f"once, for these {total} POSTs",
                f"payments_created: {created}",
                created == 1,
            )
        )
    return checks
