"""Processes of the services the checkout starts: one way to pick a port, wait and stop.

A service runs in its own session (``start_new_session``), hence its own process group, so a
Ctrl-C in the terminal reaches only the caller, which stops it; :func:`stop` signals the whole
group, so worker processes end with their master.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

STOP_TIMEOUT = 10.0


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def spawn(
    command: Sequence[str],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    output: IO[bytes] | int = subprocess.DEVNULL,
) -> subprocess.Popen[bytes]:
    """Start ``command`` in its own process group, stdin closed, output to ``output``."""
    return subprocess.Popen(
        list(command),
        cwd=cwd,
        env=None if env is None else dict(env),
        stdin=subprocess.DEVNULL,
        stdout=output,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop(process: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM to the process's group, SIGKILL if it has not exited in time; reaped either way."""
    if process.poll() is not None:
        return
    _signal_group(process, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        # Still unreaped, so the group id cannot have been reused: kill master and workers.
        _signal_group(process, signal.SIGKILL)
        process.wait(timeout=timeout)


def wait_until(
    ready: Callable[[], bool],
    *,
    what: str,
    timeout: float,
    process: subprocess.Popen[bytes] | None = None,
    interval: float = 0.1,
) -> None:
    """Poll ``ready()`` until it is true; ``RuntimeError`` when ``process`` exits or time is up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode}")
        if ready():
            return
        time.sleep(interval)
    raise RuntimeError(f"{what} did not answer within {timeout:g}s")


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)  # the group spawn created with start_new_session
