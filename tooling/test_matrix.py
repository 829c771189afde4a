"""``make test``: the tests on every supported Python this machine has, then lint, types and the
package, with tox; a supported Python that is missing is reported, never silently skipped.

    python -m tooling.test_matrix [--require-all] [--parallel N] [-- TOX_ARGS...]

The supported versions are the ``Programming Language :: Python :: 3.X`` classifiers of
``pyproject.toml`` (tox.ini has a ``py3X`` environment for each). A version counts as present
when ``python3.X`` is on ``PATH`` *and runs*: a pyenv shim exists for every version pyenv knows
of, installed for this checkout or not. The tox environments run in parallel (tox
``run-parallel``), each printing its output when it ends; the last lines are a summary naming
every supported version, with "MISSING" for the absent ones. ``--require-all`` (or
``IDEM_TEST_REQUIRE_ALL_PYTHONS=1``) makes a missing version fail the run. The test sessions
run side by side, each with services of its own (``IDEM_TEST_POSTGRES_PRIVATE=1``: PostgreSQL
too). Standard library only: it runs from the ``.venv`` that holds tox.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: The tox environments that run once, whatever the Python versions.
CHECK_ENVS = ("lint", "type", "pkg")


@dataclass(frozen=True)
class Interpreter:
    version: str  # "3.12"
    path: str | None  # the python3.X that runs it, None when missing
    problem: str = ""  # why it is missing

    @property
    def env(self) -> str:
        return "py" + self.version.replace(".", "")


def supported_versions(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """The ``3.X`` versions of the package's classifiers, in order."""
    found = re.findall(
        r'"Programming Language :: Python :: (3\.\d+)"', pyproject.read_text(encoding="utf-8")
    )
    return sorted(set(found), key=lambda version: int(version.split(".")[1]))


def find_interpreter(version: str, path: str | None = None) -> Interpreter:
    """``python<version>`` on ``path`` (default ``PATH``), if it runs and is that version."""
    name = f"python{version}"
    executable = shutil.which(name, path=path)
    if executable is None:
        return Interpreter(version, None, f"{name} is not on PATH")
    try:
        probe = subprocess.run(
            [executable, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            cwd=ROOT,  # pyenv resolves its shims from the checkout's .python-version
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Interpreter(version, None, f"{executable} does not run: {exc}")
    if probe.returncode != 0 or probe.stdout.strip() != version:
        said = (probe.stderr.strip() or probe.stdout.strip()).splitlines()
        return Interpreter(
            version, None, f"{executable} does not run Python {version}: {' '.join(said[-1:])}"
        )
    return Interpreter(version, executable)


def env_results(result_json: Path) -> dict[str, tuple[bool, float]]:
    """Each tox environment's outcome and duration, from tox's ``--result-json``."""
    try:
        data = json.loads(result_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    outcomes: dict[str, tuple[bool, float]] = {}
    for name, env in data.get("testenvs", {}).items():
        result = env.get("result")
        if isinstance(result, dict):
            outcomes[name] = (bool(result.get("success")), float(result.get("duration", 0.0)))
    return outcomes


def summary(
    interpreters: list[Interpreter],
    outcomes: dict[str, tuple[bool, float]],
    tox_code: int,
    wall: float,
) -> list[str]:
    lines = ["", "=== make test: summary ==="]
    for interpreter in interpreters:
        if interpreter.path is None:
            lines.append(f"  Python {interpreter.version:<5} MISSING: {interpreter.problem}")
            continue
        lines.append(f"  Python {interpreter.version:<5} {_outcome(outcomes, interpreter.env)}")
    for env in CHECK_ENVS:
        lines.append(f"  {env:<12} {_outcome(outcomes, env)}")
    lines.append(f"  tox exit code {tox_code}; wall time {wall:.0f} s")
    return lines


def _outcome(outcomes: dict[str, tuple[bool, float]], env: str) -> str:
    if env not in outcomes:
        return f"NOT RUN (tox -e {env} reported no result)"
    success, duration = outcomes[env]
    return f"{'passed' if success else 'FAILED'} (tox -e {env}, {duration:.0f} s)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tooling.test_matrix", description=__doc__)
    parser.add_argument(
        "--require-all",
        action="store_true",
        default=os.environ.get("IDEM_TEST_REQUIRE_ALL_PYTHONS", "") not in ("", "0"),
        help="fail when a supported Python is missing",
    )
    parser.add_argument(
        "--parallel",
        default="all",
        help="how many tox environments run at once (tox -p; default: all)",
    )
    parser.add_argument("tox_args", nargs="*", help="passed on to tox, after --")
    options = parser.parse_args(argv)

    interpreters = [find_interpreter(version) for version in supported_versions()]
    present = [interpreter for interpreter in interpreters if interpreter.path is not None]
    for interpreter in interpreters:
        if interpreter.path is None:
            print(
                f"*** Python {interpreter.version} is MISSING: {interpreter.problem}; "
                f"its tests (tox -e {interpreter.env}) will not run ***",
                file=sys.stderr,
            )
    if not present:
        print("*** no supported Python is installed: nothing to test ***", file=sys.stderr)
        return 1
    envs = [interpreter.env for interpreter in present] + list(CHECK_ENVS)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="idem-tox-") as tmp:
        result_json = Path(tmp) / "result.json"
        command = [
            sys.executable,
            "-m",
            "tox",
            "run-parallel",
            "--parallel",
            options.parallel,
            "--parallel-no-spinner",
            "--result-json",
            str(result_json),
            "-e",
            ",".join(envs),
            *options.tox_args,
        ]
        print("+ " + " ".join(command[1:]), flush=True)
        env = dict(os.environ)
        # Each test session on a PostgreSQL server of its own: side by side on the shared one,
        # their pools could exhaust its max_connections (IDEM_TEST_POSTGRES_PRIVATE=0: shared).
        env.setdefault("IDEM_TEST_POSTGRES_PRIVATE", "1")
        tox_code = subprocess.run(command, cwd=ROOT, env=env, check=False).returncode
        outcomes = env_results(result_json)
    for line in summary(interpreters, outcomes, tox_code, time.monotonic() - started):
        print(line)
    missing = len(present) < len(interpreters)
    if missing and options.require_all:
        print("*** failing: a supported Python is missing (--require-all) ***")
        return 1
    return tox_code


if __name__ == "__main__":
    sys.exit(main())
