"""The options that name a store, one group per backend, and the store URL they amount to: what
the app gives :func:`~idem_middleware.persistence.from_url`, plus the constructor options a URL
cannot carry.
"""

from __future__ import annotations

import argparse
import os
from typing import Any
from urllib.parse import quote, urlencode

from idem_middleware.cli.errors import CLIError

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
DEFAULT_TABLE_NAME = "idempotency_records"  # the SQLite and PostgreSQL layers' default
#: A region for DynamoDB Local when none is configured: it accepts any.
LOCAL_ENDPOINT_REGION = "us-east-1"
#: Fail fast: an unreachable endpoint is an error in seconds, not after minutes of retries.
DYNAMODB_CLIENT = {"connect_timeout": "3", "read_timeout": "10", "max_attempts": "2"}
#: Each store's option (its ``dest``) and how to name it in messages.
STORE_OPTIONS = {
    "url": ("url", "--url URL"),
    "dynamodb": ("table", "--table NAME"),
    "postgres": ("postgres_dsn", "--postgres-dsn DSN"),
    "sqlite": ("sqlite_path", "--sqlite-path FILE"),
    "redis": ("redis_url", "--redis-url URL"),
}
#: DynamoDBPersistenceLayer's attribute names: (option, default, meaning); each option's dest is
#: the layer's keyword and the dynamodb:// URL's parameter.
DYNAMODB_ATTRIBUTES = (
    ("key-attr", "id", "partition key attribute"),
    ("sort-key-attr", None, "sort key attribute: the idempotency key in the sort key"),
    ("static-pk-value", None, "partition key of every record with --sort-key-attr"),
    ("expiry-attr", "expiration", "expiry (TTL) attribute"),
    ("in-progress-expiry-attr", "in_progress_expiration", "lease attribute"),
    ("status-attr", "status", "status attribute"),
    ("data-attr", "data", "stored response attribute"),
    ("validation-attr", "validation", "payload fingerprint attribute"),
)


def dynamodb_parameter(option: str) -> str:
    return "validation_key_attr" if option == "validation-attr" else option.replace("-", "_")


def add_store_options(parser: argparse.ArgumentParser, *, kinds: tuple[str, ...]) -> None:
    """The options naming a store of one of ``kinds`` (keys of ``STORE_OPTIONS``)."""
    stores = parser.add_argument_group(
        "store", "where the records are: --url, or one of " + ", ".join(flags(kinds)[1:])
    )
    stores.add_argument(
        "--url",
        metavar="URL",
        help="the store URL the app passes to from_url, e.g. sqlite:///idempotency.sqlite3, "
        "dynamodb://idempotency?region=eu-west-1, redis://localhost:6379/0, "
        "postgresql://app@db.internal/app",
    )
    if "sqlite" in kinds:
        stores.add_argument("--store", choices=kinds, help="the backend")
        stores.add_argument("--sqlite-path", metavar="FILE", help="SQLite database file")
        stores.add_argument(
            "--sqlite-table",
            default=DEFAULT_TABLE_NAME,
            help="SQLitePersistenceLayer table_name (default: %(default)s)",
        )
        stores.add_argument(
            "--redis-url",
            metavar="URL",
            help=f"Redis URL (with --store redis: {DEFAULT_REDIS_URL})",
        )
        stores.add_argument(
            "--redis-namespace", default="", help="RedisPersistenceLayer key_namespace"
        )
    postgres = parser.add_argument_group("PostgreSQL", "also for a postgresql:// --url")
    postgres.add_argument(
        "--postgres-dsn",
        metavar="DSN",
        help="postgresql:// URL or libpq key=value string, e.g. 'host=db user=app dbname=app'",
    )
    postgres.add_argument(
        "--postgres-table",
        default=DEFAULT_TABLE_NAME,
        metavar="NAME",
        help="PostgresPersistenceLayer table_name (default: %(default)s)",
    )
    postgres.add_argument("--postgres-schema", metavar="NAME", help="its schema (default: none)")
    _add_dynamodb_options(parser)


def _add_dynamodb_options(parser: argparse.ArgumentParser) -> None:
    table = parser.add_argument_group(
        "DynamoDB table", "attribute names, as passed to DynamoDBPersistenceLayer"
    )
    table.add_argument("--table", metavar="NAME", help="table name")
    for option, default, meaning in DYNAMODB_ATTRIBUTES:
        shown = f" (default: {default})" if default else ""
        table.add_argument(
            f"--{option}",
            dest=dynamodb_parameter(option),
            default=default,
            metavar="NAME",
            help=meaning + shown,
        )
    aws = parser.add_argument_group("AWS")
    aws.add_argument(
        "--endpoint-url",
        metavar="URL",
        help="DynamoDB endpoint, e.g. http://localhost:8000 for DynamoDB Local "
        f"(region defaults to {LOCAL_ENDPOINT_REGION} there)",
    )
    aws.add_argument("--region", help="AWS region (default: from the AWS configuration)")
    aws.add_argument("--profile", help="AWS profile from ~/.aws/config")


def flags(kinds: tuple[str, ...]) -> list[str]:
    return [STORE_OPTIONS[kind][1] for kind in ("url", *kinds)]


# From options to a store URL ----------------------------------------------------------------


def store_name(args: argparse.Namespace, kinds: tuple[str, ...]) -> str:
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


def store_url(args: argparse.Namespace, name: str) -> tuple[str, dict[str, Any]]:
    """The store URL (and the options from_url cannot take from it) for the store ``name``."""
    if name != "url" and name != "redis" and getattr(args, STORE_OPTIONS[name][0]) is None:
        raise CLIError(f"the {name} store needs {STORE_OPTIONS[name][1]}")
    if name == "dynamodb":
        return dynamodb_url(args), {}
    if name == "sqlite":
        url = f"sqlite:///{quote(args.sqlite_path)}?{urlencode({'table_name': args.sqlite_table})}"
    elif name == "redis":
        url = args.redis_url or DEFAULT_REDIS_URL
    elif name == "postgres":
        url = args.postgres_dsn
    else:
        url = args.url
    backend = scheme(url)
    if backend in ("redis", "rediss") and "redis_namespace" in args:
        return url, {"key_namespace": args.redis_namespace}
    if backend in ("postgres", "postgresql"):
        schema = {"schema": args.postgres_schema} if args.postgres_schema else {}
        return url, {"table_name": args.postgres_table, **schema}
    return url, {}


def scheme(url: str) -> str:
    """The URL's scheme, lower case; ``postgresql`` for a libpq key=value string."""
    if "://" not in url and "=" in url:
        return "postgresql"  # a libpq key=value string
    return url.partition("://")[0].lower()


def dynamodb_url(args: argparse.Namespace) -> str:
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
