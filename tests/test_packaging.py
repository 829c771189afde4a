"""What ``pyproject.toml`` declares matches what the code does.

Every runtime dependency is imported by the library, each extra by its backend only; the version
has one source; the sdist holds no test that would need the checkout. (``tox -e pkg`` builds
both distributions and runs ``twine check`` on them.)
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import pytest

import idem_middleware

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "idem_middleware"
#: Distribution name -> the module it installs, where the two differ.
IMPORT_NAMES = {"http-sf": "http_sf"}


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())  # type: ignore[no-any-return]


def distribution(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9_.-]+", requirement)
    assert match, requirement
    return match.group(0).lower()


def imports_by_module(*, at_import_time: bool = False) -> dict[Path, set[str]]:
    """The top-level modules each file of the package imports: anywhere in it, or only where
    importing the file runs the import (its module body, not a function nor TYPE_CHECKING).
    """
    found: dict[Path, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        names: set[str] = set()
        tree = ast.parse(path.read_text(), str(path))
        nodes = tree.body if at_import_time else ast.walk(tree)
        for node in nodes:
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[path.relative_to(ROOT)] = names
    return found


def test_every_runtime_dependency_is_imported_by_the_library() -> None:
    imported = set().union(*imports_by_module().values())
    declared = [distribution(r) for r in pyproject()["project"]["dependencies"]]

    unused = [name for name in declared if IMPORT_NAMES.get(name, name) not in imported]

    assert declared, "no runtime dependencies found"
    assert unused == [], f"declared but never imported: {unused}"
    assert "werkzeug" not in declared


@pytest.mark.parametrize(
    ("extra", "module", "backend"),
    [
        ("dynamodb", "boto3", "idem_middleware/persistence/dynamodb.py"),
        ("redis", "redis", "idem_middleware/persistence/redis.py"),
    ],
)
def test_each_backend_extra_is_imported_by_its_backend_only(
    extra: str, module: str, backend: str
) -> None:
    assert [distribution(r) for r in pyproject()["project"]["optional-dependencies"][extra]] == [
        module
    ]
    importers = {
        str(path)
        for path, names in imports_by_module(at_import_time=True).items()
        if module in names
    }
    assert importers == {backend}


def test_the_version_has_one_source() -> None:
    project = pyproject()

    assert "version" not in project["project"]
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["hatch"]["version"]["path"] == "idem_middleware/__init__.py"
    assert re.fullmatch(r"\d+\.\d+\.\d+([ab]|rc)?\d*", idem_middleware.__version__)


def test_license_and_urls() -> None:
    project = pyproject()["project"]

    assert project["license"] == "MIT"
    assert project["license-files"] == ["LICENSE"]
    assert "MIT License" in (ROOT / "LICENSE").read_text()
    assert all(url.startswith("https://github.com/") for url in project["urls"].values())


def test_the_sdist_ships_no_tests_and_the_wheel_no_tooling() -> None:
    build = pyproject()["tool"]["hatch"]["build"]["targets"]

    assert build["wheel"]["packages"] == ["idem_middleware"]
    assert not any(
        part in entry
        for entry in build["sdist"]["include"]
        for part in ("tests", "example_apps", "tooling")
    )
    assert not (PACKAGE / "demo").exists(), "the demo lives in tooling/, not in the package"
