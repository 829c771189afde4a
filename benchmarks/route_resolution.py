"""What ``@idempotent`` costs a request: the route table lookup, in-process.

Runs :mod:`benchmarks.inprocess`'s driver (no server, no HTTP client) over the same
``POST /orders`` on Starlette apps with and without decorated routes, interleaved in rounds,
then times ``RouteTable.engine_for`` alone. An app without the decorator gets no table, so
"ours, no decorator" must cost what it did before the decorator existed::

    python -m benchmarks.route_resolution [--rounds 40] [--per-round 400]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import timeit
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from benchmarks.apps import ORDER_PATH, build_starlette, create_order
from benchmarks.inprocess import Variant, prime, run_segment
from idem_middleware import IdempotencyMiddleware, idempotent
from idem_middleware.engine import IdempotencyEngine
from idem_middleware.persistence import InMemoryPersistenceLayer
from idem_middleware.route_table import build_route_table, discover_endpoints

OTHER_ROUTES = 30


def ours() -> Middleware:
    return Middleware(IdempotencyMiddleware, persistence_layer=InMemoryPersistenceLayer())


def many_routes(*, decorate_others: bool, decorate_orders: bool) -> Starlette:
    """``OTHER_ROUTES`` routes ``/things<i>/{id}``, then ``/orders`` last."""

    async def orders(request: Request) -> JSONResponse:
        return await create_order(request)

    async def other(request: Request) -> JSONResponse:
        return await create_order(request)

    endpoint: Any = idempotent()(orders) if decorate_orders else orders
    things: Any = idempotent(require_key=True)(other) if decorate_others else other
    routes = [Route(f"/things{i}/{{id}}", things, methods=["POST"]) for i in range(OTHER_ROUTES)]
    routes.append(Route(ORDER_PATH, endpoint, methods=["POST"]))
    return Starlette(routes=routes, middleware=[ours()])


def variants() -> list[Variant]:
    return [
        Variant("bare Starlette", build_starlette(), replayed=False, keyed=False),
        Variant("ours, no decorator", build_starlette([ours()]), replayed=False),
        Variant(
            "ours, 31 routes, no decorator",
            many_routes(decorate_others=False, decorate_orders=False),
            replayed=False,
        ),
        Variant(
            "ours, 31 routes, /orders decorated",
            many_routes(decorate_others=True, decorate_orders=True),
            replayed=False,
        ),
        Variant(
            "ours, 31 routes, others decorated",
            many_routes(decorate_others=True, decorate_orders=False),
            replayed=False,
        ),
    ]


def lookup_ns(number: int = 200_000) -> dict[str, float]:
    """ns per ``engine_for`` call (a lambda's call included) on the 31-route table."""
    app = many_routes(decorate_others=True, decorate_orders=True)
    endpoints = discover_endpoints(app)
    assert endpoints is not None
    table = build_route_table(endpoints, IdempotencyEngine(InMemoryPersistenceLayer()))
    assert table is not None
    timings = {}
    for method, path in [
        ("POST", "/orders"),
        ("POST", "/things0/1"),
        ("POST", "/things29/1"),
        ("POST", "/nowhere"),
        ("GET", "/orders"),
    ]:
        seconds = timeit.timeit(lambda: table.engine_for(method, path), number=number)  # noqa: B023
        timings[f"{method} {path}"] = seconds / number * 1e9
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--per-round", type=int, default=400)
    args = parser.parse_args(argv)
    every = variants()
    loop = asyncio.new_event_loop()
    try:
        for variant in every:
            loop.run_until_complete(prime(variant.app, variant.keys(-1, 200)))
        for round_index in range(args.rounds):
            shift = round_index % len(every)
            for variant in every[shift:] + every[:shift]:
                keys = variant.keys(round_index, args.per_round)
                variant.us_per_round.append(loop.run_until_complete(run_segment(variant, keys)))
    finally:
        loop.close()
    bare, undecorated = every[0].us_per_round, every[2].us_per_round
    for variant in every:
        ratios = [cost / floor for cost, floor in zip(variant.us_per_round, bare, strict=True)]
        extra = [
            cost - floor for cost, floor in zip(variant.us_per_round, undecorated, strict=True)
        ]
        print(
            f"{variant.name:<36} {statistics.median(variant.us_per_round):7.1f} µs "
            f"{statistics.median(ratios):5.2f}x bare  "
            f"{statistics.median(extra):+5.1f} µs vs the same 31 routes undecorated"
        )
    for name, ns in lookup_ns().items():
        print(f"engine_for({name}): {ns:5.0f} ns")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
