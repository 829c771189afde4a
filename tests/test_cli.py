"""The ``idem-middleware`` command: create-table, inspect, delete, --version, one-line errors.

Commands run in-process through ``main(argv)`` (output captured by ``capsys``), plus one run of
the installed console script. Records are written with the persistence layers the middleware
uses, so ``inspect`` and ``delete`` are shown to find exactly the key the middleware stores.
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
from tooling.processes import free_port

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

    assert first[0] == 0, first
    assert f"table {new_table!r} created" in first[1]
    assert second[0] == 0, second
    assert f"table {new_table!r} already existed" in second[1]
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
    capsys: pytest.CaptureFixture[str], sqlite_store: tuple[BasePersistenceLayer, Path]
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
    closed = f"postgresql://app:s3cret@127.0.0.1:{free_port()}/idem"
    message = assert_one_line_error(
        run(capsys, "inspect", "k", "--url", closed), "cannot use the store"
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
        f"DynamoDB table {table!r} not found",
        f"idem-middleware create-table --table {table}",
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


# One-line errors --------------------------------------------------------------------------------


@pytest.mark.dynamodb
def test_missing_table(capsys: pytest.CaptureFixture[str], dynamodb_endpoint: str) -> None:
    table = f"idem-missing-{uuid.uuid4().hex[:8]}"
    for command in ("inspect", "delete"):
        line = assert_one_line_error(
            run(capsys, command, "k", *dynamodb_args(dynamodb_endpoint, table)),
            f"DynamoDB table {table!r} not found",
            f"idem-middleware create-table --table {table}",
        )
        assert line.startswith(f"idem-middleware {command}: error: ")


def test_unreachable_dynamodb_endpoint(capsys: pytest.CaptureFixture[str]) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    for argv in (
        ["create-table", *dynamodb_args(endpoint, "t")],
        ["inspect", "k", *dynamodb_args(endpoint, "t")],
        ["delete", "k", *dynamodb_args(endpoint, "t")],
    ):
        assert_one_line_error(run(capsys, *argv), f"cannot reach DynamoDB at {endpoint}")


def test_no_aws_credentials(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.delenv("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", raising=False)
    monkeypatch.delenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", raising=False)

    assert_one_line_error(
        run(capsys, "create-table", *dynamodb_args(f"http://127.0.0.1:{free_port()}", "t")),
        "no AWS credentials found",
    )


def test_no_aws_region(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))

    assert_one_line_error(run(capsys, "create-table", "--table", "t"), "no AWS region", "--region")


def test_unreachable_redis(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    for command in ("inspect", "delete"):
        assert_one_line_error(
            run(capsys, command, "k", "--redis-url", url), f"cannot reach Redis at {url}"
        )


def test_redis_password_stays_out_of_messages(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"redis://app:s3cret@127.0.0.1:{free_port()}/0"

    line = assert_one_line_error(run(capsys, "inspect", "k", "--redis-url", url), "cannot reach")

    assert "s3cret" not in line
    assert "app:***@127.0.0.1" in line


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
    monkeypatch.setitem(sys.modules, "boto3", None)
    monkeypatch.setitem(sys.modules, "redis", None)
    monkeypatch.delitem(sys.modules, "idem_middleware.persistence.redis", raising=False)

    assert_one_line_error(
        run(capsys, "create-table", "--table", "t"), "needs boto3", "idem-middleware[dynamodb]"
    )
    assert_one_line_error(
        run(capsys, "inspect", "k", "--redis-url", "redis://localhost"),
        "needs redis-py",
        "idem-middleware[redis]",
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
