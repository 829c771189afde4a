"""The README runs: every ```python block is executed, and every link works off GitHub too.

Blocks run one by one, each in a fresh namespace and a fresh working directory (the SQLite files
they create land there). A block preceded by ``<!-- readme-test: continue -->`` runs in the
namespace of the block before it (a test client exercising the app just shown). A block that
cannot run here would be preceded by ``<!-- readme-test: skip REASON -->``; none is today.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARKER = re.compile(r"<!-- readme-test: (continue|skip .+) -->")
REPOSITORY = "https://github.com/idem-middleware/idem-middleware"


@dataclass
class Snippet:
    line: int  # where its ``` fence is, 1-based
    code: str
    marker: str | None


def snippets(text: str) -> list[Snippet]:
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
                raise AssertionError(f"README line {start}: unknown marker {previous!r}")
            found.append(
                Snippet(start + 1, "\n".join(lines[start + 1 : end]), match and match.group(1))
            )
            index = end
        index += 1
    return found


def chains() -> list[list[Snippet]]:
    """The snippets grouped as they run: a block and the blocks that continue it."""
    groups: list[list[Snippet]] = []
    for snippet in snippets(README.read_text(encoding="utf-8")):
        if snippet.marker == "continue":
            assert groups, f"README line {snippet.line}: nothing to continue"
            groups[-1].append(snippet)
        else:
            groups.append([snippet])
    return groups


CHAINS = chains()


@pytest.mark.parametrize("chain", CHAINS, ids=[f"line-{chain[0].line}" for chain in CHAINS])
def test_readme_snippet_runs(
    chain: list[Snippet], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    skipped = [s.marker for s in chain if s.marker and s.marker.startswith("skip")]
    if skipped:
        pytest.skip(skipped[0])
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": f"readme_line_{chain[0].line}"}
    for snippet in chain:
        code = compile(snippet.code, f"README.md:{snippet.line}", "exec")
        exec(code, namespace)  # the README's own code, run as a reader runs it


def test_the_readme_has_snippets_to_run() -> None:
    assert len(CHAINS) >= 6
    runs_an_app = [c for c in CHAINS if len(c) > 1]
    assert len(runs_an_app) == 2, "the FastAPI and the Flask app are each exercised by a client"


def test_the_readme_opens_with_the_two_commands_then_install_then_the_apps() -> None:
    text = README.read_text(encoding="utf-8")
    opening = "# idem-middleware\n\n```sh\nmake demo\nmake test\n```\n"
    assert text.startswith(opening)
    headings = re.findall(r"^## (.+)$", text, flags=re.MULTILINE)
    assert headings[:3] == ["Install", "A FastAPI app", "A Flask app"]


def test_links_work_on_pypi_too() -> None:
    """PyPI shows the README without the repository: a relative link or a bare anchor breaks."""
    text = README.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r'src="([^"]+)"', text)

    assert targets
    broken = [t for t in targets if not t.startswith("https://")]
    assert broken == []
    for target in targets:
        if target.startswith(REPOSITORY + "/blob/main/") or target.startswith(
            REPOSITORY + "/tree/main/"
        ):
            path = target.split("/main/", 1)[1].split("#")[0]
            assert (ROOT / path).exists(), f"{target}: no {path} in the repository"
