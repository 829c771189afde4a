"""Section 2: latency and store calls per request against DynamoDB Local, ours and Powertools.

Two pairings, because the two libraries are called differently:

* from an event loop: our ASGI middleware around a minimal ASGI app, driven in-process on an
  asyncio loop (its store calls go to worker threads, as in production), against Powertools'
  ``idempotent_function`` called in a worker thread, as an async app has to call a function that
  blocks on DynamoDB (and as FastAPI runs a sync endpoint);
* in the calling thread: our WSGI middleware around a minimal WSGI app, called as a WSGI server
  calls it, against the same decorated function called directly.

Powertools' function returns the same order, through its own ``DynamoDBPersistenceLayer``. All
use one table on the same endpoint, each its own boto3 client, counted by the same hook as
``benchmarks.store_roundtrips``.
Requests of every case and both libraries are interleaved in rounds; the floor is one
unconditional ``PutItem`` of a small item, the least a store call can cost::

    python -m benchmarks.dynamodb [--rounds 10] [--per-round 20] [--endpoint-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import io
import json
import os
import re
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio.to_thread

from benchmarks.inprocess import ASGIApp, Message, call
from benchmarks.store_roundtrips import CallCounter, dynamodb
from idem_middleware import IdempotencyConfig, IdempotencyMiddleware, IdempotencyWSGIMiddleware
from idem_middleware.persistence import BasePersistenceLayer, from_url

ORDER = {"sku": "ABC-123", "qty": 1}
RESPONSE_BODY = b'{"id":"ord_1","status":"created","sku":"ABC-123","qty":1}'
CASES = ("new key", "replay", "replay, local cache")
EXPECTED_CALLS = {"new key": 2, "replay": 1, "replay, local cache": 0}


async def order_app(scope: Any, receive: Any, send: Any) -> None:
    """The handler: a created order, as small as an ASGI app gets."""
    await receive()
    await send(
        {
            "type": "http.response.start",
            "status": 201,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": RESPONSE_BODY})


@dataclass
class Case:
    library: str
    case: str
    latencies_ms: list[float] = field(default_factory=list)
    calls: list[int] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.latencies_ms)

    @property
    def calls_per_request(self) -> tuple[int, int]:
        return min(self.calls), max(self.calls)


@dataclass
class DynamoDBResult:
    implementation: str
    requests_per_case: int
    put_item_ms: float
    cases: list[Case]
    thread_hop_ms: float  # one anyio.to_thread.run_sync of a no-op, from the event loop

    def case(self, library: str, case: str) -> Case:
        return next(c for c in self.cases if c.library == library and c.case == case)


def _client(endpoint_url: str) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "dynamodb",
        endpoint_url=endpoint_url,
        region_name="us-east-1",
        config=Config(retries={"total_max_attempts": 1}, max_pool_connections=50),
    )


def _layer(table: str, client: Any) -> BasePersistenceLayer:
    return from_url(f"dynamodb://{table}", boto3_client=client)


class OursASGI:
    """The ASGI middleware on an event loop; store calls go to worker threads, or with
    aiobotocore installed (the ``dynamodb-async`` extra) to its client on the loop.
    """

    name = "ours, ASGI"

    def __init__(self, endpoint_url: str, table: str) -> None:
        self.client = _client(endpoint_url)
        self.counter = CallCounter(self.client)
        self.loop = asyncio.new_event_loop()
        layers = {cached: _layer(table, self.client) for cached in (False, True)}
        self.layers = list(layers.values())
        for layer in self.layers:
            asynchronous = getattr(layer, "_async", None)
            if layer.native_async and asynchronous is not None:
                # The loop's aiobotocore client, built now, counted by the same hook.
                built = self.loop.run_until_complete(asynchronous.client())
                built.client.meta.events.register("before-call.dynamodb", self.counter._before_call)
        self.apps: dict[bool, ASGIApp] = {
            cached: IdempotencyMiddleware(
                order_app,
                persistence_layer=layer,
                config=IdempotencyConfig(use_local_cache=cached),
            )
            for cached, layer in layers.items()
        }

    def request(self, key: str, *, cached: bool, replayed: bool) -> None:
        responses: list[Message] = []
        self.loop.run_until_complete(call(self.apps[cached], key.encode(), responses))
        headers = dict(responses[0].get("headers", ()))
        if responses[0]["status"] != 201 or (b"idempotent-replayed" in headers) != replayed:
            raise RuntimeError(f"{self.name}: unexpected response {responses[0]!r} for {key!r}")

    def close(self) -> None:
        for layer in self.layers:
            aclose = getattr(layer, "aclose", None)
            if aclose is not None:
                self.loop.run_until_complete(aclose())
        self.loop.close()


def order_wsgi_app(environ: Any, start_response: Any) -> list[bytes]:
    environ["wsgi.input"].read()
    start_response("201 Created", [("Content-Type", "application/json")])
    return [RESPONSE_BODY]


class OursWSGI:
    """The WSGI middleware, called in this thread as a WSGI server would call it."""

    name = "ours, WSGI"

    def __init__(self, endpoint_url: str, table: str) -> None:
        self.client = _client(endpoint_url)
        self.counter = CallCounter(self.client)
        self.apps = {
            cached: IdempotencyWSGIMiddleware(
                order_wsgi_app,
                persistence_layer=_layer(table, self.client),
                config=IdempotencyConfig(use_local_cache=cached),
            )
            for cached in (False, True)
        }

    def request(self, key: str, *, cached: bool, replayed: bool) -> None:
        body = json.dumps(ORDER).encode()
        environ = {
            "REQUEST_METHOD": "POST",
            "PATH_INFO": "/orders",
            "QUERY_STRING": "",
            "CONTENT_TYPE": "application/json",
            "CONTENT_LENGTH": str(len(body)),
            "HTTP_IDEMPOTENCY_KEY": key,
            "wsgi.input": io.BytesIO(body),
        }
        seen: list[tuple[str, list[tuple[str, str]]]] = []
        chunks = self.apps[cached](
            environ, lambda status, headers, *_: seen.append((status, headers))
        )
        b"".join(chunks)
        status, headers = seen[0]
        names = {name.lower() for name, _ in headers}
        if not status.startswith("201") or ("idempotent-replayed" in names) != replayed:
            raise RuntimeError(f"{self.name}: unexpected response {status} for {key!r}")

    def close(self) -> None:
        pass


class Powertools:
    """``idempotent_function`` over Powertools' DynamoDB layer, keyed like ours by a client key,
    called in this thread.
    """

    name = "Powertools"

    def __init__(self, endpoint_url: str, table: str) -> None:
        from aws_lambda_powertools.utilities.idempotency import (
            DynamoDBPersistenceLayer as PowertoolsLayer,
        )
        from aws_lambda_powertools.utilities.idempotency import (
            IdempotencyConfig as PowertoolsConfig,
        )
        from aws_lambda_powertools.utilities.idempotency import idempotent_function

        self.client = _client(endpoint_url)
        self.counter = CallCounter(self.client)
        self.functions: dict[bool, Callable[..., Any]] = {}
        for cached in (False, True):
            layer = PowertoolsLayer(table_name=table, boto3_client=self.client)
            # Doing what ours does: a payload fingerprint checked on every retry, and a lease
            # on in-progress records (Powertools takes it from the Lambda context's remaining
            # time; ours is 60 s by default).
            config = PowertoolsConfig(
                event_key_jmespath="key",
                payload_validation_jmespath="[sku, qty]",
                use_local_cache=cached,
                raise_on_no_idempotency_key=True,
            )
            config.register_lambda_context(_LambdaContext())

            def create_order(order: dict[str, Any]) -> dict[str, Any]:
                return {"id": "ord_1", "status": "created", **ORDER}

            # One function name per layer: Powertools keys records by function name.
            create_order.__name__ = create_order.__qualname__ = f"create_order_{cached}"
            self.functions[cached] = idempotent_function(
                data_keyword_argument="order", persistence_store=layer, config=config
            )(create_order)

    def request(self, key: str, *, cached: bool, replayed: bool) -> None:
        result = self.functions[cached](order={"key": key, **ORDER})
        if result.get("id") != "ord_1":
            raise RuntimeError(f"{self.name}: unexpected result {result!r} for {key!r}")

    def close(self) -> None:
        pass


class _LambdaContext:
    """As much of a Lambda context as Powertools reads: the time left, for the lease."""

    def get_remaining_time_in_millis(self) -> int:
        return 60_000


class PowertoolsFromLoop(Powertools):
    """Powertools as an async app must call it, in a worker thread (as FastAPI runs a sync
    endpoint): the decorated function blocks on DynamoDB for the whole request.
    """

    name = "Powertools, worker thread"

    def __init__(self, endpoint_url: str, table: str) -> None:
        super().__init__(endpoint_url, table)
        self.loop = asyncio.new_event_loop()

    def request(self, key: str, *, cached: bool, replayed: bool) -> None:
        call_in_thread = anyio.to_thread.run_sync(
            functools.partial(super().request, key, cached=cached, replayed=replayed)
        )
        self.loop.run_until_complete(call_in_thread)

    def close(self) -> None:
        self.loop.close()


#: (ours, theirs): the event-loop pairing first, then the calling-thread one.
PAIRS = (("ours, ASGI", "Powertools, worker thread"), ("ours, WSGI", "Powertools"))


def _thread_hop_ms(samples: int) -> float:
    """What moving one call off the event loop and back costs on this machine, now."""

    async def hops() -> list[float]:
        latencies = []
        for _ in range(samples):
            started = time.perf_counter()
            await anyio.to_thread.run_sync(time.perf_counter)
            latencies.append((time.perf_counter() - started) * 1000)
        return latencies

    return statistics.median(asyncio.run(hops()))


def _tag(name: str) -> str:
    """A key prefix per library: they share one table, and ours share one key prefix."""
    return re.sub(r"[^a-z]+", "-", name.lower())


def _put_item_floor(client: Any, table: str, samples: int) -> float:
    latencies = []
    for i in range(samples):
        started = time.perf_counter()
        client.put_item(
            TableName=table,
            Item={"id": {"S": f"floor-{i}"}, "status": {"S": "COMPLETED"}},
        )
        latencies.append((time.perf_counter() - started) * 1000)
    return statistics.median(latencies)


def run_against(endpoint_url: str, implementation: str, rounds: int, per_round: int) -> Any:
    table = f"idem-bench-{uuid.uuid4().hex[:8]}"
    admin = _client(endpoint_url)
    _layer(table, admin).create_table()
    libraries = [
        OursASGI(endpoint_url, table),
        PowertoolsFromLoop(endpoint_url, table),
        OursWSGI(endpoint_url, table),
        Powertools(endpoint_url, table),
    ]
    cases = {(lib.name, case): Case(lib.name, case) for lib in libraries for case in CASES}
    try:
        for lib in libraries:  # connection pools, JVM warm-up; not counted
            for i in range(20):
                for cached in (False, True):
                    key = f"{_tag(lib.name)}-warmup-{cached}-{i}"
                    lib.request(key, cached=cached, replayed=False)
                    lib.request(key, cached=cached, replayed=True)
        floor = _put_item_floor(admin, table, 20)  # warm-up of the admin client
        for round_index in range(rounds):
            shift = round_index % len(libraries)
            for lib in libraries[shift:] + libraries[:shift]:
                tag = _tag(lib.name)
                keys = [f"{tag}-{round_index}-{i}-{uuid.uuid4()}" for i in range(per_round)]
                for case in CASES:
                    cached = case == "replay, local cache"
                    replayed = case != "new key"
                    if cached:  # this process completes them first: its local cache holds them
                        for key in keys:
                            lib.request(f"c-{key}", cached=True, replayed=False)
                    result = cases[(lib.name, case)]
                    for key in keys:
                        before = lib.counter.count
                        started = time.perf_counter()
                        lib.request(f"c-{key}" if cached else key, cached=cached, replayed=replayed)
                        result.latencies_ms.append((time.perf_counter() - started) * 1000)
                        result.calls.append(lib.counter.count - before)
        floor = _put_item_floor(admin, table, rounds * per_round)
        hop = _thread_hop_ms(rounds * per_round)
        return DynamoDBResult(implementation, rounds * per_round, floor, list(cases.values()), hop)
    finally:
        for lib in libraries:
            lib.close()
        admin.delete_table(TableName=table)


def run(rounds: int = 10, per_round: int = 20, endpoint_url: str | None = None) -> DynamoDBResult:
    # DynamoDB Local accepts any credentials; never pick up real ones.
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "benchmark")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "benchmark")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    with dynamodb(endpoint_url) as (url, implementation):
        result: DynamoDBResult = run_against(url, implementation, rounds, per_round)
        return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--per-round", type=int, default=20)
    parser.add_argument("--endpoint-url")
    args = parser.parse_args(argv)
    result = run(args.rounds, args.per_round, args.endpoint_url)
    print(f"{result.implementation}: raw PutItem {result.put_item_ms:.2f} ms")
    for case in result.cases:
        low, high = case.calls_per_request
        print(f"{case.library:<11} {case.case:<20} {case.median_ms:7.2f} ms  calls {low}..{high}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
