"""``make test`` (tooling/test_matrix.py): every supported Python the machine has is tested, and
a missing one is reported, never silently skipped."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from tooling import ROOT, test_matrix
from tooling.test_matrix import Interpreter, find_interpreter, supported_versions


def test_the_supported_versions_are_the_classifiers_and_toxs_environments() -> None:
    versions = supported_versions()
    assert versions == ["3.10", "3.11", "3.12", "3.13"]
    tox_ini = (ROOT / "tox.ini").read_text(encoding="utf-8")
    [factors] = re.findall(r"^\[testenv:py\{([\d,]+)\}\]", tox_ini, flags=re.MULTILINE)
    assert factors.split(",") == [version.replace(".", "") for version in versions]


def fake_python(directory: Path, name: str, script: str) -> None:
    path = directory / name
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(0o755)


def test_an_interpreter_is_found_only_when_it_runs_that_version(tmp_path: Path) -> None:
    current = f"{sys.version_info[0]}.{sys.version_info[1]}"
    (tmp_path / f"python{current}").symlink_to(sys.executable)
    # A pyenv shim for a version this checkout does not have installed: on PATH, yet it fails.
    fake_python(tmp_path, "python3.98", 'echo "pyenv: python3.98: command not found" >&2; exit 127')
    fake_python(tmp_path, "python3.97", 'echo "3.11"')  # says it is another version

    assert find_interpreter(current, path=str(tmp_path)) == Interpreter(
        current, str(tmp_path / f"python{current}")
    )
    shim = find_interpreter("3.98", path=str(tmp_path))
    assert shim.path is None
    assert "command not found" in shim.problem
    assert find_interpreter("3.97", path=str(tmp_path)).path is None
    absent = find_interpreter("3.99", path=str(tmp_path))
    assert (absent.path, absent.problem) == (None, "python3.99 is not on PATH")


class FakeTox:
    """``subprocess.run`` for tox: records the command, writes the result JSON tox would."""

    def __init__(self, code: int) -> None:
        self.code = code
        self.commands: list[list[str]] = []
        self.envs: list[dict[str, str]] = []

    def __call__(self, command: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        self.commands.append(list(command))
        self.envs.append(kwargs["env"])
        envs = command[command.index("-e") + 1].split(",")
        result_json = Path(command[command.index("--result-json") + 1])
        result_json.write_text(
            json.dumps(
                {
                    "testenvs": {
                        env: {"result": {"success": self.code == 0, "duration": 1.0}}
                        for env in envs
                    }
                }
            )
        )
        return subprocess.CompletedProcess(list(command), self.code)


def with_312_missing(version: str) -> Interpreter:
    if version == "3.12":
        return Interpreter(version, None, "python3.12 is not on PATH")
    return Interpreter(version, f"/usr/bin/python{version}")


def test_a_missing_python_is_reported_before_and_in_the_summary(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("IDEM_TEST_REQUIRE_ALL_PYTHONS", raising=False)
    monkeypatch.delenv("IDEM_TEST_POSTGRES_PRIVATE", raising=False)
    monkeypatch.setattr(test_matrix, "find_interpreter", with_312_missing)
    tox = FakeTox(0)
    monkeypatch.setattr(test_matrix.subprocess, "run", tox)

    assert test_matrix.main([]) == 0

    [command] = tox.commands
    assert command[command.index("-e") + 1] == "py310,py311,py313,lint,type,pkg"
    # Side by side, each session gets a PostgreSQL server of its own.
    assert tox.envs[0]["IDEM_TEST_POSTGRES_PRIVATE"] == "1"
    out, err = capsys.readouterr()
    assert "Python 3.12 is MISSING: python3.12 is not on PATH" in err
    summary = out[out.index("=== make test: summary ===") :]
    assert "Python 3.12  MISSING: python3.12 is not on PATH" in summary
    for version in ("3.10", "3.11", "3.13"):
        assert f"Python {version}  passed (tox -e py{version.replace('.', '')}" in summary
    for env in ("lint", "type", "pkg"):
        assert re.search(rf"{env} +passed", summary)


def test_require_all_fails_on_a_missing_python(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(test_matrix, "find_interpreter", with_312_missing)
    monkeypatch.setattr(test_matrix.subprocess, "run", FakeTox(0))
    assert test_matrix.main(["--require-all"]) == 1
    monkeypatch.setenv("IDEM_TEST_REQUIRE_ALL_PYTHONS", "1")
    assert test_matrix.main([]) == 1
    assert "a supported Python is missing" in capsys.readouterr().out


def test_a_failing_environment_fails_the_run_and_shows_in_the_summary(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(test_matrix, "find_interpreter", lambda v: Interpreter(v, f"/x/{v}"))
    monkeypatch.setattr(test_matrix.subprocess, "run", FakeTox(1))
    assert test_matrix.main([]) == 1
    assert "Python 3.13  FAILED (tox -e py313" in capsys.readouterr().out


def test_the_matrix_needs_the_standard_library_only() -> None:
    # `make test` runs it from .venv, which holds tox and nothing of the package's: -S leaves
    # every site-packages out.
    result = subprocess.run(
        [
            sys.executable,
            "-I",
            "-S",
            "-c",
            "import sys; sys.path[:0] = ['.']; import tooling.test_matrix",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
