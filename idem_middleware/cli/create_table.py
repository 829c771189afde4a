"""``idem-middleware create-table``: the DynamoDB table, as the layer is configured."""

from __future__ import annotations

import argparse
from typing import Any, TextIO

from idem_middleware.cli.errors import PROG, wrap
from idem_middleware.cli.stores import add_aws_options, add_table_options, dynamodb_store
from idem_middleware.exceptions import IdempotencyPersistenceLayerError


def register(commands: Any) -> None:
    parser: argparse.ArgumentParser = commands.add_parser(
        "create-table",
        help="create the DynamoDB table (safe to run twice)",
        description=wrap(
            "Create the DynamoDB idempotency table: on-demand billing, TTL enabled on "
            "the expiry attribute, attribute names as the layer is configured. Safe to run twice: "
            "an existing table is left as it is (TTL is enabled on it if it was not)."
        ),
        epilog=f"example: {PROG} create-table --table idempotency "
        "--endpoint-url http://localhost:8000",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_table_options(parser, required=True)
    add_aws_options(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace, out: TextIO) -> int:
    store = dynamodb_store(args)
    from idem_middleware.persistence.dynamodb import DynamoDBPersistenceLayer  # boto3 is there

    assert isinstance(store.layer, DynamoDBPersistenceLayer)
    try:
        created = store.layer.create_table()
    except IdempotencyPersistenceLayerError as exc:
        raise store.translate(exc) from None
    state = "created" if created else "already existed"
    print(
        f"table {args.table!r} {state} ({store.where}); "
        f"on-demand billing, key {args.sort_key_attr or args.key_attr!r}, "
        f"TTL on {args.expiry_attr!r}",
        file=out,
    )
    return 0
