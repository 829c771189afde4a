"""``idem-middleware create-table``: a DynamoDB or PostgreSQL table, as the layer is configured."""

from __future__ import annotations

import argparse
from typing import Any, TextIO

from idem_middleware.cli.errors import PROG, wrap
from idem_middleware.cli.options import add_store_options
from idem_middleware.cli.stores import open_store
from idem_middleware.exceptions import StoreNotFoundError

KINDS = ("dynamodb", "postgres")


def register(commands: Any) -> None:
    parser: argparse.ArgumentParser = commands.add_parser(
        "create-table",
        help="create the DynamoDB or PostgreSQL table (safe to run twice)",
        description=wrap(
            "Create the idempotency table, as the layer is configured. DynamoDB: on-demand "
            "billing, TTL enabled on the expiry attribute. PostgreSQL: the table and its expiry "
            "index, then checked as the app's check() does. Safe to run twice: an existing "
            "table is left as it is (DynamoDB's TTL is enabled on it if it was not). SQLite "
            "and Redis need no table."
        ),
        epilog=f"examples:\n  {PROG} create-table --table idempotency "
        f"--endpoint-url http://localhost:8000\n  {PROG} create-table --postgres-dsn "
        "postgresql://app@db.internal/app --postgres-table idempotency_records",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_store_options(parser, kinds=KINDS)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace, out: TextIO) -> int:
    with open_store(args, kinds=KINDS, check=False) as store:
        layer: Any = store.layer  # DynamoDB's or PostgreSQL's: both have create_table()
        if store.kind == "dynamodb":
            created = layer.create_table()
            details = (
                f"on-demand billing, key {layer.sort_key_attr or layer.key_attr!r}, "
                f"TTL on {layer.expiry_attr!r}"
            )
        else:
            # create_table() does not say whether it created the table: check() does.
            try:
                layer.check()
                created = False
            except StoreNotFoundError:
                created = True
            layer.create_table()
            layer.check()
            details = "with its expiry index; check() passes"
    state = "created" if created else "already existed"
    print(f"{store.description}: {state}; {details}", file=out)
    return 0
