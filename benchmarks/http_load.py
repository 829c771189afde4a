"""Sections 3 and 4: real servers under load, and the event loop's health meanwhile.

Section 3 serves the Starlette app of ``benchmarks.apps`` on uvicorn (one worker) and the Flask
example app on gunicorn (one worker, ``gthread``), bare and with the middleware over the memory,
SQLite, DynamoDB Local and Redis stores, and loads each with 32 keep-alive connections over
loopback: new keys, then replays of keys created beforehand. On Starlette, Redis also runs with
its store calls in worker threads (its native asyncio path off) and under asgi-idempotency-header
with its ``redis.asyncio`` backend, on the same private redis-server; PostgreSQL also runs with
its store calls in worker threads.

Section 4 asks whether store I/O ever holds up the event loop: while 32 connections keep
DynamoDB-bound covered requests in flight, a probe sends ``GET /health`` (not covered) one at a
time and its p99 latency is compared with the same probe's on the idle server::

    python -m benchmarks.http_load [--seconds 5]

``--health VARIANT`` (repeatable) runs section 4 alone for ways of making the DynamoDB calls -
worker threads or aiobotocore on the loop, at most 8, 2 or 1 calls in flight per lane - each on
its own server, interleaved in ``--rounds``, on one DynamoDB Local table::

    python -m benchmarks.http_load --health "threads 8" --health "async 2" --rounds 3
"""

from __future__ import annotations

import argparse
import http.client
import os
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import loadgen
from benchmarks.apps import ORDER_BODY, ORDER_PATH

CONNECTIONS = 32
REPLAY_KEYS = 500
PAYMENT_BODY = b'{"amount":1250,"currency":"EUR"}'
# "sqlite": synchronous=FULL, the default (a completed record survives a power cut);
# "sqlite-normal": synchronous=NORMAL (may lose the last commits on power loss, not on a crash).
STORES = ("memory", "sqlite", "sqlite-normal", "dynamodb", "redis", "postgres")
#: Starlette only: (variant, uvicorn app factory, extra environment) over the same Redis.
REDIS_VARIANTS: tuple[tuple[str, str, dict[str, str]], ...] = (
    ("ours, redis (threads)", "benchmarks.apps:served_app", {"BENCH_STORE_THREADS": "on"}),
    ("asgi-idempotency-header, redis", "benchmarks.apps:served_peer_redis_app", {}),
)
#: Starlette only: PostgreSQL with its store calls in worker threads (its asyncio path off).
POSTGRES_VARIANTS: tuple[tuple[str, str, dict[str, str]], ...] = (
    ("ours, postgres (threads)", "benchmarks.apps:served_app", {"BENCH_STORE_THREADS": "on"}),
)
#: The extra Starlette variants run after a store's own row.
STORE_VARIANTS = {"redis": REDIS_VARIANTS, "postgres": POSTGRES_VARIANTS}
# DynamoDB Local keeps one database per access key and region: the servers and the process that
# creates the table must use the same ones.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "benchmark",
    "AWS_SECRET_ACCESS_KEY": "benchmark",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class HTTPRow:
    server: str  # "uvicorn + Starlette" or "gunicorn + Flask example"
    variant: str  # "bare" or "ours, <store>"
    traffic: str  # "new keys" or "replays"
    result: loadgen.LoadResult


@dataclass
class LoopHealth:
    idle_p50_ms: float
    idle_p99_ms: float
    loaded_p50_ms: float
    loaded_p99_ms: float
    covered_rps: float
    covered_errors: int
    samples: int

    @property
    def ratio(self) -> float:
        return self.loaded_p99_ms / self.idle_p99_ms


@dataclass
class HTTPResult:
    generator: str
    seconds: float
    rows: list[HTTPRow]
    loop_health: LoopHealth | None

    def row(self, server: str, variant: str, traffic: str) -> HTTPRow:
        return next(
            r
            for r in self.rows
            if r.server == server and r.variant == variant and r.traffic == traffic
        )


@dataclass(frozen=True)
class Target:
    """One server setup: what to run and what to send it."""

    server: str
    path: str
    body: bytes
    headers: tuple[tuple[str, str], ...]


STARLETTE = Target(
    "uvicorn + Starlette", ORDER_PATH, ORDER_BODY, (("Content-Type", "application/json"),)
)
FLASK = Target(
    "gunicorn + Flask example",
    "/payments",
    PAYMENT_BODY,
    (("Content-Type", "application/json"), ("Authorization", "Bearer bench")),
)


def _store_env(
    store: str | None,
    workdir: Path,
    dynamodb_url: str,
    table: str,
    redis_url: str = "",
    postgres_url: str = "",
) -> dict[str, str]:
    env = dict(CREDENTIALS)
    if store is None:
        return env
    env["BENCH_IDEMPOTENCY"] = "on"
    env["BENCH_PEER_REDIS_URL"] = redis_url
    env["IDEM_STORE_URL"] = {
        "memory": "memory://",
        "sqlite": f"sqlite:///{workdir}/idempotency-{uuid.uuid4().hex[:8]}.sqlite3",
        "sqlite-normal": f"sqlite:///{workdir}/idempotency-{uuid.uuid4().hex[:8]}.sqlite3"
        "?synchronous=NORMAL",
        "dynamodb": f"dynamodb://{table}?region={CREDENTIALS['AWS_DEFAULT_REGION']}"
        f"&endpoint_url={dynamodb_url}",
        "redis": redis_url,
        "postgres": postgres_url,
    }[store]
    return env


@contextmanager
def serve(
    target: Target,
    store: str | None,
    env: dict[str, str],
    log_dir: Path,
    app: str = "benchmarks.apps:served_app",
) -> Iterator[str]:
    from tooling import servers

    if target is STARLETTE:
        server = servers.start_uvicorn(app, env=env, log_dir=log_dir, extra_args=["--factory"])
    else:
        app = "example_apps.flask_app:app" if store else "benchmarks.apps:flask_bare()"
        server = servers.start_gunicorn(app, env=env, log_dir=log_dir, threads=8)
    with servers.running(server):
        yield server.base_url


def _load(
    target: Target, base_url: str, prefix: str, keys: int | None, seconds: float
) -> loadgen.Load:
    return loadgen.Load(
        url=base_url + target.path,
        body=target.body,
        headers=dict(target.headers),
        key_prefix=prefix,
        keys=keys,
        connections=CONNECTIONS,
        seconds=seconds,
    )


def _prepare_replays(target: Target, base_url: str, prefix: str) -> None:
    """Create the keys the replay load cycles over, one request each."""
    parts = base_url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(parts[0], int(parts[1]), timeout=30)
    try:
        for n in range(REPLAY_KEYS):
            headers = {**dict(target.headers), "Idempotency-Key": f"{prefix}{n}"}
            connection.request("POST", target.path, body=target.body, headers=headers)
            response = connection.getresponse()
            response.read()
            if response.status >= 400:
                raise RuntimeError(f"preparing replays: {response.status} from {base_url}")
    finally:
        connection.close()


def _measure_server(
    target: Target,
    store: str | None,
    env: dict[str, str],
    log_dir: Path,
    seconds: float,
    variant: str | None = None,
    app: str = "benchmarks.apps:served_app",
) -> list[HTTPRow]:
    variant = variant or (f"ours, {store}" if store else "bare")
    rows = []
    with serve(target, store, env, log_dir, app) as base_url:
        run_id = uuid.uuid4().hex[:8]
        loadgen.run(_load(target, base_url, f"warm-{run_id}-", None, 1))  # warm-up
        new = loadgen.run(_load(target, base_url, f"new-{run_id}-", None, seconds))
        rows.append(HTTPRow(target.server, variant, "new keys", new))
        if store:
            prefix = f"replay-{run_id}-"
            _prepare_replays(target, base_url, prefix)
            replays = loadgen.run(_load(target, base_url, prefix, REPLAY_KEYS, seconds))
            rows.append(HTTPRow(target.server, variant, "replays", replays))
    return rows


class HealthProbe:
    """``GET /health``, one at a time on one keep-alive connection, a few ms apart."""

    def __init__(self, base_url: str, pause_s: float = 0.005) -> None:
        host, port = base_url.removeprefix("http://").split(":")
        self.connection = http.client.HTTPConnection(host, int(port), timeout=30)
        self.pause_s = pause_s
        self.latencies_ms: list[float] = []

    def sample(self, seconds: float) -> list[float]:
        latencies = []
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            self.connection.request("GET", "/health")
            response = self.connection.getresponse()
            response.read()
            latencies.append((time.perf_counter() - started) * 1000)
            time.sleep(self.pause_s)
        return latencies


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


#: Section 4's ways of making the DynamoDB store calls, each served by
#: ``benchmarks.http_load:served_health_app``: the environment it is given.
HEALTH_VARIANTS: dict[str, dict[str, str]] = {
    "threads 8": {"BENCH_DYNAMODB_PATH": "threads", "BENCH_STORE_THREADS_MAX": "8"},
    "threads 4": {"BENCH_DYNAMODB_PATH": "threads", "BENCH_STORE_THREADS_MAX": "4"},
    "threads 2": {"BENCH_DYNAMODB_PATH": "threads", "BENCH_STORE_THREADS_MAX": "2"},
    "threads 1": {"BENCH_DYNAMODB_PATH": "threads", "BENCH_STORE_THREADS_MAX": "1"},
    "async 8": {"BENCH_DYNAMODB_PATH": "async", "BENCH_STORE_THREADS_MAX": "8"},
    "async 2": {"BENCH_DYNAMODB_PATH": "async", "BENCH_STORE_THREADS_MAX": "2"},
    "async 1": {"BENCH_DYNAMODB_PATH": "async", "BENCH_STORE_THREADS_MAX": "1"},
}


def served_health_app() -> Any:
    """The Starlette app over DynamoDB the way ``BENCH_DYNAMODB_PATH`` says: ``threads`` (worker
    threads) or ``async`` (aiobotocore on the event loop), with at most
    ``BENCH_STORE_THREADS_MAX`` store calls in flight per lane (claims; completions):
    ``uvicorn --factory benchmarks.http_load:served_health_app``.
    """
    from starlette.middleware import Middleware

    from benchmarks.apps import build_starlette
    from example_apps.store import persistence_layer_from_env
    from idem_middleware import IdempotencyMiddleware
    from idem_middleware.persistence import DynamoDBPersistenceLayer

    calls = int(os.environ.get("BENCH_STORE_THREADS_MAX", "8"))
    layer = persistence_layer_from_env()
    assert isinstance(layer, DynamoDBPersistenceLayer)
    if os.environ.get("BENCH_DYNAMODB_PATH") == "async":
        if layer._async is None:
            raise RuntimeError("the async variant needs aiobotocore (the dynamodb-async extra)")
        layer._async.calls_per_lane = calls
    else:
        layer.native_async = False
    middleware = type("Middleware", (IdempotencyMiddleware,), {"max_store_threads": calls})
    return build_starlette([Middleware(middleware, persistence_layer=layer)])


def measure_loop_health(
    env: dict[str, str], log_dir: Path, seconds: float, app: str = "benchmarks.apps:served_app"
) -> LoopHealth:
    with serve(STARLETTE, "dynamodb", env, log_dir, app) as base_url:
        probe = HealthProbe(base_url)
        probe.sample(1)  # warm-up
        idle = probe.sample(seconds)
        result: list[loadgen.LoadResult] = []
        load = _load(STARLETTE, base_url, f"health-{uuid.uuid4().hex[:8]}-", None, seconds + 2)
        loader = threading.Thread(target=lambda: result.append(loadgen.run(load)))
        loader.start()
        time.sleep(1)  # the load is up to speed: 32 requests in flight
        loaded = probe.sample(seconds)
        loader.join()
        probe.connection.close()
    return LoopHealth(
        statistics.median(idle),
        _p99(idle),
        statistics.median(loaded),
        _p99(loaded),
        result[0].rps if result else 0.0,
        result[0].errors if result else 0,
        len(loaded),
    )


def run(
    seconds: float = 5.0, dynamodb_url: str | None = None, stores: tuple[str, ...] = STORES
) -> HTTPResult:
    from benchmarks.store_roundtrips import dynamodb
    from tooling import redis_server

    redis = redis_server.start()
    try:
        with (
            tempfile.TemporaryDirectory(prefix="idem-bench-") as tmp,
            dynamodb(dynamodb_url) if "dynamodb" in stores else nullcontext(("", "")) as (url, _),
            postgres_database() if "postgres" in stores else nullcontext("") as postgres_url,
        ):
            workdir = Path(tmp)
            table = _create_table(url) if url else ""
            rows: list[HTTPRow] = []
            for target in (STARLETTE, FLASK):
                for store in (None, *stores):
                    env = _store_env(store, workdir, url, table, redis.url, postgres_url)
                    rows += _measure_server(target, store, env, workdir, seconds)
                    if target is STARLETTE and store is not None:
                        for variant, app, extra in STORE_VARIANTS.get(store, ()):
                            rows += _measure_server(
                                target, store, env | extra, workdir, seconds, variant, app
                            )
            health = (
                measure_loop_health(_store_env("dynamodb", workdir, url, table), workdir, seconds)
                if url
                else None
            )
    finally:
        redis.stop()
    return HTTPResult(loadgen.generator_name(), seconds, rows, health)


@contextmanager
def postgres_database() -> Iterator[str]:
    """A database of the run's own, with the idempotency table, on the PostgreSQL server at
    IDEM_TEST_POSTGRES_DSN (default 127.0.0.1:5432) or a private one; dropped at the end.
    """
    from psycopg.conninfo import conninfo_to_dict

    from idem_middleware.persistence import PostgresPersistenceLayer
    from tooling import postgres_server

    server = postgres_server.start()
    try:
        name, conninfo = server.create_database()
        try:
            params = conninfo_to_dict(conninfo)
            url = (
                f"postgresql://{params.get('user', 'postgres')}@{params.get('host', '127.0.0.1')}"
                f":{params.get('port', '5432')}/{name}"
            )
            layer = PostgresPersistenceLayer(url)
            layer.create_table()
            layer.close()
            yield url
        finally:
            server.drop_database(name)
    finally:
        server.stop()


def _create_table(endpoint_url: str) -> str:
    import boto3

    from idem_middleware.persistence import from_url

    table = f"idem-http-{uuid.uuid4().hex[:8]}"
    client = boto3.client(
        "dynamodb",
        endpoint_url=endpoint_url,
        region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    )
    from_url(f"dynamodb://{table}", boto3_client=client).create_table()
    return table


def compare_loop_health(
    variants: list[str], rounds: int, seconds: float, dynamodb_url: str | None = None
) -> dict[str, list[LoopHealth]]:
    """Section 4 for each of ``variants`` (names in ``HEALTH_VARIANTS``), interleaved in rounds
    on one DynamoDB Local table.
    """
    from benchmarks.store_roundtrips import dynamodb

    results: dict[str, list[LoopHealth]] = {name: [] for name in variants}
    with (
        tempfile.TemporaryDirectory(prefix="idem-bench-") as tmp,
        dynamodb(dynamodb_url) as (url, _),
    ):
        workdir = Path(tmp)
        env = _store_env("dynamodb", workdir, url, _create_table(url))
        app = "benchmarks.http_load:served_health_app"
        # DynamoDB Local's JIT warms up in the first seconds of load: not in the first variant.
        measure_loop_health(env | HEALTH_VARIANTS[variants[0]], workdir, seconds, app)
        for _round in range(rounds):
            for name in variants:
                health = measure_loop_health(env | HEALTH_VARIANTS[name], workdir, seconds, app)
                results[name].append(health)
                print(f"  {name:<12} {_health_line(health)}", flush=True)
    return results


def _health_line(h: LoopHealth) -> str:
    return (
        f"idle p50 {h.idle_p50_ms:.2f} p99 {h.idle_p99_ms:.2f} ms; loaded p50 "
        f"{h.loaded_p50_ms:.2f} p99 {h.loaded_p99_ms:.2f} ms ({h.ratio:.1f}x); "
        f"covered {h.covered_rps:.0f} req/s, errors {h.covered_errors}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--endpoint-url")
    parser.add_argument("--store", action="append", choices=STORES, help="repeatable")
    parser.add_argument(
        "--health",
        action="append",
        choices=list(HEALTH_VARIANTS),
        help="only section 4, for these ways of calling DynamoDB (repeatable), interleaved",
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds of --health")
    args = parser.parse_args(argv)
    if args.health:
        results = compare_loop_health(args.health, args.rounds, args.seconds, args.endpoint_url)
        print("medians over rounds:")
        for name, rows in results.items():
            print(
                f"  {name:<12} loaded/idle p99 "
                f"{statistics.median(h.ratio for h in rows):.1f}x, loaded p99 "
                f"{statistics.median(h.loaded_p99_ms for h in rows):.2f} ms, covered "
                f"{statistics.median(h.covered_rps for h in rows):.0f} req/s"
            )
        return 0
    result = run(args.seconds, args.endpoint_url, tuple(args.store or STORES))
    print(f"load generator: {result.generator}, {CONNECTIONS} connections, {args.seconds}s")
    for row in result.rows:
        r = row.result
        print(
            f"{row.server:<26} {row.variant:<31} {row.traffic:<9} {r.rps:8.0f} req/s "
            f"p50 {r.p50_ms:6.2f} ms  p99 {r.p99_ms:6.2f} ms  errors {r.errors}"
        )
    if result.loop_health:
        h = result.loop_health
        print(
            f"GET /health p99: idle {h.idle_p99_ms:.2f} ms, under DynamoDB load "
            f"{h.loaded_p99_ms:.2f} ms ({h.ratio:.2f}x); covered load {h.covered_rps:.0f} req/s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
