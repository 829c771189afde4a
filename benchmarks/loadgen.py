"""HTTP load over loopback: ``wrk`` when it is installed, else a small asyncio client.

Either way: a fixed number of keep-alive connections, each sending its next request as soon as
the last one is answered, for a bounded duration; the result is requests per second and the
latency percentiles of the answered requests. ``wrk`` (C, epoll) is preferred because on a small
machine a Python client takes CPU from the server it measures; the fallback is there so that the
benchmark runs anywhere (``apt-get install wrk`` for the better numbers).

Each request is a ``POST`` with a JSON body and an ``Idempotency-Key`` made from a prefix and a
counter: ``keys=None`` gives every request a new key, ``keys=N`` cycles over ``N`` keys that the
caller has already used (replays).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

WRK_SCRIPT = r"""
local threads = {}
local thread_count = 0

function setup(thread)
  thread_count = thread_count + 1
  thread:set("thread_id", thread_count)
  table.insert(threads, thread)
end

function init(args)
  prefix = args[1]
  cycle = tonumber(args[2])
  counter = 0
  headers = {}
  for i = 3, #args, 2 do headers[args[i]] = args[i + 1] end
end

function request()
  counter = counter + 1
  local n = counter
  if cycle > 0 then
    -- replays: every thread walks the same prepared keys, from its own offset
    n = (counter * 7 + thread_id * 131) % cycle
  else
    n = thread_id .. "-" .. counter
  end
  headers["Idempotency-Key"] = prefix .. n
  return wrk.format(nil, nil, headers, body)
end

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, '
    .. '"errors": %d, "status_errors": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    errors.connect + errors.read + errors.write + errors.timeout, errors.status))
end
"""


@dataclass
class LoadResult:
    generator: str
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int  # connection errors, timeouts and 4xx/5xx answers

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


@dataclass
class Load:
    url: str  # e.g. http://127.0.0.1:8123/orders
    body: bytes
    headers: dict[str, str]
    key_prefix: str
    keys: int | None = None  # None: a new key per request; N: cycle over prefix0..prefixN-1
    connections: int = 32
    seconds: float = 5.0

    def key(self, n: int) -> str:
        return f"{self.key_prefix}{n}"


def generator_name() -> str:
    return "wrk" if shutil.which("wrk") else "asyncio client (wrk not installed)"


def run(load: Load) -> LoadResult:
    if shutil.which("wrk"):
        return _run_wrk(load)
    return asyncio.run(_run_asyncio(load))


def _run_wrk(load: Load) -> LoadResult:
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "load.lua"
        body = json.dumps(load.body.decode())
        script.write_text(f'wrk.method = "POST"\nbody = {body}\n{WRK_SCRIPT}')
        header_args = [part for pair in load.headers.items() for part in pair]
        command = [
            "wrk",
            f"--threads={min(2, load.connections)}",
            f"--connections={load.connections}",
            f"--duration={max(1, round(load.seconds))}s",
            "--timeout=10s",
            f"--script={script}",
            load.url,
            "--",
            load.key_prefix,
            str(load.keys or 0),
            *header_args,
        ]
        completed = subprocess.run(command, capture_output=True, text=True, check=True)
    line = next(ln for ln in reversed(completed.stdout.splitlines()) if ln.startswith("{"))
    report = json.loads(line)
    return LoadResult(
        "wrk",
        report["requests"],
        report["duration_us"] / 1e6,
        report["p50_us"] / 1000,
        report["p99_us"] / 1000,
        report["errors"] + report["status_errors"],
    )


async def _run_asyncio(load: Load) -> LoadResult:
    parts = urlsplit(load.url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    latencies: list[float] = []
    errors = 0
    counter = 0
    deadline = time.perf_counter() + load.seconds
    fixed = "".join(f"{name}: {value}\r\n" for name, value in load.headers.items())

    def next_request(connection: int) -> bytes:
        nonlocal counter
        counter += 1
        n = (counter * 7 + connection * 131) % load.keys if load.keys else f"{connection}-{counter}"
        head = (
            f"POST {parts.path or '/'} HTTP/1.1\r\nHost: {host}:{port}\r\n{fixed}"
            f"Idempotency-Key: {load.key_prefix}{n}\r\n"
            f"Content-Length: {len(load.body)}\r\n\r\n"
        )
        return head.encode("latin-1") + load.body

    async def connection(index: int) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                writer.write(next_request(index))
                status_line = await reader.readline()
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode("latin-1").partition(":")
                    if name.lower() == "content-length":
                        length = int(value)
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - started)
                if int(status_line.split()[1]) >= 400:
                    errors += 1
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(connection(i) for i in range(load.connections)))
    elapsed = time.perf_counter() - started
    ordered = sorted(latencies)
    return LoadResult(
        "asyncio",
        len(latencies),
        elapsed,
        statistics.median(ordered) * 1000,
        ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000,
        errors,
    )
