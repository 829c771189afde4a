"""Store round trips and latency per request through the engine, against DynamoDB Local.

The README promises: a new key costs 2 store calls (claim, complete), a replay 1, a replay from
the local cache 0; and a conflict with an in-flight request costs 1. This script counts every
DynamoDB API call the boto3 client makes (a ``before-call.dynamodb`` event hook) for each
request and exits non-zero when a count differs from the promise::

    python -m benchmarks.store_roundtrips [--requests 200] [--endpoint-url URL]

Without ``--endpoint-url`` it starts Amazon's DynamoDB Local itself (as the test session does).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from idem_middleware.config import IdempotencyConfig
from idem_middleware.engine import IdempotencyEngine, Proceed, Respond
from idem_middleware.persistence import BasePersistenceLayer, from_url
from idem_middleware.request import Headers, IdempotencyRequest
from idem_middleware.responses import StoredResponse

RESPONSE = StoredResponse(
    status=201,
    headers=(("content-type", "application/json"), ("location", "/orders/1")),
    body=b'{"id":"ord_1","items":[' + b'{"sku":"ABC-123","qty":1},' * 30 + b"{}]}",
)
WARMUP_REQUESTS = 20


@dataclass
class Scenario:
    name: str
    expected_calls: int
    calls: list[int]
    latencies_ms: list[float]

    @property
    def ok(self) -> bool:
        return bool(self.calls) and all(count == self.expected_calls for count in self.calls)


class CallCounter:
    """Counts the API calls of one boto3 client, whatever the operation."""

    def __init__(self, client: Any) -> None:
        self.count = 0
        client.meta.events.register("before-call.dynamodb", self._before_call)

    def _before_call(self, **_: Any) -> None:
        self.count += 1


def request(key: str) -> IdempotencyRequest:
    return IdempotencyRequest(
        method="POST",
        path="/orders",
        query_string="",
        headers=Headers([("Idempotency-Key", key)]),
        body=b'{"sku":"ABC-123","qty":1}',
    )


def new_key(engine: IdempotencyEngine, key: str) -> None:
    decision = engine.begin(request(key))
    if not isinstance(decision, Proceed):
        raise RuntimeError(f"expected to claim {key!r}, got {decision!r}")
    engine.complete(decision, RESPONSE)


def replay(engine: IdempotencyEngine, key: str) -> None:
    decision = engine.begin(request(key))
    if not (isinstance(decision, Respond) and decision.response.body == RESPONSE.body):
        raise RuntimeError(f"expected a replay of {key!r}, got {decision!r}")


def conflict(engine: IdempotencyEngine, key: str) -> None:
    decision = engine.begin(request(key))
    if not (isinstance(decision, Respond) and decision.response.status == 409):
        raise RuntimeError(f"expected a 409 for in-flight {key!r}, got {decision!r}")


def measure(
    name: str,
    expected_calls: int,
    counter: CallCounter,
    step: Callable[[IdempotencyEngine, str], None],
    engine: IdempotencyEngine,
    keys: list[str],
) -> Scenario:
    scenario = Scenario(name, expected_calls, [], [])
    for key in keys:
        before = counter.count
        started = time.perf_counter()
        step(engine, key)
        scenario.latencies_ms.append((time.perf_counter() - started) * 1000)
        scenario.calls.append(counter.count - before)
    return scenario


def run(endpoint_url: str, requests: int) -> list[Scenario]:
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "dynamodb",
        endpoint_url=endpoint_url,
        region_name="us-east-1",
        config=Config(retries={"total_max_attempts": 1}),
    )
    table = f"idem-bench-{uuid.uuid4().hex[:8]}"
    layer: Any = from_url(f"dynamodb://{table}", boto3_client=client)
    layer.create_table()
    counter = CallCounter(client)  # after create_table: only request traffic is counted

    def store() -> BasePersistenceLayer:
        return from_url(f"dynamodb://{table}", boto3_client=client)

    try:
        plain = IdempotencyEngine(store())
        cached = IdempotencyEngine(store(), IdempotencyConfig(use_local_cache=True))
        for i in range(WARMUP_REQUESTS):  # JVM and connection pool warm-up, not measured
            new_key(plain, f"warmup-{i}")
            replay(plain, f"warmup-{i}")

        keys = [f"order-{i}" for i in range(requests)]
        cached_keys = [f"cached-order-{i}" for i in range(requests)]
        in_flight = [f"in-flight-{i}" for i in range(requests)]
        results = [
            measure("new key", 2, counter, new_key, plain, keys),
            measure("replay", 1, counter, replay, plain, keys),
        ]
        for key in cached_keys:  # completed by this process: the local cache holds them
            new_key(cached, key)
        results.append(measure("replay, local cache", 0, counter, replay, cached, cached_keys))
        for key in in_flight:
            if not isinstance(plain.begin(request(key)), Proceed):
                raise RuntimeError(f"expected to claim {key!r}")
        results.append(measure("conflict (in flight)", 1, counter, conflict, plain, in_flight))
        return results
    finally:
        client.delete_table(TableName=table)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def report(results: list[Scenario], requests: int, implementation: str) -> str:
    lines = [
        f"Store round trips per request: {requests} requests per scenario, {implementation}",
        "",
        f"{'scenario':<22} {'expected':>8} {'calls/request':>14} {'median ms':>10} "
        f"{'p90 ms':>8}  ok",
        "-" * 71,
    ]
    for scenario in results:
        low, high = min(scenario.calls), max(scenario.calls)
        calls = f"{low}" if low == high else f"{low}..{high}"
        lines.append(
            f"{scenario.name:<22} {scenario.expected_calls:>8} {calls:>14} "
            f"{statistics.median(scenario.latencies_ms):>10.2f} "
            f"{percentile(scenario.latencies_ms, 0.9):>8.2f}  "
            f"{'yes' if scenario.ok else 'NO'}"
        )
    failed = [scenario.name for scenario in results if not scenario.ok]
    lines.append("")
    lines.append(
        "summary: every call count as designed (new key 2, replay 1, cached replay 0, conflict 1)"
        if not failed
        else f"summary: call counts differ from the design for: {', '.join(failed)}"
    )
    return "\n".join(lines)


@contextmanager
def dynamodb(endpoint_url: str | None) -> Iterator[tuple[str, str]]:
    if endpoint_url is not None:
        yield endpoint_url, endpoint_url
        return
    from tooling import dynamodb_local

    server = dynamodb_local.start()
    try:
        yield server.endpoint_url, server.implementation
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=200, help="requests per scenario")
    parser.add_argument(
        "--endpoint-url", help="an already running DynamoDB (Local); default: start one"
    )
    args = parser.parse_args(argv)
    if args.requests < 1:
        parser.error("--requests must be at least 1")
    # DynamoDB Local accepts any credentials; never pick up real ones.
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "benchmark")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "benchmark")
    with dynamodb(args.endpoint_url) as (endpoint_url, implementation):
        results = run(endpoint_url, args.requests)
    print(report(results, args.requests, implementation))
    return 0 if all(scenario.ok for scenario in results) else 1


if __name__ == "__main__":
    sys.exit(main())
