"""The store the options name, built by :func:`~idem_middleware.persistence.from_url` as the app
builds it, configured, checked, named in messages and closed. Store faults are not translated:
the layers raise typed errors whose messages name the store and the fix, and
:func:`idem_middleware.cli.main` prints them.
"""

from __future__ import annotations

import argparse
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from idem_middleware.cli.errors import CLIError
from idem_middleware.cli.options import DEFAULT_TABLE_NAME, flags, scheme, store_name, store_url
from idem_middleware.config import IdempotencyConfig
from idem_middleware.persistence import BasePersistenceLayer, from_url
from idem_middleware.persistence.url import redacted


@dataclass
class Store:
    """A persistence layer built from the command line, and how to name it in messages."""

    layer: BasePersistenceLayer
    kind: str  # dynamodb, postgres, sqlite or redis
    description: str


@contextmanager
def open_store(args: argparse.Namespace, *, kinds: tuple[str, ...], check: bool) -> Iterator[Store]:
    """The persistence layer the options name, configured as the middleware configures it (so
    keys are built the same way); with ``check``, :meth:`check` has found it usable. Closed at
    the end (PostgreSQL's pool, SQLite's connections).
    """
    url, options = store_url(args, store_name(args, kinds))
    kind = {"postgresql": "postgres", "rediss": "redis"}.get(scheme(url), scheme(url))
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
    return f"Redis at {redacted(url)}"


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
