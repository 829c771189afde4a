"""Start a private ``redis-server``: for the test session, the benchmarks and the demo.

The server listens on a free port of 127.0.0.1, keeps nothing on disk, and is stopped at the end.
Where the ``redis-server`` binary is missing, the tests use ``IDEM_TEST_REDIS_URL`` (default
``redis://127.0.0.1:6379/0``) instead, and say so.

:func:`start_cluster` starts a private Redis Cluster the same way: three ``redis-server
--cluster-enabled yes`` nodes joined by ``redis-cli --cluster create`` (no replicas).
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

from tooling.processes import free_port, listens_on, spawn, stop, wait_until

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
    """Until ``url`` answers PING, from ``process`` when given: a server that took the port
    first would answer too, until ours exits (then ``RuntimeError``, and the caller retries).
    """
    port = int(url.rsplit(":", 1)[1].split("/", 1)[0])
    wait_until(
        lambda: ping(url, timeout=0.5) and (process is None or listens_on(process, port)),
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


@dataclass
class RedisClusterServer:
    """A private Redis Cluster: ``url`` names one node, from which clients learn the others."""

    url: str
    implementation: str
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list, repr=False)
    workdir: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False)

    def stop(self) -> None:
        for process in self.processes:
            stop(process)
        self.processes = []
        if self.workdir is not None:
            self.workdir.cleanup()
            self.workdir = None


def start_cluster(nodes: int = 3, timeout: float = 30.0) -> RedisClusterServer:
    """``nodes`` private redis-servers in cluster mode, every slot assigned and the cluster
    state ``ok``. Raises ``RuntimeError`` where redis-server or redis-cli is missing.
    """
    binary, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if binary is None or cli is None:
        raise RuntimeError("a Redis Cluster needs the redis-server and redis-cli binaries")
    last_error: Exception | None = None
    for _attempt in range(3):  # another process may take a free port before a node binds it
        workdir = tempfile.TemporaryDirectory(prefix="idem-redis-cluster-")
        ports = _cluster_ports(nodes)
        processes = [_spawn_node(binary, port, workdir.name) for port in ports]
        cluster = RedisClusterServer(
            f"redis://127.0.0.1:{ports[0]}/0",
            f"private Redis Cluster of {nodes} nodes on ports {', '.join(map(str, ports))}",
            processes,
            workdir,
        )
        try:
            for port, process in zip(ports, processes, strict=True):
                wait_until_serving(f"redis://127.0.0.1:{port}/0", process)
            subprocess.run(
                [
                    cli,
                    "--cluster",
                    "create",
                    *(f"127.0.0.1:{port}" for port in ports),
                    "--cluster-replicas",
                    "0",
                    "--cluster-yes",
                ],
                check=True,
                capture_output=True,
                timeout=timeout,
            )
            for port, process in zip(ports, processes, strict=True):
                wait_until(
                    functools.partial(_cluster_ok, port),
                    what=f"Redis Cluster node on port {port}",
                    timeout=timeout,
                    process=process,
                )
        except (RuntimeError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            last_error = exc
            cluster.stop()
            continue
        except BaseException:
            cluster.stop()
            raise
        return cluster
    raise RuntimeError(f"could not start a Redis Cluster: {last_error}")


def _spawn_node(binary: str, port: int, directory: str) -> subprocess.Popen[bytes]:
    return spawn(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            f"nodes-{port}.conf",
            "--cluster-node-timeout",
            "5000",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            directory,
        ]
    )


def _cluster_ports(nodes: int) -> list[int]:
    """Free ports whose cluster bus port (the port + 10000) is free and valid too."""
    ports: list[int] = []
    while len(ports) < nodes:
        port = free_port()
        if port + 10000 <= 65535 and port not in ports and _bindable(port + 10000):
            ports.append(port)
    return ports


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _cluster_ok(port: int) -> bool:
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
    try:
        info = client.execute_command("CLUSTER INFO")  # type: ignore[no-untyped-call]
    except redis.RedisError:
        return False
    finally:
        client.close()
    # redis-py parses the reply into a dict of its fields.
    return isinstance(info, dict) and info.get("cluster_state") in ("ok", b"ok")
