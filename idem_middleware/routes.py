"""Path patterns for ``include_paths`` and ``exclude_paths``: globs and route templates.

A pattern may mix three notations, so users can paste the routes they already wrote:

* Starlette / FastAPI templates: ``{name}`` is one non-empty segment; ``{name:path}`` is the rest
  of the path, ``/`` included; ``{name:int}``, ``{name:float}`` and ``{name:uuid}`` match what
  Starlette's converters match; any other converter (a custom one) matches one segment.
* Flask / Werkzeug rules: ``<name>`` and ``<converter:name>`` are one segment, ``<path:name>``
  is the rest of the path.
* Globs, as :mod:`fnmatch` reads them: ``*`` matches any run of characters **including** ``/``
  (``/orders/*`` covers ``/orders/1`` and ``/orders/1/items``, as it always has), ``?`` one
  character, ``[seq]`` / ``[!seq]`` one character in / not in ``seq``. Use ``{id}`` for exactly
  one segment.

Everything else is literal. All patterns of an option compile to one regex, so each request
pays a single match.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# Starlette's converters (starlette.convertors.CONVERTOR_TYPES), as regexes.
_STARLETTE_CONVERTERS = {
    "str": "[^/]+",
    "path": ".*",
    "int": "[0-9]+",
    "float": r"[0-9]+(?:\.[0-9]+)?",
    "uuid": "[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}",
}
_SEGMENT = "[^/]+"
_REST = ".*"

# Starlette's own parameter grammar (starlette.routing.PARAM_REGEX), anchored at a ``{``.
_STARLETTE_PARAM = re.compile(r"\{([a-zA-Z_][a-zA-Z0-9_]*)(?::([a-zA-Z_][a-zA-Z0-9_]*))?\}")
# Werkzeug's rule variables: ``<name>``, ``<conv:name>``, ``<conv(args):name>``.
_WERKZEUG_PARAM = re.compile(
    r"<(?:([a-zA-Z_][a-zA-Z0-9_]*)(?:\([^)]*\))?:)?([a-zA-Z_][a-zA-Z0-9_]*)>"
)


def compile_paths(patterns: Iterable[str]) -> re.Pattern[str]:
    """One regex for every pattern, to be used with ``fullmatch``; no pattern matches nothing.

    Raises :class:`ValueError` for a malformed template (see :func:`translate`).
    """
    alternatives = [f"(?:{translate(pattern)})" for pattern in patterns]
    return re.compile("|".join(alternatives) or "(?!)", re.DOTALL)


def translate(pattern: str) -> str:
    """The regex (for ``fullmatch``) of one pattern.

    Raises :class:`ValueError` when a ``{``, ``}``, ``<`` or ``>`` is not part of a well-formed
    template variable: a pattern that can never match what its author meant must not be
    accepted silently.
    """
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        char = pattern[i]
        if char == "{":
            param = _STARLETTE_PARAM.match(pattern, i)
            if param is None:
                raise ValueError(f"{pattern!r}: malformed route template variable at {i}")
            converter = param[2] or "str"
            out.append(_STARLETTE_CONVERTERS.get(converter, _SEGMENT))
            i = param.end()
        elif char == "<":
            param = _WERKZEUG_PARAM.match(pattern, i)
            if param is None:
                raise ValueError(f"{pattern!r}: malformed route rule variable at {i}")
            out.append(_REST if param[1] == "path" else _SEGMENT)
            i = param.end()
        elif char in "}>":
            raise ValueError(f"{pattern!r}: {char!r} at {i} closes no template variable")
        elif char == "*":
            out.append(".*")
            i += 1
        elif char == "?":
            out.append(".")
            i += 1
        elif char == "[":
            i = _translate_set(pattern, i, out)
        else:
            out.append(re.escape(char))
            i += 1
    return "".join(out)


def _translate_set(pattern: str, start: int, out: list[str]) -> int:
    """Translate the ``[seq]`` at ``start`` as fnmatch does; a ``[`` that closes nothing is
    literal. Returns the index after it.
    """
    j = start + 1
    if j < len(pattern) and pattern[j] == "!":
        j += 1
    if j < len(pattern) and pattern[j] == "]":  # a leading "]" is a member, not the end
        j += 1
    end = pattern.find("]", j)
    if end < 0:
        out.append(re.escape("["))
        return start + 1
    members = pattern[start + 1 : end].replace("\\", "\\\\")
    if members.startswith("!"):
        members = "^" + members[1:]
    elif members.startswith("^"):
        members = "\\" + members
    out.append(f"[{members}]")
    return end + 1
