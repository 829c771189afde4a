"""What ``inspect`` and ``delete`` share: the record's key, built as the middleware builds it."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager

from idem_middleware.cli.errors import CLIError
from idem_middleware.cli.options import add_store_options
from idem_middleware.cli.stores import Store, open_store
from idem_middleware.exceptions import IdempotencyKeyInvalidError
from idem_middleware.keys import header_key_material, parse_key

#: The stores whose records inspect and delete read (memory:// lives in one process).
KINDS = ("dynamodb", "postgres", "sqlite", "redis")


def add_record_options(parser: argparse.ArgumentParser) -> None:
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
    add_store_options(parser, kinds=KINDS)


@contextmanager
def open_record(args: argparse.Namespace) -> Iterator[tuple[Store, str]]:
    """The store, checked, and the key the middleware stores the record of the client key
    ``args.key`` under. The key is checked before the store is opened.
    """
    key = str(args.key)
    if not args.stored_key:
        try:
            key = header_key_material(parse_key([key]))
        except IdempotencyKeyInvalidError as exc:
            raise CLIError(f"not a valid Idempotency-Key: {exc.detail}") from None
    with open_store(args, kinds=KINDS, check=True) as store:
        if not args.stored_key:
            key = store.layer.build_idempotency_key(key, args.scope)
        yield store, key
