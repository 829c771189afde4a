"""Run an app of the checkout on a real HTTP server (uvicorn or gunicorn) in a subprocess.

Shared by the demo, the end-to-end tests and the benchmarks. The server listens on a free
loopback port, its stdout and stderr go to a log file, and ``stop`` ends it and its workers
(:func:`tooling.processes.stop`). Standard library only.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tooling import ROOT
from tooling.processes import free_port, listens_on, spawn
from tooling.processes import stop as stop_process

STARTUP_TIMEOUT = 30.0
#: Environment variables that configure the example apps: a server gets the ones its caller
#: passes, never the ones the developer happens to have exported.
APP_SETTINGS_PREFIXES = ("IDEM_", "EXAMPLE_", "LOG_LEVEL")


@dataclass
class Server:
    """A running server: its base URL, its process and its log."""

    name: str
    base_url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    port: int
    worker_pids: set[int] = field(default_factory=set)

    def log(self) -> str:
        """Everything the server wrote to stdout and stderr so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> None:
        """The server and its workers: SIGTERM, then SIGKILL if they have not exited in time."""
        stop_process(self.process)


def uvicorn_command(
    app: str, port: int, *, workers: int = 1, extra_args: Sequence[str] = ()
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "uvicorn",
        app,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--no-access-log",
        "--timeout-graceful-shutdown",
        "3",
        *extra_args,
    ]


def gunicorn_command(
    app: str, port: int, *, workers: int = 1, threads: int = 1, extra_args: Sequence[str] = ()
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "gunicorn",
        app,
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        str(workers),
        "--threads",
        str(threads),
        "--graceful-timeout",
        "3",
        "--timeout",
        "30",
        *_gunicorn_no_control_socket(),
        *extra_args,
    ]


def _gunicorn_no_control_socket() -> list[str]:
    """Recent gunicorn versions open a control socket at one fixed path per user; servers started
    side by side (parallel test runs, a demo next to a test run) would fight over it.
    """
    try:
        settings = importlib.import_module("gunicorn.config").KNOWN_SETTINGS
    except ImportError:
        return []
    flags = {flag for setting in settings for flag in (setting.cli or ())}
    return ["--no-control-socket"] if "--no-control-socket" in flags else []


def start_uvicorn(
    app: str,
    *,
    root: Path = ROOT,
    env: Mapping[str, str],
    log_dir: Path,
    workers: int = 1,
    extra_args: Sequence[str] = (),
) -> Server:
    """``uvicorn <app> --workers N`` run from ``root`` (where ``app``'s package is), serving
    once GET /health answers from every worker.
    """
    return start(
        f"uvicorn-{workers}w",
        lambda port: uvicorn_command(app, port, workers=workers, extra_args=extra_args),
        root=root,
        env=env,
        log_dir=log_dir,
        workers=workers,
    )


def start_gunicorn(
    app: str,
    *,
    root: Path = ROOT,
    env: Mapping[str, str],
    log_dir: Path,
    workers: int = 1,
    threads: int = 1,
    extra_args: Sequence[str] = (),
) -> Server:
    """``gunicorn <app> --workers N --threads T`` run from ``root``, serving once GET /health
    answers from every worker.
    """
    return start(
        f"gunicorn-{workers}w{threads}t",
        lambda port: gunicorn_command(
            app, port, workers=workers, threads=threads, extra_args=extra_args
        ),
        root=root,
        env=env,
        log_dir=log_dir,
        workers=workers,
    )


@contextlib.contextmanager
def running(server: Server) -> Iterator[Server]:
    """Stop the server when the block ends, and show its log when the block failed."""
    try:
        yield server
    except BaseException:
        sys.stderr.write(f"\n--- {server.name} log ---\n{server.log()}\n")
        raise
    finally:
        server.stop()


def start(
    name: str,
    command: Callable[[int], Sequence[str]],
    *,
    root: Path = ROOT,
    env: Mapping[str, str],
    log_dir: Path,
    workers: int = 1,
    attempts: int = 3,
) -> Server:
    """Start the server on a free port; another port when the one picked was taken meanwhile.

    Raises :class:`ServerStartError` (with the server's log) when it exits or does not serve
    in time; the server is stopped then, as it is on any other exception (Ctrl-C included).
    """
    for attempt in range(1, attempts + 1):
        port = free_port()
        log_path = log_dir / f"{name}-{port}.log"
        server = _spawn(name, command(port), port, root, env, log_path)
        try:
            _wait_until_serving(server, workers)
        except _PortTaken:
            server.stop()
            if attempt == attempts:
                raise
            continue
        except BaseException:
            server.stop()
            raise
        return server
    raise AssertionError("unreachable")  # pragma: no cover


class ServerStartError(RuntimeError):
    """The server exited, or did not answer GET /health in time. ``log`` is what it wrote."""

    def __init__(self, message: str, log: str) -> None:
        super().__init__(f"{message}:\n{log}")
        self.summary = message
        self.log = log


class _PortTaken(ServerStartError):
    pass


def _spawn(
    name: str,
    command: Sequence[str],
    port: int,
    root: Path,
    env: Mapping[str, str],
    log_path: Path,
) -> Server:
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(APP_SETTINGS_PREFIXES)}
    full_env = {**inherited, **env}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    full_env["PYTHONUNBUFFERED"] = "1"
    with log_path.open("wb") as log:
        process = spawn(command, cwd=root, env=full_env, output=log)
    return Server(name, f"http://127.0.0.1:{port}", process, log_path, port)


def _wait_until_serving(server: Server, workers: int) -> None:
    """Poll GET /health until every worker process has answered (each reports its pid)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    with ThreadPoolExecutor(max_workers=4) as pool:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                log = server.log()
                if "already in use" in log.lower():
                    raise _PortTaken(f"{server.base_url} was taken", log)
                raise ServerStartError(
                    f"{server.name} exited with code {server.process.returncode}", log
                )
            # A server that took the port first would answer too, until ours exits: only our
            # own server's answers count.
            if not listens_on(server.process, server.port):
                time.sleep(0.1)
                continue
            # A few requests at once, each on a new connection, so that every worker gets some.
            for pid in pool.map(lambda _: _health_pid(server.base_url), range(4)):
                if pid is not None:
                    server.worker_pids.add(pid)
            if len(server.worker_pids) >= workers:
                return
            time.sleep(0.1)
    raise ServerStartError(
        f"{server.name} at {server.base_url} did not serve /health from {workers} worker(s) "
        f"within {STARTUP_TIMEOUT:.0f}s (saw pids {sorted(server.worker_pids)})",
        server.log(),
    )


def _health_pid(base_url: str) -> int | None:
    try:
        with urllib.request.urlopen(f"{base_url}/health", timeout=2) as response:
            pid = json.loads(response.read()).get("pid")
    except (OSError, urllib.error.URLError, ValueError):
        return None
    return int(pid) if pid is not None else None
