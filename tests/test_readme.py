"""The README runs: every ```python block is executed, and every link works off GitHub too.

Blocks run as :mod:`tooling.readme` groups them, each group in a fresh namespace and a fresh
working directory (the SQLite files they create land there). ``tox -e pkg`` runs them again
from the built wheel, outside the checkout (:mod:`tooling.check_wheel`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tooling.readme import README, Snippet, chains

ROOT = README.parent
REPOSITORY = "https://github.com/idem-middleware/idem-middleware"


CHAINS = chains()


@pytest.mark.parametrize("chain", CHAINS, ids=[f"line-{chain[0].line}" for chain in CHAINS])
def test_readme_snippet_runs(
    chain: list[Snippet], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
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
