"""What every command shares: the program's name, its exit codes and its one-line errors."""

from __future__ import annotations

import textwrap

PROG = "idem-middleware"
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


class CLIError(Exception):
    """A mistake the user can fix: printed as one line on stderr, exit code ``EXIT_ERROR``."""


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def wrap(text: str) -> str:
    return textwrap.fill(text, width=79)
