"""What every command shares: the program's name, its exit codes and its one-line errors."""

from __future__ import annotations

import textwrap

PROG = "idem-middleware"
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


class CLIError(Exception):
    """A mistake the user can fix: printed as one line on stderr, exit code ``EXIT_ERROR``."""


def one_line(exc: BaseException) -> str:
    """The whole message on one line: a store's message ends with the fix (psycopg's and
    botocore's span lines), so it is joined rather than cut at its first line.
    """
    return " ".join(str(exc).split()) or type(exc).__name__


def wrap(text: str) -> str:
    return textwrap.fill(text, width=79)
