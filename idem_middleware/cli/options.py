"""The options that name a store, one group per backend, as ``from_url``'s URL would name it."""

from __future__ import annotations

import argparse

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
DEFAULT_TABLE_NAME = "idempotency_records"  # the SQLite and PostgreSQL layers' default
#: A region for DynamoDB Local when none is configured: it accepts any.
LOCAL_ENDPOINT_REGION = "us-east-1"
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
            f"--{option}", dest=dynamodb_parameter(option), default=default, help=meaning + shown
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
