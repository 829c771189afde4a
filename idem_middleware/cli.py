"""``idem-middleware``: create the DynamoDB table, inspect or delete one key's record, run the demo.

Mistakes the user can fix (no credentials, a missing table, a store that does not answer, a
missing optional dependency) are one line on stderr and a non-zero exit code, never a traceback:
every command raises :class:`CLIError` for them, and :func:`main` prints it.

Exit codes: 0 success, 1 error (or no record for the key), 2 usage error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sqlite3
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import urlsplit, urlunsplit

from idem_middleware.config import IdempotencyConfig
from idem_middleware.exceptions import (
    IdempotencyItemNotFoundError,
    IdempotencyKeyInvalidError,
    IdempotencyPersistenceLayerError,
)
from idem_middleware.keys import header_key_material, parse_key
from idem_middleware.persistence.base import BasePersistenceLayer
from idem_middleware.persistence.record import STATUS_INPROGRESS, DataRecord

if TYPE_CHECKING:
    from idem_middleware.demo.run import DemoStore
    from idem_middleware.persistence.dynamodb import DynamoDBPersistenceLayer
    from idem_middleware.persistence.redis import RedisPersistenceLayer

PROG = "idem-middleware"
DEFAULT_REDIS_URL = "redis://localhost:6379/0"
DEFAULT_SQLITE_TABLE = "idempotency_records"
DEMO_TABLE = "idem-middleware-demo"
#: A region for DynamoDB Local when none is configured: it accepts any.
LOCAL_ENDPOINT_REGION = "us-east-1"
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


class CLIError(Exception):
    """A mistake the user can fix: printed as one line on stderr, exit code ``EXIT_ERROR``."""


# Stores -------------------------------------------------------------------------------------


@dataclass
class Store:
    """A persistence layer built from the command line, and how to name it in messages."""

    layer: BasePersistenceLayer
    description: str
    translate: Callable[[IdempotencyPersistenceLayerError], CLIError]


def _dynamodb_client(args: argparse.Namespace) -> Any:
    try:
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, NoRegionError, ProfileNotFound
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
    args.region = region
    # Fail fast: an unreachable endpoint is an error in seconds, not after minutes of retries.
    config = Config(
        connect_timeout=3,
        read_timeout=10,
        retries={"mode": "standard", "total_max_attempts": 2},
    )
    try:
        return session.client(
            "dynamodb", region_name=region, endpoint_url=args.endpoint_url, config=config
        )
    except NoRegionError:  # pragma: no cover - the region is resolved above
        raise CLIError("no AWS region: pass --region") from None
    except (BotoCoreError, ValueError) as exc:
        raise CLIError(f"cannot set up a DynamoDB client: {exc}") from None


def _dynamodb_layer(args: argparse.Namespace) -> DynamoDBPersistenceLayer:
    client = _dynamodb_client(args)
    from idem_middleware.persistence.dynamodb import DynamoDBPersistenceLayer

    try:
        return DynamoDBPersistenceLayer(
            args.table,
            key_attr=args.key_attr,
            static_pk_value=args.static_pk_value,
            sort_key_attr=args.sort_key_attr,
            expiry_attr=args.expiry_attr,
            in_progress_expiry_attr=args.in_progress_expiry_attr,
            status_attr=args.status_attr,
            data_attr=args.data_attr,
            validation_key_attr=args.validation_attr,
            boto3_client=client,
        )
    except ValueError as exc:
        raise CLIError(str(exc)) from None


def _where_dynamodb(args: argparse.Namespace) -> str:
    where = f"region {args.region}"
    if args.endpoint_url:
        where += f" at {args.endpoint_url}"
    return where


def _translate_dynamodb(
    args: argparse.Namespace,
) -> Callable[[IdempotencyPersistenceLayerError], CLIError]:
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
        where = _where_dynamodb(args)
        if isinstance(cause, NoCredentialsError):
            return CLIError(
                "no AWS credentials found: configure them (aws configure, AWS_PROFILE or "
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY; DynamoDB Local accepts any values)"
            )
        if isinstance(
            cause,
            (EndpointConnectionError, ConnectTimeoutError, ConnectionClosedError, ReadTimeoutError),
        ):
            endpoint = args.endpoint_url or f"the DynamoDB endpoint of {args.region}"
            return CLIError(f"cannot reach DynamoDB at {endpoint}: {_first_line(cause)}")
        if isinstance(cause, ClientError):
            error = cause.response.get("Error", {})
            code = str(error.get("Code", ""))
            message = str(error.get("Message", "")) or code
            if code == "ResourceNotFoundException":
                return CLIError(
                    f"DynamoDB table {args.table!r} not found ({where}): create it with "
                    f"'{PROG} create-table --table {args.table}'"
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
                return CLIError(f"access denied to DynamoDB table {args.table!r}: {message}")
            if code == "ValidationException":
                return CLIError(
                    f"DynamoDB refused the request on table {args.table!r}: {message} "
                    "(do --key-attr/--sort-key-attr match the table?)"
                )
            return CLIError(f"DynamoDB error on table {args.table!r} ({where}): {message}")
        return CLIError(_first_line(exc))

    return translate


def _redacted(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname or ''}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def _redis_layer(url: str, namespace: str) -> RedisPersistenceLayer:
    try:
        from idem_middleware.persistence.redis import RedisPersistenceLayer
    except ImportError:
        raise CLIError(
            "the Redis store needs redis-py: pip install 'idem-middleware[redis]'"
        ) from None
    try:
        return RedisPersistenceLayer(url=url, key_namespace=namespace)
    except ValueError as exc:
        raise CLIError(f"invalid Redis URL {_redacted(url)!r}: {exc}") from None


def _redis_ping(url: str) -> None:
    layer = _redis_layer(url, "")
    from redis.exceptions import RedisError

    try:
        layer.client.ping()
    except RedisError as exc:
        error = IdempotencyPersistenceLayerError(f"Redis PING failed: {exc}")
        error.__cause__ = exc
        raise _translate_redis(url)(error) from None


def _translate_redis(url: str) -> Callable[[IdempotencyPersistenceLayerError], CLIError]:
    def translate(exc: IdempotencyPersistenceLayerError) -> CLIError:
        from redis.exceptions import AuthenticationError, ConnectionError, TimeoutError

        cause = exc.__cause__
        if isinstance(cause, AuthenticationError):
            return CLIError(f"Redis at {_redacted(url)} refused the credentials: {cause}")
        if isinstance(cause, (ConnectionError, TimeoutError)):
            return CLIError(f"cannot reach Redis at {_redacted(url)}: {_first_line(cause)}")
        return CLIError(f"Redis error at {_redacted(url)}: {_first_line(cause or exc)}")

    return translate


def _check_sqlite_file(path: Path, table: str) -> None:
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


def _sqlite_layer(path: Path, table: str) -> BasePersistenceLayer:
    from idem_middleware.persistence.sqlite import SQLitePersistenceLayer

    _check_sqlite_file(path, table)
    try:
        return SQLitePersistenceLayer(path, table_name=table)
    except (ValueError, RuntimeError) as exc:
        raise CLIError(str(exc)) from None


def _translate_sqlite(path: Path) -> Callable[[IdempotencyPersistenceLayerError], CLIError]:
    def translate(exc: IdempotencyPersistenceLayerError) -> CLIError:
        return CLIError(f"cannot use SQLite file {path}: {_first_line(exc.__cause__ or exc)}")

    return translate


def _store_name(args: argparse.Namespace) -> str:
    if args.store is not None:
        return str(args.store)
    named = [
        name
        for name, given in (
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
            "which store? pass --table NAME (DynamoDB), --sqlite-path FILE or --redis-url URL "
            "(or --store)"
        )
    raise CLIError("name one store: --table, --sqlite-path and --redis-url are exclusive")


def open_store(args: argparse.Namespace) -> Store:
    """The persistence layer the options name, configured exactly as the middleware configures
    it, so that keys are built the same way.
    """
    name = _store_name(args)
    if name == "dynamodb":
        if args.table is None:
            raise CLIError("the DynamoDB store needs --table NAME")
        layer: BasePersistenceLayer = _dynamodb_layer(args)
        store = Store(
            layer,
            f"DynamoDB table {args.table!r} ({_where_dynamodb(args)})",
            _translate_dynamodb(args),
        )
    elif name == "sqlite":
        if args.sqlite_path is None:
            raise CLIError("the SQLite store needs --sqlite-path FILE")
        path = Path(args.sqlite_path)
        layer = _sqlite_layer(path, args.sqlite_table)
        store = Store(
            layer, f"SQLite file {path} (table {args.sqlite_table!r})", _translate_sqlite(path)
        )
    else:
        url = args.redis_url or DEFAULT_REDIS_URL
        layer = _redis_layer(url, args.redis_namespace)
        store = Store(layer, f"Redis at {_redacted(url)}", _translate_redis(url))
    try:
        config = IdempotencyConfig(key_prefix=args.key_prefix, hash_function=args.hash_function)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    layer.configure(config)
    return store


def open_record(args: argparse.Namespace) -> tuple[Store, str]:
    """The store, and the key the middleware stores the record of the client key ``args.key``
    under. The key is checked before the store is opened.
    """
    if args.stored_key:
        return open_store(args), str(args.key)
    try:
        key = parse_key([args.key])
    except IdempotencyKeyInvalidError as exc:
        raise CLIError(f"not a valid Idempotency-Key: {exc.detail}") from None
    store = open_store(args)
    return store, store.layer.build_idempotency_key(header_key_material(key), args.scope)


# Commands -----------------------------------------------------------------------------------


def cmd_create_table(args: argparse.Namespace, out: TextIO) -> int:
    layer = _dynamodb_layer(args)
    try:
        created = layer.create_table()
    except IdempotencyPersistenceLayerError as exc:
        raise _translate_dynamodb(args)(exc) from None
    state = "created" if created else "already existed"
    print(
        f"table {args.table!r} {state} ({_where_dynamodb(args)}); on-demand billing, "
        f"key {args.sort_key_attr or args.key_attr!r}, TTL on {args.expiry_attr!r}",
        file=out,
    )
    return 0


def cmd_inspect(args: argparse.Namespace, out: TextIO) -> int:
    store, key = open_record(args)
    try:
        record = store.layer.get_record(key)
    except IdempotencyItemNotFoundError:
        raise CLIError(
            f"no live record for this key in {store.description} (stored key {key}; "
            "check --scope and --key-prefix, or it has expired)"
        ) from None
    except IdempotencyPersistenceLayerError as exc:
        raise store.translate(exc) from None
    report = _record_report(record, store.description, args.show_body)
    if args.json:
        json.dump(report, out, indent=2, ensure_ascii=False)
        out.write("\n")
    else:
        _print_report(report, out)
    return 0


def cmd_delete(args: argparse.Namespace, out: TextIO) -> int:
    store, key = open_record(args)
    try:
        removed = store.layer.remove_record(key)
    except IdempotencyPersistenceLayerError as exc:
        raise store.translate(exc) from None
    if not removed:
        raise CLIError(f"no record for this key in {store.description} (stored key {key})")
    print(f"removed the record {key} from {store.description}", file=out)
    return 0


def cmd_demo(args: argparse.Namespace, out: TextIO) -> int:
    from idem_middleware.demo import missing_dependencies

    missing = missing_dependencies()
    if missing:
        raise CLIError(f"the demo needs {', '.join(missing)}: pip install 'idem-middleware[demo]'")
    from idem_middleware.demo.run import DemoError, run_demo

    store = _demo_store(args)
    try:
        ok = run_demo(store)
    except DemoError as exc:
        raise CLIError(str(exc)) from None
    return 0 if ok else EXIT_ERROR


def _demo_store(args: argparse.Namespace) -> DemoStore:
    """The store the demo's apps use; for DynamoDB and Redis, checked (and the table created)
    before any server starts, so their mistakes are one line too.
    """
    from idem_middleware.demo.run import DemoStore

    if args.store == "memory":
        return DemoStore("memory", "memory (one process: each server runs one worker)")
    if args.store == "sqlite":
        return DemoStore("sqlite", "SQLite, a file in a temporary directory, shared by workers")
    if args.store == "redis":
        url = args.redis_url or DEFAULT_REDIS_URL
        _redis_ping(url)
        return DemoStore(
            "redis", f"Redis at {_redacted(url)}", {"IDEM_STORE": "redis", "IDEM_REDIS_URL": url}
        )
    for name, default in _DYNAMODB_ATTRIBUTE_DEFAULTS.items():
        setattr(args, name, default)
    layer = _dynamodb_layer(args)
    try:
        created = layer.create_table()
    except IdempotencyPersistenceLayerError as exc:
        raise _translate_dynamodb(args)(exc) from None
    env = {
        "IDEM_STORE": "dynamodb",
        "IDEM_DYNAMODB_TABLE": args.table,
        "AWS_DEFAULT_REGION": args.region,
    }
    if args.endpoint_url:
        env["IDEM_DYNAMODB_ENDPOINT_URL"] = args.endpoint_url
    state = "created for the demo" if created else "existing"
    return DemoStore(
        "dynamodb", f"DynamoDB table {args.table!r} ({state}, {_where_dynamodb(args)})", env
    )


# Output -------------------------------------------------------------------------------------


def _timestamp(epoch_seconds: float, now: float) -> dict[str, Any]:
    moment = datetime.fromtimestamp(epoch_seconds, tz=timezone.utc)
    return {
        "at": moment.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "in_seconds": round(epoch_seconds - now, 3),
    }


def _relative(seconds: float) -> str:
    span = abs(seconds)
    if span < 120:
        text = f"{span:.0f} s"
    elif span < 2 * 3600:
        text = f"{span / 60:.0f} min"
    elif span < 2 * 86400:
        text = f"{span / 3600:.1f} h"
    else:
        text = f"{span / 86400:.1f} days"
    return f"in {text}" if seconds >= 0 else f"{text} ago"


def _record_report(record: DataRecord, store: str, show_body: bool) -> dict[str, Any]:
    now = time.time()
    report: dict[str, Any] = {
        "store": store,
        "stored_key": record.idempotency_key,
        "status": record.current_status(now),
        "expires": None,
        "lease": None,
        "fingerprint": record.payload_hash,
        "response": None,
    }
    if record.expiry_timestamp is not None:
        report["expires"] = _timestamp(record.expiry_timestamp, now)
    if record.in_progress_expiry_timestamp is not None:
        lease = _timestamp(record.in_progress_expiry_timestamp / 1000, now)
        lease["expired"] = record.lease_expired(now)
        report["lease"] = lease
    if record.response_data is not None:
        try:
            response = record.response
        except ValueError:
            report["response"] = {"unreadable": True}
        else:
            assert response is not None
            details: dict[str, Any] = {
                "status": response.status,
                "headers": [list(header) for header in response.headers],
                "body_bytes": len(response.body),
                "body_omitted": response.body_omitted,
            }
            if show_body:
                try:
                    details["body"] = response.body.decode("utf-8")
                except UnicodeDecodeError:
                    details["body_base64"] = base64.b64encode(response.body).decode("ascii")
            report["response"] = details
    return report


def _print_report(report: dict[str, Any], out: TextIO) -> None:
    def line(label: str, value: str) -> None:
        print(f"{label:<12} {value}", file=out)

    line("store", report["store"])
    line("stored key", report["stored_key"])
    status = report["status"]
    lease = report["lease"]
    if status == STATUS_INPROGRESS and lease is not None:
        status += (
            " (lease expired: the next request with this key runs the handler again)"
            if lease["expired"]
            else " (a request is running it, or crashed: retries get 409 until the lease ends)"
        )
    line("status", status)
    if report["expires"] is not None:
        expires = report["expires"]
        line("expires", f"{expires['at']} ({_relative(expires['in_seconds'])})")
    if lease is not None and report["status"] == STATUS_INPROGRESS:
        state = "ended" if lease["expired"] else "held until"
        line("lease", f"{state} {lease['at']} ({_relative(lease['in_seconds'])})")
    if report["fingerprint"]:
        line("fingerprint", report["fingerprint"])
    response = report["response"]
    if response is None:
        line("response", "none yet")
        return
    if response.get("unreadable"):
        line("response", "stored, but not readable as a response")
        return
    line("response", f"status {response['status']}")
    for index, (name, value) in enumerate(response["headers"]):
        line("headers" if index == 0 else "", f"{name}: {value}")
    if response["body_omitted"]:
        line("body", "not stored (over the size limit): replays send an empty body")
    elif "body" in response:
        line("body", f"{response['body_bytes']} bytes:")
        print(response["body"], file=out)
    elif "body_base64" in response:
        line("body", f"{response['body_bytes']} bytes, not UTF-8; base64:")
        print(response["body_base64"], file=out)
    else:
        line("body", f"{response['body_bytes']} bytes (--show-body prints it)")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


# Arguments ----------------------------------------------------------------------------------

_DYNAMODB_ATTRIBUTE_DEFAULTS = {
    "key_attr": "id",
    "sort_key_attr": None,
    "static_pk_value": None,
    "expiry_attr": "expiration",
    "in_progress_expiry_attr": "in_progress_expiration",
    "status_attr": "status",
    "data_attr": "data",
    "validation_attr": "validation",
}


_Formatter = argparse.RawDescriptionHelpFormatter


def _wrap(text: str) -> str:
    return textwrap.fill(text, width=79)


def _add_aws_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("AWS")
    group.add_argument(
        "--endpoint-url",
        metavar="URL",
        help="DynamoDB endpoint, e.g. http://localhost:8000 for DynamoDB Local "
        f"(region defaults to {LOCAL_ENDPOINT_REGION} there)",
    )
    group.add_argument("--region", help="AWS region (default: from the AWS configuration)")
    group.add_argument("--profile", help="AWS profile from ~/.aws/config")


def _add_table_options(parser: argparse.ArgumentParser, *, required: bool) -> None:
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


def _add_record_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "key",
        metavar="KEY",
        help="the Idempotency-Key as the client sent it (bare or as a quoted sf-string)",
    )
    parser.add_argument(
        "--stored-key",
        action="store_true",
        help="KEY is the stored key (prefix#hash, as the middleware logs it), not a client key",
    )
    group = parser.add_argument_group(
        "key", "how the app builds stored keys (its IdempotencyConfig and scope)"
    )
    group.add_argument(
        "--scope",
        help="the scope the app's scope callable returns for the client, e.g. user:alice "
        "for the example apps (default: no scope)",
    )
    group.add_argument(
        "--key-prefix", help="the app's IdempotencyConfig.key_prefix (default: idempotency)"
    )
    group.add_argument(
        "--hash-function",
        default="sha256",
        help="the app's IdempotencyConfig.hash_function (default: %(default)s)",
    )
    stores = parser.add_argument_group(
        "store",
        "where the records are; the store is implied by --table, --sqlite-path or --redis-url",
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
    _add_table_options(parser, required=False)
    _add_aws_options(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=_wrap(
            "Operate idem_middleware's idempotency stores, and see the middleware work."
        ),
        epilog=f"Run '{PROG} COMMAND --help' for a command's options.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    create = commands.add_parser(
        "create-table",
        help="create the DynamoDB table (safe to run twice)",
        description=_wrap(
            "Create the DynamoDB idempotency table: on-demand billing, TTL enabled on "
            "the expiry attribute, attribute names as the layer is configured. Safe to run twice: "
            "an existing table is left as it is (TTL is enabled on it if it was not)."
        ),
        epilog=f"example: {PROG} create-table --table idempotency "
        "--endpoint-url http://localhost:8000",
        formatter_class=_Formatter,
    )
    _add_table_options(create, required=True)
    _add_aws_options(create)
    create.set_defaults(handler=cmd_create_table)

    inspect = commands.add_parser(
        "inspect",
        help="show the record of one idempotency key",
        description=_wrap(
            "Show the stored record of a client's Idempotency-Key: status, expiry, "
            "lease, and the stored response's status and headers (its body with --show-body). "
            "The stored key is built as the middleware builds it, so pass the app's --scope and "
            "--key-prefix."
        ),
        epilog=f"examples:\n  {PROG} inspect order-1234 --sqlite-path idempotency.sqlite3 "
        f"--scope user:alice\n  {PROG} inspect order-1234 --table idempotency --scope "
        f"user:alice --json\n  {PROG} inspect 'idempotency#3f…' --stored-key --redis-url "
        "redis://localhost:6379/0",
        formatter_class=_Formatter,
    )
    _add_record_options(inspect)
    output = inspect.add_argument_group("output")
    output.add_argument("--show-body", action="store_true", help="print the stored body too")
    output.add_argument("--json", action="store_true", help="print the record as JSON")
    inspect.set_defaults(handler=cmd_inspect)

    delete = commands.add_parser(
        "delete",
        help="delete the record of one idempotency key (clear a stuck key)",
        description=_wrap(
            "Delete the record of a client's Idempotency-Key, whatever its state: the "
            "next request with the key runs the handler again. A request still holding the key "
            "cannot write its record back. Exits 1 when there was no record."
        ),
        epilog=f"example: {PROG} delete order-1234 --table idempotency --scope user:alice",
        formatter_class=_Formatter,
    )
    _add_record_options(delete)
    delete.set_defaults(handler=cmd_delete)

    demo = commands.add_parser(
        "demo",
        help="run the example payments apps and show what idempotency does",
        description=_wrap(
            "Start the example FastAPI app under uvicorn, then the Flask app under gunicorn, "
            "on free localhost ports; send a payment, 20 concurrent retries, a reused key and "
            "a late retry; show what each step did and whether the card was charged once. "
            "Needs the example_apps/ of a source checkout and the 'demo' extra."
        ),
        epilog=f"examples:\n  {PROG} demo\n  {PROG} demo --store dynamodb --endpoint-url "
        f"http://localhost:8000\n  {PROG} demo --store redis --redis-url "
        "redis://localhost:6379/0",
        formatter_class=_Formatter,
    )
    demo.add_argument(
        "--store",
        choices=("sqlite", "memory", "dynamodb", "redis"),
        default="sqlite",
        help="the idempotency store (default: %(default)s, a temporary file that needs no service)",
    )
    demo.add_argument(
        "--table",
        default=DEMO_TABLE,
        metavar="NAME",
        help="DynamoDB table, created if missing - in your AWS account unless --endpoint-url "
        "names DynamoDB Local (--store dynamodb; default: %(default)s)",
    )
    demo.add_argument(
        "--redis-url",
        metavar="URL",
        help=f"Redis server (--store redis; default {DEFAULT_REDIS_URL})",
    )
    _add_aws_options(demo)
    demo.set_defaults(handler=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse has printed
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    try:
        code: int = args.handler(args, sys.stdout)
    except CLIError as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return code


if __name__ == "__main__":
    sys.exit(main())
