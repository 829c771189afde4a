"""``from_url``: each scheme builds its layer; each unusable URL is a ValueError saying why."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from idem_middleware.config import IdempotencyConfig
from idem_middleware.persistence import InMemoryPersistenceLayer, from_url
from idem_middleware.persistence.url import redacted


def test_memory() -> None:
    assert isinstance(from_url("memory://"), InMemoryPersistenceLayer)


def test_sqlite_three_slashes_relative_four_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from idem_middleware.persistence import SQLitePersistenceLayer

    monkeypatch.chdir(tmp_path)
    relative = from_url("sqlite:///data/idem.sqlite3")
    absolute = from_url(f"sqlite:///{tmp_path}/abs.sqlite3")  # tmp_path starts with "/"

    assert isinstance(relative, SQLitePersistenceLayer)
    assert relative.path == "data/idem.sqlite3"
    assert isinstance(absolute, SQLitePersistenceLayer)
    assert absolute.path == f"{tmp_path}/abs.sqlite3"
    assert Path(absolute.path).is_absolute()


def test_sqlite_path_is_percent_decoded() -> None:
    layer: Any = from_url("sqlite:///odd%3Fname%23%25.sqlite3")
    assert layer.path == "odd?name#%.sqlite3"


def test_sqlite_parameters_and_options_reach_the_layer(tmp_path: Path) -> None:
    layer: Any = from_url(
        f"sqlite:///{tmp_path}/idem.sqlite3?table_name=records&synchronous=normal",
        busy_timeout_seconds=1.5,
    )
    layer.configure(IdempotencyConfig())
    layer.save_inprogress(layer.build_idempotency_key("k"), "f" * 64)

    assert layer.table_name == "records"
    import sqlite3

    with sqlite3.connect(tmp_path / "idem.sqlite3") as connection:
        assert connection.execute("SELECT COUNT(*) FROM records").fetchone() == (1,)
    connection.close()


def test_redis_url_goes_to_redis_py_as_it_is() -> None:
    layer: Any = from_url("redis://app:s3cret@127.0.0.1:6390/3?socket_timeout=0.5")
    kwargs = layer.client.connection_pool.connection_kwargs

    assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("127.0.0.1", 6390, 3)
    assert kwargs["password"] == "s3cret"
    assert kwargs["socket_timeout"] == 0.5
    tls: Any = from_url("rediss://cache.example.com:6380/0", key_namespace="app:")
    assert tls.client.connection_pool.connection_class.__name__ == "SSLConnection"
    assert tls.key_namespace == "app:"


@pytest.mark.postgres
@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_postgresql_url_round_trip(postgres_conninfo: str, scheme: str) -> None:
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(postgres_conninfo)
    user = params.get("user", "postgres")
    host, port = params.get("host", "127.0.0.1"), params.get("port", "5432")
    url = f"{scheme}://{user}@{host}:{port}/{params['dbname']}"
    layer: Any = from_url(url, table_name=f"from_url_{scheme}")
    try:
        layer.create_table()
        layer.configure(IdempotencyConfig())
        key = layer.build_idempotency_key("header:from-url")
        layer.save_inprogress(key, "hash")
        assert layer.get_record(key).status == "INPROGRESS"
    finally:
        layer.close()


@pytest.mark.parametrize(
    "url", ["postgresql:///idem", "postgres:///idem?host=/run/postgresql&sslmode=disable"]
)
def test_a_postgresql_url_without_a_host_keeps_its_empty_authority(url: str) -> None:
    layer: Any = from_url(url)
    assert layer.conninfo == url


def test_dynamodb_client_from_the_query() -> None:
    from idem_middleware.persistence import DynamoDBPersistenceLayer

    layer = from_url(
        "dynamodb://payments-idem?region=eu-west-1&endpoint_url=http://127.0.0.1:8000"
        "&connect_timeout=1&read_timeout=3&max_attempts=2&key_attr=pk&sort_key_attr=sk"
    )

    assert isinstance(layer, DynamoDBPersistenceLayer)
    assert layer.table_name == "payments-idem"
    assert (layer.key_attr, layer.sort_key_attr) == ("pk", "sk")
    client: Any = layer.client
    assert client.meta.region_name == "eu-west-1"
    assert client.meta.endpoint_url == "http://127.0.0.1:8000"
    assert client.meta.config.connect_timeout == 1
    assert client.meta.config.read_timeout == 3
    assert client.meta.config.retries["total_max_attempts"] == 2


def test_dynamodb_takes_a_client_as_an_option() -> None:
    import boto3

    client = boto3.client("dynamodb", region_name="us-west-2")
    layer: Any = from_url("dynamodb://t", boto3_client=client)
    assert layer.client is client
    with pytest.raises(ValueError, match="with boto3_client, configure that client"):
        from_url("dynamodb://t?region=eu-west-1", boto3_client=client)


@pytest.mark.dynamodb
def test_dynamodb_local_round_trip(dynamodb_endpoint: str, dynamodb_client: Any) -> None:
    table = f"idem-url-{uuid.uuid4().hex[:8]}"
    layer: Any = from_url(f"dynamodb://{table}?region=us-east-1&endpoint_url={dynamodb_endpoint}")
    layer.create_table()
    try:
        layer.configure(IdempotencyConfig())
        key = layer.build_idempotency_key("order-1")
        layer.save_inprogress(key, "f" * 64)
        assert layer.get_record(key).status == "INPROGRESS"
    finally:
        dynamodb_client.delete_table(TableName=table)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("idempotency.sqlite3", "not a store URL"),
        ("", "not a store URL"),
        ("ftp://host/x", "unknown store URL scheme 'ftp'"),
        ("memory://somewhere", "memory:// takes no host nor path"),
        ("sqlite://", "sqlite:// needs a file"),
        ("sqlite://host/file.sqlite3", "sqlite:// has no host"),
        ("sqlite:///:memory:", "needs a file"),
        ("sqlite:///f.sqlite3?table=x", "unknown parameter 'table'"),
        ("sqlite:///f.sqlite3?table_name=a;drop", "table_name must be a plain SQL identifier"),
        ("sqlite:///f.sqlite3?busy_timeout_seconds=soon", "invalid busy_timeout_seconds"),
        ("sqlite:///f.sqlite3?table_name=", "parameter 'table_name' is empty"),
        ("sqlite:///f.sqlite3#frag", "unexpected fragment"),
        ("redis:///0", "redis:// needs a host"),
        ("redis://localhost:99999/0", "invalid store URL"),
        ("dynamodb://", "dynamodb:// needs a table name"),
        ("dynamodb://t/extra", "unexpected path"),
        ("dynamodb://t?region=a&region=b", "parameter 'region' given twice"),
        ("dynamodb://t?max_attempts=0", "invalid max_attempts"),
        ("dynamodb://t?regoin=eu-west-1", "unknown parameter 'regoin'"),
        ("dynamodb://t?region=eu-west-1&key_attr=id&sort_key_attr=id", "must differ"),
    ],
)
def test_unusable_urls_are_value_errors(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        from_url(url)


def test_a_parameter_given_twice_over_url_and_options() -> None:
    with pytest.raises(ValueError, match="'table_name' given both in the URL and as an option"):
        from_url("sqlite:///f.sqlite3?table_name=a", table_name="b")


def test_dynamodb_without_a_region(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(ValueError, match=r"no AWS region: add \?region="):
        from_url("dynamodb://t")
    with pytest.raises(ValueError, match="no AWS profile 'nobody'"):
        from_url("dynamodb://t?profile=nobody")


def test_passwords_stay_out_of_messages() -> None:
    with pytest.raises(ValueError) as raised:
        from_url("redis://app:s3cret@localhost:99999/0")
    assert "s3cret" not in str(raised.value)
    assert redacted("redis://app:s3cret@h:1/0") == "redis://app:***@h:1/0"
    assert redacted("redis://h:1/0") == "redis://h:1/0"
    assert redacted("rediss://:s3cret@h/0") == "rediss://:***@h/0"


def test_url_must_be_a_string() -> None:
    with pytest.raises(TypeError, match="needs a URL string"):
        from_url(Path("x.sqlite3"))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("url", "blocked", "extra"),
    [
        ("redis://localhost/0", "redis", "redis"),
        ("dynamodb://t", "boto3", "dynamodb"),
        ("postgresql://app@db/idem", "psycopg", "postgres"),
    ],
)
def test_missing_extra_names_it(url: str, blocked: str, extra: str) -> None:
    """In a fresh interpreter where the optional dependency cannot be imported."""
    code = (
        "import sys\n"
        f"sys.modules[{blocked!r}] = None\n"
        "from idem_middleware.persistence import from_url\n"
        "try:\n"
        f"    from_url({url!r})\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**os.environ, "AWS_DEFAULT_REGION": "us-east-1"},
    )
    assert f"pip install 'idem-middleware[{extra}]'" in result.stdout, result.stderr


def test_memory_and_sqlite_import_no_optional_backend() -> None:
    code = (
        "import sys, tempfile, os\n"
        "from idem_middleware.persistence import from_url\n"
        "from_url('memory://')\n"
        "from_url('sqlite:///' + os.path.join(tempfile.mkdtemp(), 'x.sqlite3'))\n"
        "print(sorted(m for m in ('boto3', 'botocore', 'redis') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]"
