"""Section 1: cost per request in-process, against the bare app and asgi-idempotency-header.

Each app is driven directly through ASGI - a scope, a ``receive`` that hands over the body once,
a ``send`` that keeps the response start - with no server, socket or HTTP client in the loop:
an HTTP client's own cost (httpx spends more per request than any middleware here) would hide
everyone's. The driver's own cost is in every number, the bare app's included.

Variants run interleaved, in rounds of a few hundred requests each (the order rotates from round
to round), so a noisy neighbour slows all of them alike. A variant's cost is the median over the
rounds of its µs per request; its ratio is the median over the rounds of its cost divided by the
bare app's in the same round. Stateful variants use a new key for every request, so after the
last round each store holds ``rounds * per_round`` keys, and the per-round series shows whether a
variant gets slower as its store fills::

    python -m benchmarks.inprocess [--rounds 40] [--per-round 500]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import zlib
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from starlette.middleware import Middleware

from benchmarks.apps import ORDER_BODY, ORDER_PATH, build_fastapi, build_starlette
from idem_middleware import IdempotencyConfig, IdempotencyMiddleware
from idem_middleware.persistence import InMemoryPersistenceLayer

Message = MutableMapping[str, Any]
ASGIApp = Callable[[MutableMapping[str, Any], Any, Any], Awaitable[None]]

REPLAY_HEADER = b"idempotent-replayed"


def post_scope(path: str, body: bytes) -> dict[str, Any]:
    """The ASGI scope of a ``POST path`` with a JSON ``body``, as uvicorn builds it (headers
    included, the idempotency key left to the caller).
    """
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "headers": [
            (b"host", b"127.0.0.1:8000"),
            (b"user-agent", b"benchmark"),
            (b"accept", b"*/*"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
    }


_SCOPE = post_scope(ORDER_PATH, ORDER_BODY)
_HEADERS = _SCOPE.pop("headers")
_BODY_MESSAGE = {"type": "http.request", "body": ORDER_BODY, "more_body": False}


async def call(app: ASGIApp, key: bytes | None, responses: list[Message]) -> None:
    """One ``POST /orders`` as a server would make it; the response start goes to ``responses``."""
    headers = list(_HEADERS)
    if key is not None:
        headers.append((b"idempotency-key", key))
    scope = {**_SCOPE, "headers": headers}
    delivered = False

    async def receive() -> Message:
        nonlocal delivered
        if delivered:
            return {"type": "http.disconnect"}
        delivered = True
        return dict(_BODY_MESSAGE)

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            responses.append(message)

    await app(scope, receive, send)


@dataclass
class Variant:
    """One app under one kind of traffic."""

    name: str
    app: ASGIApp
    replayed: bool  # what every response must say about itself
    keyed: bool = True  # False: the bare app, sent no key
    key_prefix: str = ""  # the variant whose keys this one replays
    untimed_setup: bool = False  # replay keys this app has not seen: create them first, untimed
    us_per_round: list[float] = field(default_factory=list)

    def keys(self, round_index: int, per_round: int) -> list[bytes | None]:
        if not self.keyed:
            return [None] * per_round
        # UUID-shaped, as most clients send them; the first group names the variant's keys.
        prefix = zlib.crc32((self.key_prefix or self.name).encode())
        return [
            f"{prefix:08x}-{round_index % 0x10000:04x}-4000-8000-{i:012x}".encode()
            for i in range(per_round)
        ]


def check(variant: Variant, responses: list[Message], expected: int) -> None:
    if len(responses) != expected:
        raise RuntimeError(f"{variant.name}: {len(responses)} responses for {expected} requests")
    for message in responses:
        replayed = any(name == REPLAY_HEADER for name, _ in message.get("headers", ()))
        if message["status"] != 201 or replayed != variant.replayed:
            raise RuntimeError(
                f"{variant.name}: got status {message['status']}, replayed={replayed}; "
                f"expected 201, replayed={variant.replayed}"
            )


async def run_segment(variant: Variant, keys: list[bytes | None]) -> float:
    """µs per request over ``keys``; the responses are checked after the clock stops."""
    responses: list[Message] = []
    app = variant.app
    started = time.thread_time_ns()
    for key in keys:
        await call(app, key, responses)
    elapsed = time.thread_time_ns() - started
    check(variant, responses, len(keys))
    return elapsed / len(keys) / 1000


async def prime(app: ASGIApp, keys: list[bytes | None]) -> None:
    responses: list[Message] = []
    for key in keys:
        await call(app, key, responses)


def variants() -> list[list[Variant]]:
    """The variants, in groups that must run in this order within a round (new, then replay)."""
    from idempotency_header_middleware import IdempotencyHeaderMiddleware
    from idempotency_header_middleware.backends.memory import MemoryBackend

    def ours(config: IdempotencyConfig | None = None) -> Middleware:
        return Middleware(
            IdempotencyMiddleware, persistence_layer=InMemoryPersistenceLayer(), config=config
        )

    starlette_ours = build_starlette([ours()])
    starlette_cached = build_starlette([ours(IdempotencyConfig(use_local_cache=True))])
    peer = build_starlette([Middleware(IdempotencyHeaderMiddleware, backend=MemoryBackend())])
    fastapi_ours = build_fastapi([ours()])
    return [
        [Variant("bare Starlette", build_starlette(), replayed=False, keyed=False)],
        [
            Variant("ours, new key", starlette_ours, replayed=False),
            Variant("ours, replay", starlette_ours, replayed=True, key_prefix="ours, new key"),
        ],
        [
            Variant(
                "ours, replay from local cache",
                starlette_cached,
                replayed=True,
                untimed_setup=True,
            )
        ],
        [
            Variant("asgi-idempotency-header, new key", peer, replayed=False),
            Variant(
                "asgi-idempotency-header, replay",
                peer,
                replayed=True,
                key_prefix="asgi-idempotency-header, new key",
            ),
        ],
        [Variant("bare FastAPI", build_fastapi(), replayed=False, keyed=False)],
        [
            Variant("ours on FastAPI, new key", fastapi_ours, replayed=False),
            Variant(
                "ours on FastAPI, replay",
                fastapi_ours,
                replayed=True,
                key_prefix="ours on FastAPI, new key",
            ),
        ],
    ]


@dataclass
class Row:
    name: str
    us: float  # median µs per request
    ratio: float  # median per-round ratio to the bare app of the same framework
    baseline: str
    us_per_round: list[float]


@dataclass
class InProcessResult:
    rounds: int
    per_round: int
    rows: list[Row]

    def row(self, name: str) -> Row:
        return next(row for row in self.rows if row.name == name)


def run(rounds: int = 40, per_round: int = 500, warmup: int = 200) -> InProcessResult:
    groups = variants()
    every = [variant for group in groups for variant in group]
    loop = asyncio.new_event_loop()
    try:
        for variant in every:  # imports, route caches, code warm-up; not counted
            keys = variant.keys(-1, warmup)
            if variant.untimed_setup:
                loop.run_until_complete(prime(variant.app, keys))
            loop.run_until_complete(prime(variant.app, keys))
        for round_index in range(rounds):
            shift = round_index % len(groups)
            for group in groups[shift:] + groups[:shift]:
                for variant in group:
                    keys = variant.keys(round_index, per_round)
                    if variant.untimed_setup:
                        loop.run_until_complete(prime(variant.app, keys))
                    cost = loop.run_until_complete(run_segment(variant, keys))
                    variant.us_per_round.append(cost)
    finally:
        loop.close()

    by_name = {variant.name: variant for variant in every}

    def bare_for(variant: Variant) -> Variant:
        return by_name["bare FastAPI" if "FastAPI" in variant.name else "bare Starlette"]

    rows = []
    for variant in every:
        bare = bare_for(variant)
        rounds_paired = zip(variant.us_per_round, bare.us_per_round, strict=True)
        ratios = [cost / floor for cost, floor in rounds_paired]
        rows.append(
            Row(
                variant.name,
                statistics.median(variant.us_per_round),
                statistics.median(ratios),
                bare.name,
                variant.us_per_round,
            )
        )
    return InProcessResult(rounds, per_round, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--per-round", type=int, default=500)
    args = parser.parse_args(argv)
    result = run(args.rounds, args.per_round)
    for row in result.rows:
        first, last = (
            row.us_per_round[: len(row.us_per_round) // 4 or 1],
            row.us_per_round[-(len(row.us_per_round) // 4 or 1) :],
        )
        print(
            f"{row.name:<36} {row.us:8.1f} µs  {row.ratio:5.2f}x {row.baseline:<15}"
            f" first quarter {statistics.median(first):7.1f}  last {statistics.median(last):7.1f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
