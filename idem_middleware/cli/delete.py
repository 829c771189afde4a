"""``idem-middleware delete``: clear one key's record, whatever its state."""

from __future__ import annotations

import argparse
from typing import Any, TextIO

from idem_middleware.cli.errors import PROG, CLIError, wrap
from idem_middleware.cli.records import add_record_options, open_record


def register(commands: Any) -> None:
    parser: argparse.ArgumentParser = commands.add_parser(
        "delete",
        help="delete the record of one idempotency key (clear a stuck key)",
        description=wrap(
            "Delete the record of a client's Idempotency-Key, whatever its state: the "
            "next request with the key runs the handler again. A request still holding the key "
            "cannot write its record back. Exits 1 when there was no record."
        ),
        epilog=f"example: {PROG} delete order-1234 --table idempotency --scope user:alice",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_record_options(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace, out: TextIO) -> int:
    with open_record(args) as (store, key):
        if not store.layer.remove_record(key):
            raise CLIError(f"no record for this key in {store.description} (stored key {key})")
    print(f"removed the record {key} from {store.description}", file=out)
    return 0
