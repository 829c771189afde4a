"""The idempotency store the demo's apps use, as the store URL they read (``IDEM_STORE_URL``).

DynamoDB's and PostgreSQL's tables are created and Redis is asked to answer before any server
starts, so a store that cannot be used is one line (the layer's own message), not a server log.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from idem_middleware.cli.errors import one_line
from idem_middleware.exceptions import IdempotencyPersistenceLayerError
from idem_middleware.persistence import from_url
from idem_middleware.persistence.url import redacted
from tooling.demo import DemoError

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
#: Where ``--store postgres`` looks when ``IDEM_DEMO_POSTGRES_DSN`` is not set; when nothing
#: answers there, the demo starts a private server.
DEFAULT_POSTGRES_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
DEMO_TABLE = "idem-middleware-demo"
#: A region for DynamoDB Local when none is configured: it accepts any.
LOCAL_ENDPOINT_REGION = "us-east-1"
#: A payment request should not wait a minute on an unreachable store.
DYNAMODB_CLIENT = {"connect_timeout": "1", "read_timeout": "3", "max_attempts": "2"}


@dataclass(frozen=True)
class DemoStore:
    """A store for the demo: ``url(workdir, index)`` is the URL of deployment ``index``."""

    name: str  # memory, sqlite, dynamodb, redis or postgres
    description: str
    url: Callable[[Path, int], str]

    @property
    def shared_by_processes(self) -> bool:
        """The memory store lives in one process: a server using it must have one worker."""
        return self.name != "memory"


def memory() -> DemoStore:
    return DemoStore(
        "memory", "memory (one process: each server runs one worker)", lambda _, __: "memory://"
    )


def sqlite() -> DemoStore:
    return DemoStore(
        "sqlite",
        "SQLite, a file in a temporary directory, shared by workers",
        lambda work, index: f"sqlite:///{work}/idempotency-{index}.sqlite3",
    )


def redis(url: str | None) -> DemoStore:
    url = url or DEFAULT_REDIS_URL
    shown = redacted(url)
    try:
        from_url(url).check()
    except (ValueError, ImportError) as exc:
        raise DemoError(str(exc)) from None
    except IdempotencyPersistenceLayerError as exc:
        raise DemoError(f"cannot use Redis at {shown}: {one_line(exc)}") from None
    return DemoStore("redis", f"Redis at {shown}", lambda _, __: url)


def dynamodb(table: str, endpoint_url: str | None, region: str | None) -> DemoStore:
    region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region is None and endpoint_url:
        region = LOCAL_ENDPOINT_REGION
    query = {**({"region": region} if region else {}), **DYNAMODB_CLIENT}
    if endpoint_url:
        query["endpoint_url"] = endpoint_url
    url = f"dynamodb://{table}?{urlencode(query)}"
    from idem_middleware.persistence.dynamodb import DynamoDBPersistenceLayer

    where = f"at {endpoint_url}" if endpoint_url else f"in {region or 'the default region'}"
    try:
        layer = from_url(url)
        assert isinstance(layer, DynamoDBPersistenceLayer)
        created = layer.create_table()
    except (ValueError, ImportError) as exc:
        raise DemoError(str(exc)) from None
    except IdempotencyPersistenceLayerError as exc:
        raise DemoError(f"cannot use DynamoDB {where}: {one_line(exc)}") from None
    state = "created for the demo" if created else "existing"
    return DemoStore("dynamodb", f"DynamoDB table {table!r} ({state}, {where})", lambda _, __: url)


def dynamodb_local(stack: contextlib.ExitStack) -> DemoStore:
    """DynamoDB Local (or moto's server where Java is missing), started for the demo."""
    from tooling import dynamodb_local as service

    # DynamoDB Local accepts any credentials; the demo never needs real ones.
    for name, value in (("AWS_ACCESS_KEY_ID", "demo"), ("AWS_SECRET_ACCESS_KEY", "demo")):
        os.environ.setdefault(name, value)
    try:
        server = service.start()
    except (ImportError, RuntimeError, OSError) as exc:
        raise DemoError(f"cannot start DynamoDB Local: {exc}") from None
    stack.callback(server.stop)
    return dynamodb(DEMO_TABLE, server.endpoint_url, LOCAL_ENDPOINT_REGION)


def redis_local(stack: contextlib.ExitStack) -> DemoStore:
    """A private redis-server, started for the demo."""
    from tooling import redis_server as service

    try:
        server = service.start()
    except (ImportError, RuntimeError, OSError) as exc:
        raise DemoError(f"cannot start redis-server: {exc}") from None
    stack.callback(server.stop)
    if not server.private:
        raise DemoError("redis-server is not installed (Debian: apt-get install redis-server)")
    return redis(server.url)


def postgres(stack: contextlib.ExitStack) -> DemoStore:
    """A table of the demo's own on the PostgreSQL server at ``IDEM_DEMO_POSTGRES_DSN`` (default
    :data:`DEFAULT_POSTGRES_DSN`, or a private server started for the demo when none answers
    there), created with ``create_table()`` and dropped at the end.

    The apps read one store URL, which cannot name a table; so the table is the default one,
    in a schema of the demo's own that the URL puts first on the search path.
    """
    try:
        import psycopg
        from psycopg import sql

        from tooling import postgres_server as service
    except ImportError:
        raise DemoError(
            "--store postgres needs psycopg: pip install 'idem-middleware[postgres]' "
            "(make demo installs it)"
        ) from None
    dsn = os.environ.get("IDEM_DEMO_POSTGRES_DSN")
    started = ""
    if dsn is None:
        dsn = DEFAULT_POSTGRES_DSN
        if not service.answers(dsn):
            try:
                server = service.start_private()
            except (RuntimeError, OSError, psycopg.Error) as exc:
                raise DemoError(
                    f"no PostgreSQL answers at {dsn} and none could be started: {one_line(exc)}"
                ) from None
            stack.callback(server.stop)
            dsn = server.admin_conninfo
            started = "; a private server, started for the demo"
    schema = f"idem_demo_{uuid.uuid4().hex[:12]}"
    try:
        url = _with_search_path(_as_url(dsn), schema)
        with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as connection:
            connection.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    except (ValueError, psycopg.Error) as exc:
        raise DemoError(f"cannot use PostgreSQL at {redacted(dsn)}: {one_line(exc)}") from None
    stack.callback(_drop_schema, dsn, schema)
    layer: Any = from_url(url)
    try:
        layer.create_table()
        layer.check()
    except IdempotencyPersistenceLayerError as exc:
        raise DemoError(one_line(exc)) from None
    finally:
        layer.close()
    return DemoStore(
        "postgres",
        f"PostgreSQL table {schema}.{layer.table_name} (created for the demo, dropped after; "
        f"{layer.location}{started})",
        lambda _, __: url,
    )


def _as_url(dsn: str) -> str:
    """A libpq key=value string as the postgresql:// URL from_url takes; a URL as it is."""
    if "://" in dsn:
        return dsn
    from psycopg.conninfo import conninfo_to_dict

    params = {name: str(value) for name, value in conninfo_to_dict(dsn).items()}
    user = quote(params.pop("user", ""), safe="")
    password = params.pop("password", None)
    credentials = user + (f":{quote(password, safe='')}" if password is not None else "")
    host = quote(params.pop("host", "localhost"), safe="")  # a socket directory is %2F…
    port = params.pop("port", None)
    netloc = (f"{credentials}@" if credentials else "") + host + (f":{port}" if port else "")
    path = "/" + quote(params.pop("dbname", ""), safe="")
    return urlunsplit(("postgresql", netloc, path, urlencode(params, quote_via=quote), ""))


def _with_search_path(url: str, schema: str) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query["options"] = f"{query.get('options', '')} -c search_path={schema}".strip()
    # libpq decodes %XX in a URL's query but not "+": spaces must be %20.
    return urlunsplit(parts._replace(query=urlencode(query, quote_via=quote)))


def _drop_schema(dsn: str, schema: str) -> None:
    import psycopg
    from psycopg import sql

    # The servers are stopped by now; a leftover schema is not worth failing the demo over.
    with (
        contextlib.suppress(psycopg.Error),
        psycopg.connect(dsn, autocommit=True, connect_timeout=5) as connection,
    ):
        connection.execute(
            sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
        )
