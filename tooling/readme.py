"""The README's Python blocks, as the tests and the wheel check run them.

A block runs in a fresh namespace; one preceded by ``<!-- readme-test: continue -->`` runs in
the namespace of the block before it (a test client exercising the app just shown). Every block
runs: there is no way to leave one out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tooling import ROOT

README = ROOT / "README.md"
MARKER = re.compile(r"<!-- readme-test: (continue) -->")


@dataclass(frozen=True)
class Snippet:
    line: int  # where its ``` fence is, 1-based
    code: str
    marker: str | None


def snippets(text: str) -> list[Snippet]:
    """Every ```python block of ``text``, with the marker on the line before it."""
    found: list[Snippet] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        if lines[index].strip() == "```python":
            start = index
            end = lines.index("```", index + 1)
            previous = next((line for line in reversed(lines[:start]) if line.strip()), "")
            match = MARKER.fullmatch(previous.strip())
            if previous.strip().startswith("<!--") and match is None:
                raise ValueError(f"README line {start}: unknown marker {previous!r}")
            found.append(
                Snippet(start + 1, "\n".join(lines[start + 1 : end]), match and match.group(1))
            )
            index = end
        index += 1
    return found


def chains(path: Path = README) -> list[list[Snippet]]:
    """The snippets grouped as they run: a block and the blocks that continue it."""
    groups: list[list[Snippet]] = []
    for snippet in snippets(path.read_text(encoding="utf-8")):
        if snippet.marker == "continue":
            if not groups:
                raise ValueError(f"README line {snippet.line}: nothing to continue")
            groups[-1].append(snippet)
        else:
            groups.append([snippet])
    return groups


def script(chain: list[Snippet]) -> str:
    """One chain as a Python file, each block compiled under its README line for tracebacks."""
    parts = [f"namespace = {{'__name__': 'readme_line_{chain[0].line}'}}"]
    for snippet in chain:
        parts.append(
            f"exec(compile({snippet.code!r}, 'README.md:{snippet.line}', 'exec'), namespace)"
        )
    return "\n".join(parts) + "\n"
