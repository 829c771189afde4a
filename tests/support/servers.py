"""Run an example app on a real HTTP server (uvicorn or gunicorn) in a subprocess.

The launcher lives in the package (:mod:`idem_middleware.demo.servers`), which the demo uses
too; this module runs it from the repository root, where ``example_apps`` is. The server listens
on a free loopback port, its stdout and stderr go to a log file the test can read (to check what
the middleware logged), and ``stop`` ends it with SIGTERM, then SIGKILL.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from idem_middleware.demo import servers as _servers
from idem_middleware.demo.servers import Server, gunicorn_command, running, uvicorn_command

__all__ = [
    "ROOT",
    "Server",
    "gunicorn_command",
    "running",
    "start_gunicorn",
    "start_uvicorn",
    "uvicorn_command",
]

ROOT = Path(__file__).resolve().parents[2]


def start_uvicorn(
    app: str,
    *,
    env: Mapping[str, str],
    log_dir: Path,
    workers: int = 1,
    extra_args: Sequence[str] = (),
) -> Server:
    """``uvicorn <app> --workers N``, serving once GET /health answers from every worker."""
    return _servers.start_uvicorn(
        app, root=ROOT, env=env, log_dir=log_dir, workers=workers, extra_args=extra_args
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
    return _servers.start_gunicorn(
        app,
        root=ROOT,
        env=env,
        log_dir=log_dir,
        workers=workers,
        threads=threads,
        extra_args=extra_args,
    )
