"""Run an example app on a real HTTP server (uvicorn or gunicorn) in a subprocess.

The server listens on a free loopback port, its stdout and stderr go to a log file the test can
read (to check what the middleware logged), and ``stop`` ends it with SIGTERM, then SIGKILL. The
server runs in its own process group, so its worker processes end with it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.dynamodb_local import free_port

ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
_APP_SETTINGS_PREFIXES = ("IDEM_", "EXAMPLE_", "LOG_LEVEL")


@dataclass
class Server:
    """A running server: its base URL, its process and its log."""

    name: str
    base_url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    worker_pids: set[int] = field(default_factory=set)

    def log(self) -> str:
        """Everything the server wrote to stdout and stderr so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> None:
        """SIGTERM to the whole process group, SIGKILL if it has not exited in time."""
        if self.process.poll() is not None:
            return
        _signal_group(self.process, signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            # Still unreaped, so the group id cannot have been reused: kill master and workers.
            _signal_group(self.process, signal.SIGKILL)
            self.process.wait(timeout=STOP_TIMEOUT)


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
        *_GUNICORN_NO_CONTROL_SOCKET,
        *extra_args,
    ]


def _gunicorn_cli_flags() -> set[str]:
    try:
        from gunicorn.config import KNOWN_SETTINGS
    except ImportError:
        return set()
    return {flag for setting in KNOWN_SETTINGS for flag in (setting.cli or ())}


# Recent gunicorn versions open a control socket at one fixed path per user; servers started
# side by side (parallel test runs) would fight over it.
_GUNICORN_NO_CONTROL_SOCKET = (
    ["--no-control-socket"] if "--no-control-socket" in _gunicorn_cli_flags() else []
)


def start_uvicorn(
    app: str,
    *,
    env: Mapping[str, str],
    log_dir: Path,
    workers: int = 1,
    extra_args: Sequence[str] = (),
) -> Server:
    """``uvicorn <app> --workers N``, serving once GET /health answers from every worker."""
    return start(
        f"uvicorn-{workers}w",
        lambda port: uvicorn_command(app, port, workers=workers, extra_args=extra_args),
        env=env,
        log_dir=log_dir,
        workers=workers,
    )


def start_gunicorn(
    app: str,
    *,
    env: Mapping[str, str],
    log_dir: Path,
    workers: int = 1,
    threads: int = 1,
    extra_args: Sequence[str] = (),
) -> Server:
    """``gunicorn <app> --workers N --threads T``, serving once GET /health answers from every
    worker.
    """
    return start(
        f"gunicorn-{workers}w{threads}t",
        lambda port: gunicorn_command(
            app, port, workers=workers, threads=threads, extra_args=extra_args
        ),
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
    env: Mapping[str, str],
    log_dir: Path,
    workers: int = 1,
    attempts: int = 3,
) -> Server:
    """Start the server on a free port; another port when the one picked was taken meanwhile."""
    for attempt in range(1, attempts + 1):
        port = free_port()
        log_path = log_dir / f"{name}-{port}.log"
        server = _spawn(name, command(port), port, env, log_path)
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


class _PortTaken(RuntimeError):
    pass


def _spawn(
    name: str, command: Sequence[str], port: int, env: Mapping[str, str], log_path: Path
) -> Server:
    # The app's settings are what the test passes, never what the developer happens to export.
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(_APP_SETTINGS_PREFIXES)}
    full_env = {**inherited, **env}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    full_env["PYTHONUNBUFFERED"] = "1"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            list(command),
            cwd=ROOT,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the workers stop with it
        )
    return Server(name, f"http://127.0.0.1:{port}", process, log_path)


def _wait_until_serving(server: Server, workers: int) -> None:
    """Poll GET /health until every worker process has answered (each reports its pid)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    with ThreadPoolExecutor(max_workers=4) as pool:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                log = server.log()
                if "Address already in use" in log or "already in use" in log.lower():
                    raise _PortTaken(server.base_url)
                raise RuntimeError(
                    f"{server.name} exited with code {server.process.returncode}:\n{log}"
                )
            # A few requests at once, each on a new connection, so that every worker gets some.
            for pid in pool.map(lambda _: _health_pid(server.base_url), range(4)):
                if pid is not None:
                    server.worker_pids.add(pid)
            if len(server.worker_pids) >= workers:
                return
            time.sleep(0.1)
    raise RuntimeError(
        f"{server.name} at {server.base_url} did not serve /health from {workers} worker(s) "
        f"within {STARTUP_TIMEOUT}s (saw pids {sorted(server.worker_pids)}):\n{server.log()}"
    )


def _health_pid(base_url: str) -> int | None:
    try:
        with urllib.request.urlopen(f"{base_url}/health", timeout=2) as response:
            pid = json.loads(response.read()).get("pid")
    except (OSError, urllib.error.URLError, ValueError):
        return None
    return int(pid) if pid is not None else None


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)  # the group we created with start_new_session
