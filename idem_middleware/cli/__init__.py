"""``idem-middleware``: create the DynamoDB or PostgreSQL table, inspect or delete one key's record.

One module per command (:mod:`~idem_middleware.cli.create_table`,
:mod:`~idem_middleware.cli.inspect`, :mod:`~idem_middleware.cli.delete`), each with its
``register(commands)`` and ``run(args, out)``; :mod:`~idem_middleware.cli.stores` builds the store
the options name with :func:`idem_middleware.persistence.from_url`.

Mistakes the user can fix (no credentials, a missing table, a store that does not answer, a
missing optional dependency) are one line on stderr and a non-zero exit code, never a traceback:
a store fault is the layer's typed ``IdempotencyPersistenceLayerError``, whose message names the
store and the fix; the CLI's own checks raise :class:`CLIError`; :func:`main` prints either.

Exit codes: 0 success, 1 error (or no record for the key), 2 usage error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import idem_middleware
from idem_middleware.cli import create_table, delete, inspect
from idem_middleware.cli.errors import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    PROG,
    CLIError,
    one_line,
    wrap,
)
from idem_middleware.exceptions import IdempotencyPersistenceLayerError

__all__ = ["CLIError", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=wrap("Operate idem_middleware's idempotency stores."),
        epilog=f"Run '{PROG} COMMAND --help' for a command's options.",
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {idem_middleware.__version__}"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in (create_table, inspect, delete):
        command.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error argparse has printed
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    try:
        code: int = args.run(args, sys.stdout)
    except (CLIError, IdempotencyPersistenceLayerError) as exc:
        print(f"{PROG} {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return code
