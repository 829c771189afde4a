"""The benchmark's pass/fail lines judge what was measured, and only that."""

from __future__ import annotations

from benchmarks.http_load import HTTPResult, HTTPRow, LoopHealth
from benchmarks.loadgen import LoadResult
from benchmarks.report import STARLETTE, http_targets

FLASK = "gunicorn + Flask example"


def load(rps: float, p99_ms: float = 5.0) -> LoadResult:
    requests = int(rps * 5)
    return LoadResult("wrk", requests, seconds=5.0, p50_ms=1.0, p99_ms=p99_ms, errors=0)


def verdicts(rows: list[HTTPRow], health: LoopHealth | None = None) -> dict[str, tuple[str, bool]]:
    result = HTTPResult("wrk", 5.0, rows, health)
    return {c.name: (c.measured, c.passed) for c in http_targets(result)}


def test_store_shares_are_judged_against_the_bare_app_of_the_same_server() -> None:
    got = verdicts(
        [
            HTTPRow(STARLETTE, "bare", "new keys", load(1000, p99_ms=6.0)),
            HTTPRow(STARLETTE, "ours, sqlite", "new keys", load(260, p99_ms=19.0)),
            HTTPRow(STARLETTE, "ours, sqlite", "replays", load(790)),
            HTTPRow(STARLETTE, "ours, postgres", "new keys", load(300)),
        ]
    )
    assert got[f"HTTP sqlite req/s / bare, {STARLETTE}, new keys"] == ("26%", True)
    assert got[f"HTTP sqlite req/s / bare, {STARLETTE}, replays"] == ("79%", False)
    assert got[f"HTTP sqlite p99 / bare, {STARLETTE}, new keys"] == ("3.2x", False)
    assert got[f"HTTP postgres req/s / bare, {STARLETTE}, new keys"] == ("30%", True)
    # Only what ran is judged: no line for a store or traffic this run did not measure.
    assert not any("redis" in name or ("postgres" in name and "replays" in name) for name in got)


def test_only_the_memory_store_is_judged_on_the_flask_example() -> None:
    got = verdicts(
        [
            HTTPRow(FLASK, "bare", "new keys", load(1000)),
            HTTPRow(FLASK, "ours, memory", "new keys", load(850)),
            HTTPRow(FLASK, "ours, sqlite", "new keys", load(100)),
        ]
    )
    assert got == {f"HTTP memory req/s / bare, {FLASK}, new keys": ("85%", True)}


def test_redis_against_the_peer_needs_twice_its_new_keys_and_to_be_ahead_on_replays() -> None:
    peer = "asgi-idempotency-header, redis"
    got = verdicts(
        [
            HTTPRow(STARLETTE, "bare", "new keys", load(1000)),
            HTTPRow(STARLETTE, "ours, redis", "new keys", load(400)),
            HTTPRow(STARLETTE, peer, "new keys", load(200)),
            HTTPRow(STARLETTE, "ours, redis", "replays", load(600)),
            HTTPRow(STARLETTE, peer, "replays", load(600)),
        ]
    )
    assert got[f"HTTP ours, redis req/s / {peer}, new keys"] == ("2.00x", True)
    assert got[f"HTTP ours, redis req/s / {peer}, replays"] == ("1.00x", False)


def test_loop_health_allows_three_times_the_idle_p99() -> None:
    health = LoopHealth(1.0, 2.0, 3.0, 6.0, covered_rps=300, covered_errors=0, samples=200)
    got = verdicts([HTTPRow(STARLETTE, "bare", "new keys", load(1000))], health)
    assert got["GET /health p99 under load / idle"] == ("3.0x", True)
