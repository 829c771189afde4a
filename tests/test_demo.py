"""The demo, run as ``make demo`` runs it: ``python -m tooling.demo`` in a subprocess.

It starts real servers (uvicorn, gunicorn), so it must also stop them: the tests check that no
process the demo started is left behind, after a normal run and after Ctrl-C.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from idem_middleware.persistence import from_url
from tooling import demo
from tooling.demo import stores
from tooling.demo.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
DEMO = [sys.executable, "-m", "tooling.demo"]


def demo_env() -> dict[str, str]:
    # The demo sets the apps' settings itself; none of the developer's may leak in.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IDEM_", "EXAMPLE_"))}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def listening(port: int) -> bool:
    """Whether something accepts connections on the loopback port."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return False
    return True


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (Linux /proc), including those in other sessions."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found: set[int] = set()
    pending = [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            if child not in found:
                found.add(child)
                pending.append(child)
    return found


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.e2e
def test_demo_on_sqlite_holds_every_expectation() -> None:
    result = subprocess.run(
        [*DEMO, "--store", "sqlite"],
        cwd=ROOT,
        env=demo_env(),
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "✓ All 14 expectations held: one charge per payment" in out
    assert "✗" not in out
    assert "1. FastAPI on uvicorn (duplicates wait up to 5 s)" in out
    assert "2. Flask on gunicorn (2 worker processes, 4 threads each)" in out
    assert out.count("✓") == 2 * 7 + 1, "seven steps per server, each held, and the verdict"
    assert out.count("payments_created: 1") == 2
    assert out.count("exports_created: 1") == 2
    # The first server let the concurrent retries wait for the answer; the second said 409.
    assert "20 waited" in out
    assert "got 409" in out
    # Both servers are gone: nothing listens on their ports any more.
    ports = re.findall(r"http://127\.0\.0\.1:(\d+)", out)
    assert len(set(ports)) == 2, out
    for port in set(ports):
        assert not listening(int(port)), f"a server still listens on port {port}"


@pytest.mark.e2e
@pytest.mark.redis
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs the redis-server binary")
def test_demo_starts_and_stops_its_own_redis_server() -> None:
    result = subprocess.run(
        [*DEMO, "--store", "redis-local"],
        cwd=ROOT,
        env=demo_env(),
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "✓ All 14 expectations held" in result.stdout
    port = re.search(r"Idempotency store: Redis at redis://127\.0\.0\.1:(\d+)/0", result.stdout)
    assert port, result.stdout
    assert not listening(int(port[1])), "the demo's redis-server still listens"


def postgres_schema_exists(conninfo: str, schema: str) -> bool:
    import psycopg

    with psycopg.connect(conninfo, autocommit=True) as connection:
        row = connection.execute(
            "SELECT count(*) FROM pg_namespace WHERE nspname = %s", (schema,)
        ).fetchone()
    return row is not None and row[0] == 1


@pytest.mark.e2e
@pytest.mark.postgres
def test_demo_on_postgres_drops_its_table(postgres_conninfo: str) -> None:
    """IDEM_DEMO_POSTGRES_DSN names the server (here as a libpq key=value string): the demo's
    table is made with create_table() in a schema of its own, and dropped at the end.
    """
    env = {**demo_env(), "IDEM_DEMO_POSTGRES_DSN": postgres_conninfo}
    result = subprocess.run(
        [*DEMO, "--store", "postgres"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "✓ All 14 expectations held" in result.stdout
    assert "2. Flask on gunicorn (2 worker processes" in result.stdout, "a store shared by workers"
    table = re.search(
        r"Idempotency store: PostgreSQL table (idem_demo_[0-9a-f]{12})\.idempotency_records",
        result.stdout,
    )
    assert table, result.stdout
    assert not postgres_schema_exists(postgres_conninfo, table[1]), "the demo's table was kept"


def has_initdb() -> bool:
    return bool(shutil.which("initdb") or glob.glob("/usr/lib/postgresql/*/bin/initdb"))


@pytest.mark.postgres
@pytest.mark.skipif(not has_initdb(), reason="needs PostgreSQL's initdb and pg_ctl")
def test_demo_starts_a_private_postgres_when_none_answers(
    monkeypatch: pytest.MonkeyPatch, closed_port: int
) -> None:
    monkeypatch.delenv("IDEM_DEMO_POSTGRES_DSN", raising=False)
    monkeypatch.setattr(
        stores, "DEFAULT_POSTGRES_DSN", f"postgresql://postgres@127.0.0.1:{closed_port}/postgres"
    )

    with contextlib.ExitStack() as services:
        store = stores.postgres(services)
        assert "a private server, started for the demo" in store.description
        url = store.url(Path("unused"), 1)
        port = int(re.findall(r"127\.0\.0\.1:(\d+)", url)[0])
        assert listening(port)
        layer = from_url(url)  # as the apps build it
        try:
            layer.check()  # the table exists, in the schema the URL puts first on the path
        finally:
            layer.close()  # type: ignore[attr-defined]

    assert not listening(port), "the demo's PostgreSQL server still listens"


@pytest.mark.e2e
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="walks /proc to find processes")
@pytest.mark.parametrize(
    ("sig", "exit_code"),
    [pytest.param(signal.SIGINT, 130, id="ctrl-c"), pytest.param(signal.SIGTERM, 143, id="term")],
)
def test_interrupted_demo_stops_its_servers(sig: signal.Signals, exit_code: int) -> None:
    demo = subprocess.Popen(
        [*DEMO, "--store", "sqlite"],
        cwd=ROOT,
        env=demo_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A run started in the background of a non-interactive shell (nohup, `cmd &`, some CI
        # runners) inherits SIGINT ignored, and Python keeps it so: a terminal's Ctrl-C is what
        # this test is about, so the demo gets the default handling whatever the test inherited.
        preexec_fn=_default_sigint,
    )
    try:
        # Wait until a server runs (uvicorn and its worker, in their own session).
        deadline = time.monotonic() + 30
        servers: set[int] = set()
        while time.monotonic() < deadline and not any(
            "uvicorn" in command_line(pid) for pid in servers
        ):
            time.sleep(0.1)
            servers = descendants(demo.pid)
        assert servers, "the demo started no server"

        demo.send_signal(sig)
        out, err = demo.communicate(timeout=30)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()

    assert demo.returncode == exit_code, out + err
    assert "Traceback" not in err
    # The demo has exited; its servers' workers may take a moment longer to be reaped.
    deadline = time.monotonic() + 30
    while (left := {pid for pid in servers if alive(pid)}) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"processes left behind: {left}"


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 1
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("demo: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_demo_on_an_unreachable_store_starts_no_server(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, closed_port: int
) -> None:
    def no_server(*args: object, **kwargs: object) -> None:
        raise AssertionError("a server was started")

    monkeypatch.setattr("tooling.demo.run.start_uvicorn", no_server)
    monkeypatch.setattr("tooling.demo.run.start_gunicorn", no_server)
    port = closed_port

    code = main(["--store", "redis", "--redis-url", f"redis://app:s3cret@127.0.0.1:{port}/0"])
    err = capsys.readouterr().err
    assert_one_line_error(code, err, f"cannot use Redis at redis://app:***@127.0.0.1:{port}/0")
    assert "s3cret" not in err

    code = main(["--store", "dynamodb", "--endpoint-url", f"http://127.0.0.1:{port}"])
    assert_one_line_error(
        code, capsys.readouterr().err, f"cannot use DynamoDB at http://127.0.0.1:{port}"
    )

    # A server named by IDEM_DEMO_POSTGRES_DSN is not replaced by a private one.
    monkeypatch.setenv("IDEM_DEMO_POSTGRES_DSN", f"postgresql://app:s3cret@127.0.0.1:{port}/db")
    code = main(["--store", "postgres"])
    err = capsys.readouterr().err
    assert_one_line_error(
        code,
        err,
        f"cannot use PostgreSQL at postgresql://app:***@127.0.0.1:{port}/db",
        "Connection refused",
    )
    assert "s3cret" not in err


def test_demo_names_its_missing_dependencies(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(demo, "DEMO_DEPENDENCIES", (*demo.DEMO_DEPENDENCIES, "no_such_module"))

    code = main([])

    assert_one_line_error(code, capsys.readouterr().err, "needs no_such_module", "make demo")
