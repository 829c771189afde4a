"""Start a private ``redis-server``: for the test session, the benchmarks and the demo.

The server listens on a free port of 127.0.0.1, keeps nothing on disk, and is stopped at the end.
Where the ``redis-server`` binary is missing, the tests use ``IDEM_TEST_REDIS_URL`` (default
``redis://127.0.0.1:6379/0``) instead, and say so.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

from tooling.processes import free_port, spawn, stop, wait_until

DEFAULT_EXTERNAL_URL = "redis://127.0.0.1:6379/0"


@dataclass
class RedisServer:
    url: str
    implementation: str  # "private redis-server <version> on port N" or "external server at ..."
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    workdir: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False)

    @property
    def private(self) -> bool:
        """Whether this server was started for the session (and may be flushed freely)."""
        return self.process is not None

    def is_serving(self) -> bool:
        return ping(self.url)

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)
            self.process = None
        if self.workdir is not None:
            self.workdir.cleanup()
            self.workdir = None


def ping(url: str, timeout: float = 1.0) -> bool:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def wait_until_serving(
    url: str, process: subprocess.Popen[bytes] | None, timeout: float = 15.0
) -> None:
    wait_until(
        lambda: ping(url, timeout=0.5),
        what=f"redis-server at {url}",
        timeout=timeout,
        process=process,
        interval=0.05,
    )


def start() -> RedisServer:
    """A private redis-server when the binary exists, else the external server (unchecked:
    callers use :meth:`RedisServer.is_serving` to decide whether to skip).
    """
    binary = shutil.which("redis-server")
    if binary is None:
        url = os.environ.get("IDEM_TEST_REDIS_URL", DEFAULT_EXTERNAL_URL)
        print(
            f"\n*** redis-server is not installed: Redis tests use the external server at {url} "
            "(set IDEM_TEST_REDIS_URL to choose another) ***",
            file=sys.stderr,
        )
        return RedisServer(url, f"external server at {url}")
    version = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, check=False
    ).stdout.split()
    version_text = next((part[2:] for part in version if part.startswith("v=")), "?")
    workdir = tempfile.TemporaryDirectory(prefix="idem-redis-")
    last_error: Exception | None = None
    for _attempt in range(3):  # another process may take the free port before we bind it
        port = free_port()
        process = spawn(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                workdir.name,
            ]
        )
        url = f"redis://127.0.0.1:{port}/0"
        try:
            wait_until_serving(url, process)
        except RuntimeError as exc:
            last_error = exc
            stop(process)
            continue
        except BaseException:
            stop(process)
            workdir.cleanup()
            raise
        return RedisServer(
            url, f"private redis-server {version_text} on port {port}", process, workdir
        )
    workdir.cleanup()
    raise RuntimeError(f"could not start redis-server: {last_error}")
