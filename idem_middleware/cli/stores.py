"""The store the options name, built by :func:`~idem_middleware.persistence.from_url` as the app
builds it. Store faults are not translated here: the layers raise typed errors whose messages
name the store and the fix, and :func:`idem_middleware.cli.main` prints them.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

from idem_middleware.cli.errors import CLIError
from idem_middleware.cli.options import (
    DEFAULT_REDIS_URL,
    DEFAULT_TABLE_NAME,
    DYNAMODB_ATTRIBUTES,
    LOCAL_ENDPOINT_REGION,
    STORE_OPTIONS,
    dynamodb_parameter,
    flags,
)
from idem_middleware.config import IdempotencyConfig
from idem_middleware.persistence import BasePersistenceLayer, from_url
from idem_middleware.persistence.url import redacted

#: Fail fast: an unreachable endpoint is an error in seconds, not after minutes of retries.
DYNAMODB_CLIENT = {"connect_timeout": "3", "read_timeout": "10", "max_attempts": "2"}


@dataclass
class Store:
    """A persistence layer built from the command line, and how to name it in messages."""

    layer: BasePersistenceLayer
    kind: str  # dynamodb, postgres, sqlite, redis or memory
    description: str


@contextmanager
def open_store(args: argparse.Namespace, *, kinds: tuple[str, ...], check: bool) -> Iterator[Store]:
    """The persistence layer the options name, configured as the middleware configures it (so
    keys are built the same way); with ``check``, :meth:`check` has found it usable. Closed at
    the end (PostgreSQL's pool, SQLite's connections).
    """
    url, options = _url(args, _store_name(args, kinds))
    kind = {"postgresql": "postgres", "rediss": "redis"}.get(_scheme(url), _scheme(url))
    if kind not in kinds:
        raise CLIError(f"this command takes {', '.join(flags(kinds)[1:])}, not a {kind} store")
    parts = urlsplit(url)
    if kind == "sqlite" and not parts.netloc:
        # The layer creates a missing file and table on first use: inspect and delete must not.
        table = dict(parse_qsl(parts.query)).get("table_name", DEFAULT_TABLE_NAME)
        check_sqlite_file(Path(unquote(parts.path[1:])), table)
    try:
        layer = _build(url, options)
        layer.configure(
            IdempotencyConfig(key_prefix=args.key_prefix, hash_function=args.hash_function)
            if "key_prefix" in args
            else IdempotencyConfig()
        )
    except (ImportError, ValueError, RuntimeError) as exc:  # a missing extra, a bad option
        raise CLIError(str(exc)) from None
    try:
        store = Store(layer, kind, _describe(kind, layer, url))
        if check:
            layer.check()
        yield store
    finally:
        close = getattr(layer, "close", None)
        if close is not None:
            close()


def _store_name(args: argparse.Namespace, kinds: tuple[str, ...]) -> str:
    if getattr(args, "store", None) is not None:
        return str(args.store)
    named = [kind for kind in ("url", *kinds) if getattr(args, STORE_OPTIONS[kind][0]) is not None]
    if len(named) == 1:
        return named[0]
    options = flags(kinds)
    if not named:
        raise CLIError(f"which store? pass {', '.join(options[:-1])} or {options[-1]}")
    names = ", ".join(option.split()[0] for option in options)
    raise CLIError(f"name one store: {names} are exclusive")


def _url(args: argparse.Namespace, name: str) -> tuple[str, dict[str, Any]]:
    """The store URL (and the options from_url cannot take from it) for the store ``name``."""
    if name != "url" and name != "redis" and getattr(args, STORE_OPTIONS[name][0]) is None:
        raise CLIError(f"the {name} store needs {STORE_OPTIONS[name][1]}")
    if name == "dynamodb":
        return _dynamodb_url(args), {}
    if name == "sqlite":
        url = f"sqlite:///{quote(args.sqlite_path)}?{urlencode({'table_name': args.sqlite_table})}"
    elif name == "redis":
        url = args.redis_url or DEFAULT_REDIS_URL
    elif name == "postgres":
        url = args.postgres_dsn
    else:
        url = args.url
    scheme = _scheme(url)
    if scheme in ("redis", "rediss") and "redis_namespace" in args:
        return url, {"key_namespace": args.redis_namespace}
    if scheme in ("postgres", "postgresql"):
        schema = {"schema": args.postgres_schema} if args.postgres_schema else {}
        return url, {"table_name": args.postgres_table, **schema}
    return url, {}


def _scheme(url: str) -> str:
    if "://" not in url and "=" in url:
        return "postgresql"  # a libpq key=value string
    return url.partition("://")[0].lower()


def _build(url: str, options: dict[str, Any]) -> BasePersistenceLayer:
    if "://" in url:
        return from_url(url, **options)
    try:  # a libpq key=value string: from_url takes URLs only
        from idem_middleware.persistence.postgres import PostgresPersistenceLayer
    except ImportError as exc:
        if (exc.name or "").startswith("idem_middleware"):
            raise
        raise ImportError(
            "the PostgreSQL store needs psycopg: pip install 'idem-middleware[postgres]'"
        ) from None
    return PostgresPersistenceLayer(url, **options)


def _dynamodb_url(args: argparse.Namespace) -> str:
    query = {"region": _aws_region(args), **DYNAMODB_CLIENT}
    query.update(endpoint_url=args.endpoint_url, profile=args.profile)
    for option, _, _ in DYNAMODB_ATTRIBUTES:
        query[dynamodb_parameter(option)] = getattr(args, dynamodb_parameter(option))
    given = {name: value for name, value in query.items() if value is not None}
    return f"dynamodb://{args.table}?{urlencode(given)}"


def _aws_region(args: argparse.Namespace) -> str | None:
    """The region, as boto3 finds it (or AWS_REGION, which Lambda and newer SDKs set), so that
    a missing one is named with the option that gives it.
    """
    if args.region:
        return str(args.region)
    try:
        import boto3
        from botocore.exceptions import ProfileNotFound
    except ImportError:
        return None  # from_url names the extra to install
    try:
        configured = boto3.session.Session(profile_name=args.profile).region_name
    except ProfileNotFound:
        raise CLIError(f"no AWS profile {args.profile!r} in the AWS configuration") from None
    region = configured or os.environ.get("AWS_REGION")
    if region is None and args.endpoint_url:
        region = LOCAL_ENDPOINT_REGION
    if region is None:
        raise CLIError(
            "no AWS region: pass --region, or set AWS_DEFAULT_REGION or AWS_REGION, "
            "or a region in ~/.aws/config"
        )
    return region


def _describe(kind: str, layer: Any, url: str) -> str:
    if kind == "dynamodb":
        meta = layer.client.meta
        return (
            f"DynamoDB table {layer.table_name!r} (region {meta.region_name}, {meta.endpoint_url})"
        )
    if kind == "postgres":
        return f"PostgreSQL table {layer.qualified_name} ({layer.location})"
    if kind == "sqlite":
        return f"SQLite file {layer.path} (table {layer.table_name!r})"
    if kind == "redis":
        return f"Redis at {redacted(url)}"
    return f"the {kind} store"


def check_sqlite_file(path: Path, table: str) -> None:
    """Refuse a path that is not an idempotency store, rather than create or alter a file."""
    if not path.exists():
        raise CLIError(f"no SQLite file at {path}")
    if path.is_dir():
        raise CLIError(f"{path} is a directory, not an SQLite file")
    try:
        connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
        try:
            row = connection.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
            ).fetchone()
        finally:
            connection.close()
    except sqlite3.Error as exc:
        raise CLIError(f"cannot read SQLite file {path}: {exc}") from None
    if row is None:
        raise CLIError(
            f"{path} has no table {table!r}: is it the app's idempotency store? (--sqlite-table)"
        )
