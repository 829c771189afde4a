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


def listens_on(process: subprocess.Popen[bytes], port: int) -> bool:
    """Whether ``process`` itself holds the socket listening on 127.0.0.1:``port``.

    A service told to listen on a :func:`free_port` answers there, but so would another
    process that took the port first (a service of a test session running side by side), until
    ours gives up and exits: whoever answers must be ours. Read from Linux's ``/proc``; where
    there is none, the answer is True (and the caller relies on the service exiting instead).
    """
    inodes = _listening_inodes(port)
    if inodes is None:
        return True
    fd_dir = Path(f"/proc/{process.pid}/fd")
    try:
        links = [os.readlink(fd_dir / fd) for fd in os.listdir(fd_dir)]
    except OSError:
        return False  # exited meanwhile
    return any(link in inodes for link in links)


def _listening_inodes(port: int) -> set[str] | None:
    """The ``socket:[inode]`` names of the TCP sockets listening on ``port``; None without
    ``/proc/net/tcp``.
    """
    found: set[str] = set()
    tables = [Path("/proc/net/tcp"), Path("/proc/net/tcp6")]
    if not tables[0].exists():
        return None
    for table in tables:
        try:
            lines = table.read_text(encoding="ascii").splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                found.add(f"socket:[{inode}]")
    return found


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
