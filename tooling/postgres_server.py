"""The PostgreSQL server of the test session, and a database of the session's own on it.

A server answering at ``IDEM_TEST_POSTGRES_DSN`` (default: trust auth as ``postgres`` on
127.0.0.1:5432) is used as it is; where none answers, a private one is started with ``initdb``
and ``pg_ctl`` in a temporary directory (``PATH``, then ``/usr/lib/postgresql/*/bin``), on a free
port of 127.0.0.1, and stopped at the end. PostgreSQL refuses to run as root, so under root the
private server runs as the ``postgres`` system user. Either way the session works in a database
it creates under a unique name and drops at the end.

``IDEM_TEST_POSTGRES_PRIVATE=1`` starts the private server even where the external one answers:
``make test`` sets it, so that sessions running side by side (one per Python) cannot exhaust
the shared server's ``max_connections`` for each other (a pool test alone opens 50).
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass, field

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tooling.processes import free_port

DEFAULT_EXTERNAL_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
SYSTEM_USER = "postgres"  # the private server's owner when the tests run as root


@dataclass
class PostgresServer:
    admin_conninfo: str  # the maintenance database, for CREATE / DROP DATABASE
    implementation: str  # "external server at ..." or "private PostgreSQL ... on port N"
    pg_ctl: list[str] | None = field(default=None, repr=False)  # command prefix; None: external
    workdir: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False)

    @property
    def private(self) -> bool:
        return self.pg_ctl is not None

    def create_database(self) -> tuple[str, str]:
        """A new, empty database: its name and a conninfo string to it."""
        name = f"idem_test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.admin_conninfo, autocommit=True, connect_timeout=5) as conn:
            conn.execute(
                sql.SQL("CREATE DATABASE {} ENCODING 'UTF8' TEMPLATE template0").format(
                    sql.Identifier(name)
                )
            )
        return name, make_conninfo(self.admin_conninfo, dbname=name)

    def drop_database(self, name: str) -> None:
        with psycopg.connect(self.admin_conninfo, autocommit=True, connect_timeout=5) as conn:
            # FORCE: a connection some test leaked must not keep the database alive.
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    def stop(self) -> None:
        if self.pg_ctl is not None and self.workdir is not None:
            subprocess.run(
                [*self.pg_ctl, "stop", "-D", _data_dir(self.workdir.name), "-m", "fast", "-w"],
                capture_output=True,
                check=False,
                timeout=60,
            )
            self.pg_ctl = None
        if self.workdir is not None:
            self.workdir.cleanup()
            self.workdir = None


def answers(conninfo: str, timeout: int = 2) -> bool:
    try:
        with psycopg.connect(conninfo, connect_timeout=timeout) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error:
        return False
    return True


def start() -> PostgresServer:
    """The external server when it answers (unless ``IDEM_TEST_POSTGRES_PRIVATE``), else a
    private one (RuntimeError when neither).
    """
    if os.environ.get("IDEM_TEST_POSTGRES_PRIVATE", "") not in ("", "0"):
        return start_private()
    dsn = os.environ.get("IDEM_TEST_POSTGRES_DSN", DEFAULT_EXTERNAL_DSN)
    if answers(dsn):
        params = conninfo_to_dict(dsn)
        where = f"{params.get('host', 'localhost')}:{params.get('port', '5432')}"
        return PostgresServer(dsn, f"external PostgreSQL server at {where}")
    return start_private()


def start_private() -> PostgresServer:
    initdb, pg_ctl = _binary("initdb"), _binary("pg_ctl")
    prefix = _run_as_prefix()
    workdir = tempfile.TemporaryDirectory(prefix="idem-postgres-")
    try:
        if prefix:
            owner = pwd.getpwnam(SYSTEM_USER)
            os.chown(workdir.name, owner.pw_uid, owner.pw_gid)
        data = _data_dir(workdir.name)
        init = subprocess.run(
            [
                *prefix,
                initdb,
                "-D",
                data,
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed: {init.stderr.strip()}")
        banner = subprocess.run(
            [initdb, "--version"], capture_output=True, text=True, check=False
        ).stdout
        found = re.search(r"\d+(?:\.\d+)+", banner)
        version = found.group(0) if found else "?"
        last_error = ""
        for _attempt in range(3):  # another process may take the free port before we bind it
            port = free_port()
            options = (
                f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={workdir.name}"
                " -c fsync=off -c max_connections=200"
            )
            started = subprocess.run(
                [
                    *prefix,
                    pg_ctl,
                    "start",
                    "-D",
                    data,
                    "-o",
                    options,
                    "-l",
                    os.path.join(workdir.name, "server.log"),
                    "-w",
                    "-t",
                    "60",
                ],
                capture_output=True,
                text=True,
                check=False,
                timeout=120,
            )
            if started.returncode == 0:
                admin = f"host=127.0.0.1 port={port} user=postgres dbname=postgres"
                return PostgresServer(
                    admin,
                    f"private PostgreSQL {version} started with pg_ctl on port {port}",
                    [*prefix, pg_ctl],
                    workdir,
                )
            last_error = started.stderr.strip() or _tail(os.path.join(workdir.name, "server.log"))
        raise RuntimeError(f"could not start PostgreSQL with pg_ctl: {last_error}")
    except BaseException:
        workdir.cleanup()
        raise


def _binary(name: str) -> str:
    found = shutil.which(name)
    if found is not None:
        return found
    candidates = sorted(
        glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
        key=lambda path: int(path.split("/")[4]) if path.split("/")[4].isdigit() else 0,
    )
    if not candidates:
        raise RuntimeError(
            f"no PostgreSQL answers at IDEM_TEST_POSTGRES_DSN and {name} is not installed"
        )
    return candidates[-1]


def _run_as_prefix() -> list[str]:
    if os.geteuid() != 0:
        return []
    runuser = shutil.which("runuser")
    if runuser is None:
        raise RuntimeError("PostgreSQL will not run as root and runuser is not installed")
    return [runuser, "-u", SYSTEM_USER, "--"]


def _data_dir(workdir: str) -> str:
    return os.path.join(workdir, "data")


def _tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as log:
            return "".join(log.readlines()[-lines:]).strip()
    except OSError:
        return ""
