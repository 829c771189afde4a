"""The ``idem-middleware`` command: create-table, inspect, delete, --version, one-line errors.

Commands run in-process through ``main(argv)`` (output captured by ``capsys``), plus one run of
the installed console script. Records are written with the persistence layers the middleware
uses, so ``inspect`` and ``delete`` are shown to find exactly the key the middleware stores.
A store fault is printed as the one line of the layer's typed error, which names the store and
the fix; the tests check that line holds both.
"""

from __future__ import annotations

import base64
import contextlib
import json
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import idem_middleware
from idem_middleware.cli import main
from idem_middleware.config import IdempotencyConfig
from idem_middleware.keys import header_key_material
from idem_middleware.persistence.base import BasePersistenceLayer
from idem_middleware.responses import StoredResponse

REGION = "us-east-1"
PAYMENT_BODY = b'{"id":"pay_1","amount":1250}'
RESPONSE = StoredResponse(
    status=201,
    headers=(("content-type", "application/json"), ("location", "/payments/pay_1")),
    body=PAYMENT_BODY,
)
HASH = "f" * 64


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(result: tuple[int, str, str], *fragments: str) -> str:
    """Exit 1, nothing on stdout, one line on stderr holding every fragment, no traceback."""
    code, out, err = result
    assert code == 1, (code, out, err)
    assert out == ""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def complete(layer: BasePersistenceLayer, client_key: str, scope: str | None) -> str:
    """A COMPLETED record for ``client_key`` as the middleware stores it; returns its stored key."""
    key = layer.build_idempotency_key(header_key_material(client_key), scope)
    layer.save_success(layer.save_inprogress(key, HASH), RESPONSE)
    return key


def assert_inspect_shows_the_record(out: str, stored_key: str) -> None:
    assert f"stored key   {stored_key}" in out
    assert "status       COMPLETED" in out
    assert "response     status 201" in out
    assert "content-type: application/json" in out
    assert "location: /payments/pay_1" in out
    assert f"body         {len(PAYMENT_BODY)} bytes (--show-body prints it)" in out
    assert 'pay_1","amount' not in out, "the body is shown only with --show-body"
    assert "expires      20" in out
    assert "(in 24.0 h)" in out


# Help -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["create-table", "inspect", "delete"])
def test_every_command_has_help(capsys: pytest.CaptureFixture[str], command: str) -> None:
    code, out, _ = run(capsys, command, "--help")

    assert code == 0
    assert out.startswith(f"usage: idem-middleware {command}")
    assert "example" in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--version")

    assert code == 0
    assert out == f"idem-middleware {idem_middleware.__version__}\n"


def test_the_demo_is_not_a_command(capsys: pytest.CaptureFixture[str]) -> None:
    """The demo needs the checkout: it is ``make demo``, not part of the installed command."""
    code, _, err = run(capsys, "demo")

    assert code == 2
    assert "invalid choice: 'demo'" in err


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "inspect")

    assert code == 2
    assert "the following arguments are required: KEY" in err
    assert "Traceback" not in err


# create-table ---------------------------------------------------------------------------------


@pytest.fixture
def new_table(dynamodb_client: Any) -> Iterator[str]:
    """A table name nothing uses yet; the table is deleted after the test if it was created."""
    name = f"idem-cli-{uuid.uuid4().hex[:12]}"
    yield name
    with contextlib.suppress(dynamodb_client.exceptions.ResourceNotFoundException):
        dynamodb_client.delete_table(TableName=name)


def dynamodb_args(endpoint: str, table: str) -> list[str]:
    return ["--table", table, "--endpoint-url", endpoint, "--region", REGION]


@pytest.mark.dynamodb
def test_create_table_twice(
    capsys: pytest.CaptureFixture[str], dynamodb_endpoint: str, dynamodb_client: Any, new_table: str
) -> None:
    first = run(capsys, "create-table", *dynamodb_args(dynamodb_endpoint, new_table))
    second = run(capsys, "create-table", *dynamodb_args(dynamodb_endpoint, new_table))

    table_named = f"DynamoDB table {new_table!r} (region {REGION}, {dynamodb_endpoint})"
    assert first[0] == 0, first
    assert first[1].startswith(f"{table_named}: created; on-demand billing"), first[1]
    assert second[0] == 0, second
    assert second[1].startswith(f"{table_named}: already existed;"), second[1]
    table = dynamodb_client.describe_table(TableName=new_table)["Table"]
    assert table["KeySchema"] == [{"AttributeName": "id", "KeyType": "HASH"}]
    assert table["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"
    ttl = dynamodb_client.describe_time_to_live(TableName=new_table)["TimeToLiveDescription"]
    assert ttl["TimeToLiveStatus"] in ("ENABLED", "ENABLING")
    assert ttl["AttributeName"] == "expiration"


@pytest.mark.dynamodb
def test_create_table_with_a_composite_key_and_own_attribute_names(
    capsys: pytest.CaptureFixture[str], dynamodb_endpoint: str, dynamodb_client: Any, new_table: str
) -> None:
    code, out, err = run(
        capsys,
        "create-table",
        *dynamodb_args(dynamodb_endpoint, new_table),
        "--key-attr",
        "pk",
        "--sort-key-attr",
        "sk",
        "--expiry-attr",
        "ttl",
    )

    assert code == 0, err
    assert "key 'sk'" in out
    assert "TTL on 'ttl'" in out
    table = dynamodb_client.describe_table(TableName=new_table)["Table"]
    assert table["KeySchema"] == [
        {"AttributeName": "pk", "KeyType": "HASH"},
        {"AttributeName": "sk", "KeyType": "RANGE"},
    ]
    ttl = dynamodb_client.describe_time_to_live(TableName=new_table)["TimeToLiveDescription"]
    assert ttl["AttributeName"] == "ttl"


# inspect and delete on each store -----------------------------------------------------------


@pytest.mark.dynamodb
def test_inspect_and_delete_on_dynamodb(
    capsys: pytest.CaptureFixture[str], dynamodb_endpoint: str, dynamodb_client: Any, new_table: str
) -> None:
    from idem_middleware.persistence.dynamodb import DynamoDBPersistenceLayer

    assert run(capsys, "create-table", *dynamodb_args(dynamodb_endpoint, new_table))[0] == 0
    layer = DynamoDBPersistenceLayer(new_table, boto3_client=dynamodb_client)
    layer.configure(IdempotencyConfig())
    stored_key = complete(layer, "order-1234", "user:alice")
    store = [*dynamodb_args(dynamodb_endpoint, new_table), "--scope", "user:alice"]

    code, out, err = run(capsys, "inspect", "order-1234", *store)
    assert code == 0, err
    assert_inspect_shows_the_record(out, stored_key)
    assert f"DynamoDB table {new_table!r}" in out
    assert "order-1234" not in out, "the raw client key is not printed back"

    code, out, _ = run(capsys, "inspect", "order-1234", *store, "--json", "--show-body")
    assert code == 0
    report = json.loads(out)
    assert report["stored_key"] == stored_key
    assert report["status"] == "COMPLETED"
    assert report["fingerprint"] == HASH
    assert report["response"]["status"] == 201
    assert report["response"]["headers"] == [list(header) for header in RESPONSE.headers]
    assert report["response"]["body"] == PAYMENT_BODY.decode()
    assert 86000 < report["expires"]["in_seconds"] <= 86400

    code, out, err = run(capsys, "delete", "order-1234", *store)
    assert code == 0, err
    assert f"removed the record {stored_key}" in out
    assert "Item" not in dynamodb_client.get_item(
        TableName=new_table, Key={"id": {"S": stored_key}}
    )
    assert_one_line_error(run(capsys, "inspect", "order-1234", *store), "no live record")
    assert_one_line_error(run(capsys, "delete", "order-1234", *store), "no record for this key")


@pytest.mark.dynamodb
def test_inspect_with_a_composite_key_table(
    capsys: pytest.CaptureFixture[str], dynamodb_endpoint: str, dynamodb_client: Any, new_table: str
) -> None:
    from idem_middleware.persistence.dynamodb import DynamoDBPersistenceLayer

    table = [*dynamodb_args(dynamodb_endpoint, new_table), "--key-attr", "pk"]
    assert run(capsys, "create-table", *table, "--sort-key-attr", "sk")[0] == 0
    layer = DynamoDBPersistenceLayer(
        new_table, key_attr="pk", sort_key_attr="sk", boto3_client=dynamodb_client
    )
    layer.configure(IdempotencyConfig(key_prefix="billing"))
    stored_key = complete(layer, "order-9", None)

    code, out, err = run(
        capsys, "inspect", "order-9", *table, "--sort-key-attr", "sk", "--key-prefix", "billing"
    )

    assert code == 0, err
    assert stored_key.startswith("billing#")
    assert_inspect_shows_the_record(out, stored_key)


@pytest.fixture
def sqlite_store(tmp_path: Path) -> tuple[BasePersistenceLayer, Path]:
    from idem_middleware.persistence.sqlite import SQLitePersistenceLayer

    path = tmp_path / "idempotency.sqlite3"
    layer = SQLitePersistenceLayer(path)
    layer.configure(IdempotencyConfig())
    return layer, path


def test_inspect_and_delete_on_sqlite(
    capsys: pytest.CaptureFixture[str], sqlite_store: tuple[BasePersistenceLayer, Path]
) -> None:
    layer, path = sqlite_store
    stored_key = complete(layer, "order-1234", "user:alice")
    store = ["--sqlite-path", str(path), "--scope", "user:alice"]

    code, out, err = run(capsys, "inspect", "order-1234", *store)
    assert code == 0, err
    assert_inspect_shows_the_record(out, stored_key)
    assert "order-1234" not in out

    # The quoted sf-string form names the same key, as it does for the middleware.
    code, out, err = run(capsys, "inspect", '"order-1234"', *store, "--show-body")
    assert code == 0, err
    assert f"body         {len(PAYMENT_BODY)} bytes:\n{PAYMENT_BODY.decode()}\n" in out

    # Another scope is another record.
    assert_one_line_error(
        run(capsys, "inspect", "order-1234", "--sqlite-path", str(path), "--scope", "user:bob"),
        "no live record",
        "--scope",
    )

    code, out, err = run(capsys, "delete", "order-1234", *store)
    assert code == 0, err
    assert f"removed the record {stored_key}" in out
    assert_one_line_error(run(capsys, "inspect", "order-1234", *store), "no live record")
    assert layer.save_inprogress(stored_key, HASH).status == "INPROGRESS", "the key runs again"


def test_store_by_url(
    capsys: pytest.CaptureFixture[str],
    sqlite_store: tuple[BasePersistenceLayer, Path],
    closed_port: int,
) -> None:
    """``--url`` takes the URL the app gives ``from_url``; inspect still creates no file."""
    layer, path = sqlite_store
    stored_key = complete(layer, "order-1234", "user:alice")

    code, out, err = run(
        capsys, "inspect", "order-1234", "--url", f"sqlite:///{path}", "--scope", "user:alice"
    )
    assert code == 0, err
    assert_inspect_shows_the_record(out, stored_key)

    missing = path.with_name("missing.sqlite3")
    assert_one_line_error(
        run(capsys, "inspect", "k", "--url", f"sqlite:///{missing}"), "no SQLite file at"
    )
    assert not missing.exists()
    port = closed_port
    closed = f"postgresql://app:s3cret@127.0.0.1:{port}/idem"
    message = assert_one_line_error(
        run(capsys, "inspect", "k", "--url", closed),
        f"PostgreSQL database 'idem' at 127.0.0.1:{port}",
        "Connection refused",
        "that the server runs",  # the fix, after psycopg's two-line message: all on one line
    )
    assert "s3cret" not in message
    assert_one_line_error(
        run(capsys, "delete", "k", "--url", "sqlite:///x.sqlite3", "--table", "t"),
        "name one store",
    )


@pytest.mark.dynamodb
def test_missing_table_by_url(capsys: pytest.CaptureFixture[str], dynamodb_endpoint: str) -> None:
    table = f"idem-missing-{uuid.uuid4().hex[:8]}"
    url = f"dynamodb://{table}?region={REGION}&endpoint_url={dynamodb_endpoint}"

    assert_one_line_error(
        run(capsys, "inspect", "k", "--url", url),
        f"on table {table!r} (region {REGION}, endpoint {dynamodb_endpoint})",
        "ResourceNotFoundException",
        "idem-middleware create-table --table",
    )


def test_inspect_an_inprogress_record_and_a_binary_body(
    capsys: pytest.CaptureFixture[str], sqlite_store: tuple[BasePersistenceLayer, Path]
) -> None:
    layer, path = sqlite_store
    running = layer.build_idempotency_key(header_key_material("running"))
    layer.save_inprogress(running, HASH)
    binary = layer.build_idempotency_key(header_key_material("binary"))
    body = bytes(range(256))
    layer.save_success(
        layer.save_inprogress(binary, HASH),
        StoredResponse(200, (("content-type", "application/octet-stream"),), body),
    )

    code, out, err = run(capsys, "inspect", "running", "--sqlite-path", str(path))
    assert code == 0, err
    assert "status       INPROGRESS (a request is running it" in out
    assert "lease        held until" in out
    assert "response     none yet" in out

    code, out, err = run(
        capsys, "inspect", "binary", "--sqlite-path", str(path), "--json", "--show-body"
    )
    assert code == 0, err
    response = json.loads(out)["response"]
    assert response["body_bytes"] == 256
    assert "body" not in response
    assert base64.b64decode(response["body_base64"]) == body


def test_inspect_by_stored_key(
    capsys: pytest.CaptureFixture[str], sqlite_store: tuple[BasePersistenceLayer, Path]
) -> None:
    layer, path = sqlite_store
    stored_key = complete(layer, "order-1", None)

    code, out, err = run(capsys, "inspect", stored_key, "--stored-key", "--sqlite-path", str(path))

    assert code == 0, err
    assert_inspect_shows_the_record(out, stored_key)


@pytest.mark.redis
def test_inspect_and_delete_on_redis(capsys: pytest.CaptureFixture[str], redis_url: str) -> None:
    from idem_middleware.persistence.redis import RedisPersistenceLayer

    namespace = f"cli-{uuid.uuid4().hex}:"
    layer = RedisPersistenceLayer(redis_url, key_namespace=namespace)
    layer.configure(IdempotencyConfig())
    stored_key = complete(layer, "order-1234", "user:alice")
    store = ["--redis-url", redis_url, "--redis-namespace", namespace, "--scope", "user:alice"]

    code, out, err = run(capsys, "inspect", "order-1234", *store)
    assert code == 0, err
    assert_inspect_shows_the_record(out, stored_key)

    code, out, err = run(capsys, "delete", "order-1234", *store)
    assert code == 0, err
    assert f"removed the record {stored_key}" in out
    assert layer.client.exists(layer.redis_key(stored_key)) == 0
    assert_one_line_error(run(capsys, "delete", "order-1234", *store), "no record for this key")


# PostgreSQL -------------------------------------------------------------------------------------


def postgres_url(conninfo: str) -> str:
    """The session database's conninfo (libpq key=value) as the URL an app gives from_url."""
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(conninfo)
    host, port = params.get("host", "127.0.0.1"), params.get("port", "5432")
    return f"postgresql://{params.get('user', 'postgres')}@{host}:{port}/{params['dbname']}"


def postgres_relation(conninfo: str, name: str) -> str | None:
    import psycopg

    with psycopg.connect(conninfo, autocommit=True) as connection:
        row = connection.execute("SELECT to_regclass(%s)::text", (name,)).fetchone()
    return None if row is None else row[0]


@pytest.fixture
def postgres_table(postgres_conninfo: str) -> Iterator[str]:
    """A table name nothing uses yet in the session's database; dropped after the test."""
    import psycopg
    from psycopg import sql

    name = f"idem_cli_{uuid.uuid4().hex[:12]}"
    yield name
    with psycopg.connect(postgres_conninfo, autocommit=True) as connection:
        connection.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))


@pytest.mark.postgres
def test_create_table_inspect_and_delete_on_postgres(
    capsys: pytest.CaptureFixture[str], postgres_conninfo: str, postgres_table: str
) -> None:
    from idem_middleware.exceptions import IdempotencyItemNotFoundError
    from idem_middleware.persistence.postgres import PostgresPersistenceLayer

    table = ["--postgres-table", postgres_table]
    store = ["--postgres-dsn", postgres_conninfo, *table]  # a libpq key=value string
    first = run(capsys, "create-table", *store)
    second = run(capsys, "create-table", *store)

    named = f"PostgreSQL table {postgres_table} (database "
    assert first[0] == 0, first
    assert first[1].startswith(named), first
    assert ": created; with its expiry index" in first[1], first
    assert second[0] == 0, second
    assert second[1].startswith(named), second
    assert ": already existed;" in second[1], second
    layer = PostgresPersistenceLayer(postgres_conninfo, table_name=postgres_table)
    layer.configure(IdempotencyConfig())
    try:
        stored_key = complete(layer, "order-1234", "user:alice")

        code, out, err = run(capsys, "inspect", "order-1234", *store, "--scope", "user:alice")
        assert code == 0, err
        assert_inspect_shows_the_record(out, stored_key)
        assert f"store        {named}" in out

        # The URL the app gives from_url names the same store.
        url = ["--url", postgres_url(postgres_conninfo), *table, "--scope", "user:alice"]
        code, out, err = run(capsys, "inspect", "order-1234", *url, "--json")
        assert code == 0, err
        assert json.loads(out)["stored_key"] == stored_key

        code, out, err = run(capsys, "delete", "order-1234", *url)
        assert code == 0, err
        assert f"removed the record {stored_key} from {named}" in out
        with pytest.raises(IdempotencyItemNotFoundError):
            layer.get_record(stored_key)
        assert_one_line_error(run(capsys, "delete", "order-1234", *url), "no record for this key")
    finally:
        layer.close()


@pytest.mark.postgres
def test_create_table_in_a_postgres_schema(
    capsys: pytest.CaptureFixture[str], postgres_conninfo: str
) -> None:
    import psycopg

    schema = f"idem_cli_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_conninfo, autocommit=True) as connection:
        connection.execute(f"CREATE SCHEMA {schema}")
    try:
        code, out, err = run(
            capsys,
            "create-table",
            "--url",
            postgres_url(postgres_conninfo),
            "--postgres-schema",
            schema,
        )

        assert code == 0, err
        assert out.startswith(f"PostgreSQL table {schema}.idempotency_records (database ")
        assert postgres_relation(postgres_conninfo, f"{schema}.idempotency_records")
    finally:
        with psycopg.connect(postgres_conninfo, autocommit=True) as connection:
            connection.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.mark.postgres
def test_missing_postgres_table(capsys: pytest.CaptureFixture[str], postgres_conninfo: str) -> None:
    table = f"idem_missing_{uuid.uuid4().hex[:8]}"
    for command in ("inspect", "delete"):
        line = assert_one_line_error(
            run(
                capsys, command, "k", "--postgres-dsn", postgres_conninfo, "--postgres-table", table
            ),
            f"table {table} does not exist in database ",
            "create_table()",
        )
        assert line.startswith(f"idem-middleware {command}: error: ")
    assert postgres_relation(postgres_conninfo, table) is None, "inspect must not create a table"


def test_create_table_is_for_dynamodb_and_postgres(
    capsys: pytest.CaptureFixture[str], sqlite_store: tuple[BasePersistenceLayer, Path]
) -> None:
    _, path = sqlite_store
    for url in (f"sqlite:///{path}", "redis://localhost:6379/0", "memory://"):
        assert_one_line_error(
            run(capsys, "create-table", "--url", url), "takes --table NAME, --postgres-dsn DSN"
        )
    code, _, err = run(capsys, "create-table", "--sqlite-path", str(path))
    assert code == 2, "create-table has no --sqlite-path"
    assert "unrecognized arguments: --sqlite-path" in err


# One-line errors --------------------------------------------------------------------------------


@pytest.mark.dynamodb
def test_missing_table(capsys: pytest.CaptureFixture[str], dynamodb_endpoint: str) -> None:
    table = f"idem-missing-{uuid.uuid4().hex[:8]}"
    for command in ("inspect", "delete"):
        line = assert_one_line_error(
            run(capsys, command, "k", *dynamodb_args(dynamodb_endpoint, table)),
            f"on table {table!r} (region {REGION}, endpoint {dynamodb_endpoint})",
            "ResourceNotFoundException",
            "idem-middleware create-table --table",
        )
        assert line.startswith(f"idem-middleware {command}: error: ")


def test_unreachable_dynamodb_endpoint(
    capsys: pytest.CaptureFixture[str], closed_port: int
) -> None:
    endpoint = f"http://127.0.0.1:{closed_port}"
    for argv in (
        ["create-table", *dynamodb_args(endpoint, "t")],
        ["inspect", "k", *dynamodb_args(endpoint, "t")],
        ["delete", "k", *dynamodb_args(endpoint, "t")],
    ):
        assert_one_line_error(
            run(capsys, *argv),
            f"(region {REGION}, endpoint {endpoint}) failed: Could not connect",
            "check the region, the endpoint URL",
        )


def test_no_aws_credentials(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    closed_port: int,
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.delenv("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", raising=False)
    monkeypatch.delenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", raising=False)

    assert_one_line_error(
        run(capsys, "create-table", *dynamodb_args(f"http://127.0.0.1:{closed_port}", "t")),
        "Unable to locate credentials",
        "give this process AWS credentials",
    )


def test_no_aws_region(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))

    assert_one_line_error(run(capsys, "create-table", "--table", "t"), "no AWS region", "--region")


def test_unreachable_redis(capsys: pytest.CaptureFixture[str], closed_port: int) -> None:
    port = closed_port
    for command in ("inspect", "delete"):
        assert_one_line_error(
            run(capsys, command, "k", "--redis-url", f"redis://127.0.0.1:{port}/0"),
            f"Redis PING on 127.0.0.1:{port} failed",
            "Connection refused",
            "check that Redis is running",
        )


def test_redis_password_stays_out_of_messages(
    capsys: pytest.CaptureFixture[str], closed_port: int
) -> None:
    port = closed_port
    url = f"redis://app:s3cret@127.0.0.1:{port}/0"

    line = assert_one_line_error(
        run(capsys, "inspect", "k", "--redis-url", url), f"127.0.0.1:{port}", "Connection refused"
    )

    assert "s3cret" not in line


@pytest.mark.redis
def test_redis_refuses_the_credentials(capsys: pytest.CaptureFixture[str], redis_url: str) -> None:
    """The session's redis-server has no password: AUTH with one is refused, not unreachable."""
    url = redis_url.replace("redis://", "redis://app:s3cret@", 1)

    line = assert_one_line_error(
        run(capsys, "delete", "k", "--redis-url", url),
        "Redis PING on",
        "set the username and password",
    )

    assert "s3cret" not in line


def test_missing_key(
    capsys: pytest.CaptureFixture[str], sqlite_store: tuple[BasePersistenceLayer, Path]
) -> None:
    layer, path = sqlite_store
    complete(layer, "another-key", None)

    assert_one_line_error(
        run(capsys, "inspect", "order-404", "--sqlite-path", str(path)), "no live record"
    )
    assert_one_line_error(
        run(capsys, "delete", "order-404", "--sqlite-path", str(path)),
        "no record for this key",
    )


def test_unusable_sqlite_paths(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    missing = tmp_path / "missing.sqlite3"
    assert_one_line_error(
        run(capsys, "inspect", "k", "--sqlite-path", str(missing)), "no SQLite file at"
    )
    assert not missing.exists(), "inspect must not create a store"

    assert_one_line_error(
        run(capsys, "inspect", "k", "--sqlite-path", str(tmp_path)), "is a directory"
    )

    not_sqlite = tmp_path / "notes.txt"
    not_sqlite.write_text("hello, this is not a database " * 10)
    assert_one_line_error(
        run(capsys, "delete", "k", "--sqlite-path", str(not_sqlite)), "cannot read SQLite file"
    )

    other = tmp_path / "ledger.sqlite3"
    with sqlite3.connect(other) as connection:
        connection.execute("CREATE TABLE payments (id TEXT)")
    connection.close()
    assert_one_line_error(
        run(capsys, "inspect", "k", "--sqlite-path", str(other)),
        "has no table 'idempotency_records'",
    )


def test_store_must_be_named_once(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert_one_line_error(run(capsys, "inspect", "k"), "which store?")
    assert_one_line_error(
        run(capsys, "inspect", "k", "--table", "t", "--redis-url", "redis://x"), "name one store"
    )
    assert_one_line_error(run(capsys, "inspect", "k", "--store", "sqlite"), "--sqlite-path")
    assert_one_line_error(run(capsys, "inspect", "k", "--store", "postgres"), "--postgres-dsn DSN")
    assert_one_line_error(
        run(capsys, "create-table", "--table", "t", "--postgres-dsn", "host=db"), "name one store"
    )


def test_invalid_key(
    capsys: pytest.CaptureFixture[str], sqlite_store: tuple[BasePersistenceLayer, Path]
) -> None:
    _, path = sqlite_store
    assert_one_line_error(
        run(capsys, "inspect", "two words", "--sqlite-path", str(path)),
        "not a valid Idempotency-Key",
    )


def test_missing_optional_dependencies(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for module in ("boto3", "redis", "psycopg"):
        monkeypatch.setitem(sys.modules, module, None)
    for backend in ("dynamodb", "redis", "postgres"):
        monkeypatch.delitem(sys.modules, f"idem_middleware.persistence.{backend}", raising=False)

    assert_one_line_error(
        run(capsys, "create-table", "--table", "t"), "needs boto3", "idem-middleware[dynamodb]"
    )
    assert_one_line_error(
        run(capsys, "inspect", "k", "--redis-url", "redis://localhost"),
        "needs redis-py",
        "idem-middleware[redis]",
    )
    for dsn in ("postgresql://app@db/app", "host=db dbname=app"):
        assert_one_line_error(
            run(capsys, "inspect", "k", "--postgres-dsn", dsn),
            "needs psycopg",
            "idem-middleware[postgres]",
        )


def test_console_script(tmp_path: Path) -> None:
    """The installed ``idem-middleware`` script: a store error is one line and exit code 1."""
    script = Path(sys.executable).with_name("idem-middleware")
    assert script.exists(), f"console script not installed next to {sys.executable}"
    missing = tmp_path / "missing.sqlite3"

    result = subprocess.run(
        [str(script), "inspect", "order-1", "--sqlite-path", str(missing)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == f"idem-middleware inspect: error: no SQLite file at {missing}\n"
