"""The store a command's options name, built with :func:`~idem_middleware.persistence.from_url`
and configured as the middleware configures it; and the one-line message for each way a store
can fail.

``--url`` takes the URL an app passes to ``from_url``; ``--table`` (DynamoDB), ``--sqlite-path``
and ``--redis-url`` build one.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

from idem_middleware.cli.errors import PROG, CLIError, first_line
from idem_middleware.config import IdempotencyConfig
from idem_middleware.exceptions import IdempotencyPersistenceLayerError
from idem_middleware.persistence import BasePersistenceLayer, from_url
from idem_middleware.persistence.url import redacted

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
DEFAULT_SQLITE_TABLE = "idempotency_records"
#: A region for DynamoDB Local when none is configured: it accepts any.
LOCAL_ENDPOINT_REGION = "us-east-1"
#: Fail fast: an unreachable endpoint is an error in seconds, not after minutes of retries.
DYNAMODB_CLIENT = {"connect_timeout": "3", "read_timeout": "10", "max_attempts": "2"}
#: --option -> DynamoDBPersistenceLayer keyword.
DYNAMODB_ATTRIBUTES = {
    "key_attr": "key_attr",
    "sort_key_attr": "sort_key_attr",
    "static_pk_value": "static_pk_value",
    "expiry_attr": "expiry_attr",
    "in_progress_expiry_attr": "in_progress_expiry_attr",
    "status_attr": "status_attr",
    "data_attr": "data_attr",
    "validation_attr": "validation_key_attr",
}

Translate = Callable[[IdempotencyPersistenceLayerError], CLIError]


@dataclass
class Store:
    """A persistence layer built from the command line, and how to name it in messages."""

    layer: BasePersistenceLayer
    description: str
    translate: Translate
    where: str = ""  # the region and endpoint of a DynamoDB table


# Options ------------------------------------------------------------------------------------


def add_aws_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("AWS")
    group.add_argument(
        "--endpoint-url",
        metavar="URL",
        help="DynamoDB endpoint, e.g. http://localhost:8000 for DynamoDB Local "
        f"(region defaults to {LOCAL_ENDPOINT_REGION} there)",
    )
    group.add_argument("--region", help="AWS region (default: from the AWS configuration)")
    group.add_argument("--profile", help="AWS profile from ~/.aws/config")


def add_table_options(parser: argparse.ArgumentParser, *, required: bool) -> None:
    group = parser.add_argument_group(
        "DynamoDB table", "attribute names, as passed to DynamoDBPersistenceLayer"
    )
    group.add_argument("--table", required=required, metavar="NAME", help="table name")
    group.add_argument(
        "--key-attr", default="id", help="partition key attribute (default: %(default)s)"
    )
    group.add_argument(
        "--sort-key-attr",
        help="sort key attribute: a composite key, the idempotency key in the sort key",
    )
    group.add_argument(
        "--static-pk-value",
        help="partition key value of every record with --sort-key-attr "
        "(the layer's default: 'idempotency')",
    )
    group.add_argument(
        "--expiry-attr", default="expiration", help="expiry (TTL) attribute (default: %(default)s)"
    )
    group.add_argument(
        "--in-progress-expiry-attr",
        default="in_progress_expiration",
        help="lease attribute (default: %(default)s)",
    )
    group.add_argument(
        "--status-attr", default="status", help="status attribute (default: %(default)s)"
    )
    group.add_argument(
        "--data-attr", default="data", help="stored response attribute (default: %(default)s)"
    )
    group.add_argument(
        "--validation-attr",
        default="validation",
        help="payload fingerprint attribute (default: %(default)s)",
    )


def add_store_options(parser: argparse.ArgumentParser) -> None:
    stores = parser.add_argument_group(
        "store",
        "where the records are: --url, or a store implied by --table, --sqlite-path or --redis-url",
    )
    stores.add_argument(
        "--url",
        metavar="URL",
        help="the store URL the app passes to from_url, e.g. sqlite:///idempotency.sqlite3, "
        "dynamodb://idempotency?region=eu-west-1, redis://localhost:6379/0",
    )
    stores.add_argument("--store", choices=("dynamodb", "sqlite", "redis"), help="the backend")
    stores.add_argument("--sqlite-path", metavar="FILE", help="SQLite database file")
    stores.add_argument(
        "--sqlite-table",
        default=DEFAULT_SQLITE_TABLE,
        help="SQLitePersistenceLayer table_name (default: %(default)s)",
    )
    stores.add_argument(
        "--redis-url", metavar="URL", help=f"Redis URL (with --store redis: {DEFAULT_REDIS_URL})"
    )
    stores.add_argument(
        "--redis-namespace", default="", help="RedisPersistenceLayer key_namespace (default: none)"
    )
    add_table_options(parser, required=False)
    add_aws_options(parser)


# Building stores ----------------------------------------------------------------------------


def _from_url(url: str, **options: Any) -> BasePersistenceLayer:
    try:
        return from_url(url, **options)
    except ImportError as exc:  # a missing extra: the message names it
        raise CLIError(str(exc)) from None
    except (ValueError, RuntimeError) as exc:
        raise CLIError(str(exc)) from None


def dynamodb_store(args: argparse.Namespace) -> Store:
    """The DynamoDB table of ``--table``, through the AWS profile, region and endpoint given."""
    try:
        import boto3
        from botocore.exceptions import ProfileNotFound
    except ImportError:
        raise CLIError(
            "the DynamoDB store needs boto3: pip install 'idem-middleware[dynamodb]'"
        ) from None
    try:
        session = boto3.session.Session(profile_name=args.profile)
    except ProfileNotFound as exc:
        raise CLIError(f"no AWS profile {args.profile!r}: {exc}") from None
    # botocore reads AWS_DEFAULT_REGION; AWS_REGION is what Lambda and the newer SDKs set.
    region = args.region or session.region_name or os.environ.get("AWS_REGION")
    if region is None and args.endpoint_url:
        region = LOCAL_ENDPOINT_REGION
    if region is None:
        raise CLIError(
            "no AWS region: pass --region, or set AWS_DEFAULT_REGION or AWS_REGION, "
            "or a region in ~/.aws/config"
        )
    query = {"region": region, **DYNAMODB_CLIENT}
    if args.endpoint_url:
        query["endpoint_url"] = args.endpoint_url
    attributes = {
        keyword: getattr(args, option)
        for option, keyword in DYNAMODB_ATTRIBUTES.items()
        if getattr(args, option) is not None
    }
    layer = _from_url(
        f"dynamodb://{args.table}?{urlencode(query)}", boto3_session=session, **attributes
    )
    where = f"region {region}" + (f" at {args.endpoint_url}" if args.endpoint_url else "")
    return Store(
        layer,
        f"DynamoDB table {args.table!r} ({where})",
        _translate_dynamodb(args.table, where, args.endpoint_url or f"the endpoint of {region}"),
        where,
    )


def _sqlite_store(path: Path, table: str) -> Store:
    check_sqlite_file(path, table)
    layer = _from_url(f"sqlite:///{quote(str(path))}", table_name=table)
    return Store(layer, f"SQLite file {path} (table {table!r})", _translate_sqlite(path))


def _redis_store(url: str, namespace: str) -> Store:
    try:
        layer = from_url(url, key_namespace=namespace)
    except ImportError as exc:
        raise CLIError(str(exc)) from None
    except ValueError as exc:
        raise CLIError(f"invalid Redis URL {redacted(url)!r}: {exc}") from None
    return Store(layer, f"Redis at {redacted(url)}", _translate_redis(url))


def _url_store(args: argparse.Namespace) -> Store:
    """The store of ``--url``, with the messages of its backend."""
    url: str = args.url
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    scheme = parts.scheme.lower()
    if scheme in ("redis", "rediss"):
        return _redis_store(url, args.redis_namespace)
    if scheme == "sqlite" and not parts.netloc:
        # As inspect and delete must not create a store: checked before from_url builds it.
        path = Path(unquote(parts.path[1:]))
        check_sqlite_file(path, query.get("table_name", DEFAULT_SQLITE_TABLE))
    layer = _from_url(url)
    if scheme == "dynamodb":
        endpoint = query.get("endpoint_url")
        region = query.get("region", "from the AWS configuration")
        where = f"region {region}" + (f" at {endpoint}" if endpoint else "")
        return Store(
            layer,
            f"DynamoDB table {parts.netloc!r} ({where})",
            _translate_dynamodb(parts.netloc, where, endpoint or f"the endpoint of {region}"),
        )
    shown = redacted(url)
    return Store(layer, f"store {shown}", _translate_generic(shown))


def _store_name(args: argparse.Namespace) -> str:
    if args.store is not None:
        return str(args.store)
    named = [
        name
        for name, given in (
            ("url", args.url is not None),
            ("dynamodb", args.table is not None),
            ("sqlite", args.sqlite_path is not None),
            ("redis", args.redis_url is not None),
        )
        if given
    ]
    if len(named) == 1:
        return named[0]
    if not named:
        raise CLIError(
            "which store? pass --url URL, --table NAME (DynamoDB), --sqlite-path FILE or "
            "--redis-url URL (or --store)"
        )
    raise CLIError("name one store: --url, --table, --sqlite-path and --redis-url are exclusive")


def open_store(args: argparse.Namespace) -> Store:
    """The persistence layer the options name, configured exactly as the middleware configures
    it, so that keys are built the same way.
    """
    name = _store_name(args)
    if name == "url":
        store = _url_store(args)
    elif name == "dynamodb":
        if args.table is None:
            raise CLIError("the DynamoDB store needs --table NAME")
        store = dynamodb_store(args)
    elif name == "sqlite":
        if args.sqlite_path is None:
            raise CLIError("the SQLite store needs --sqlite-path FILE")
        store = _sqlite_store(Path(args.sqlite_path), args.sqlite_table)
    else:
        store = _redis_store(args.redis_url or DEFAULT_REDIS_URL, args.redis_namespace)
    try:
        config = IdempotencyConfig(key_prefix=args.key_prefix, hash_function=args.hash_function)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    store.layer.configure(config)
    return store


def check_sqlite_file(path: Path, table: str) -> None:
    """Refuse a path that is not an idempotency store, rather than create or alter a file: the
    layer itself would create the file and its table on first use.
    """
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


# Store errors, one line each ----------------------------------------------------------------


def _translate_dynamodb(table: str, where: str, endpoint: str) -> Translate:
    def translate(exc: IdempotencyPersistenceLayerError) -> CLIError:
        from botocore.exceptions import (
            ClientError,
            ConnectionClosedError,
            ConnectTimeoutError,
            EndpointConnectionError,
            NoCredentialsError,
            ReadTimeoutError,
        )

        cause = exc.__cause__
        if isinstance(cause, NoCredentialsError):
            return CLIError(
                "no AWS credentials found: configure them (aws configure, AWS_PROFILE or "
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY; DynamoDB Local accepts any values)"
            )
        if isinstance(
            cause,
            (EndpointConnectionError, ConnectTimeoutError, ConnectionClosedError, ReadTimeoutError),
        ):
            return CLIError(f"cannot reach DynamoDB at {endpoint}: {first_line(cause)}")
        if isinstance(cause, ClientError):
            error = cause.response.get("Error", {})
            code = str(error.get("Code", ""))
            message = str(error.get("Message", "")) or code
            if code == "ResourceNotFoundException":
                return CLIError(
                    f"DynamoDB table {table!r} not found ({where}): create it with "
                    f"'{PROG} create-table --table {table}'"
                )
            if code in (
                "UnrecognizedClientException",
                "InvalidSignatureException",
                "ExpiredTokenException",
                "InvalidClientTokenId",
                "MissingAuthenticationTokenException",
            ):
                return CLIError(f"AWS rejected the credentials ({where}): {message}")
            if code in ("AccessDeniedException", "AccessDenied"):
                return CLIError(f"access denied to DynamoDB table {table!r}: {message}")
            if code == "ValidationException":
                return CLIError(
                    f"DynamoDB refused the request on table {table!r}: {message} "
                    "(do --key-attr/--sort-key-attr match the table?)"
                )
            return CLIError(f"DynamoDB error on table {table!r} ({where}): {message}")
        return CLIError(first_line(exc))

    return translate


def _translate_redis(url: str) -> Translate:
    def translate(exc: IdempotencyPersistenceLayerError) -> CLIError:
        from redis.exceptions import AuthenticationError, ConnectionError, TimeoutError

        cause = exc.__cause__
        if isinstance(cause, AuthenticationError):
            return CLIError(f"Redis at {redacted(url)} refused the credentials: {cause}")
        if isinstance(cause, (ConnectionError, TimeoutError)):
            return CLIError(f"cannot reach Redis at {redacted(url)}: {first_line(cause)}")
        return CLIError(f"Redis error at {redacted(url)}: {first_line(cause or exc)}")

    return translate


def _translate_sqlite(path: Path) -> Translate:
    def translate(exc: IdempotencyPersistenceLayerError) -> CLIError:
        return CLIError(f"cannot use SQLite file {path}: {first_line(exc.__cause__ or exc)}")

    return translate


def _translate_generic(shown: str) -> Translate:
    def translate(exc: IdempotencyPersistenceLayerError) -> CLIError:
        return CLIError(f"cannot use the store {shown}: {first_line(exc.__cause__ or exc)}")

    return translate
