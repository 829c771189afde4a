"""Install a built wheel into a fresh virtualenv, away from the checkout, and run the README's
Python blocks there: they must run as written from a pip install.

    python -m tooling.check_wheel DIST_DIR

``tox -e pkg`` (part of ``make test``) runs it on the wheel it has just built. The virtualenv
gets the wheel with its ``dynamodb`` and ``otel`` extras and the frameworks the README's apps use.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import venv
from pathlib import Path

from tooling.readme import chains, script

#: What a reader of the README installs next to the package.
FRAMEWORKS = ("fastapi", "flask", "httpx")


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    wheels = sorted(Path(argv[0]).glob("*.whl"))
    if len(wheels) != 1:
        print(f"expected one wheel in {argv[0]}, found {wheels}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="idem-wheel-") as tmp:
        work = Path(tmp)
        venv.create(work / "venv", with_pip=True)
        python = str(work / "venv" / "bin" / "python")
        subprocess.run(
            [python, "-m", "pip", "install", "--quiet", f"{wheels[0]}[dynamodb,otel]", *FRAMEWORKS],
            check=True,
        )
        failed = 0
        for chain in chains():
            run_dir = work / f"line-{chain[0].line}"
            run_dir.mkdir()
            (run_dir / "snippet.py").write_text(script(chain))
            # -I: the checkout is not on the path; only the installed wheel is.
            result = subprocess.run(
                [python, "-I", "snippet.py"], cwd=run_dir, capture_output=True, text=True
            )
            status = "ok" if result.returncode == 0 else "FAILED"
            print(f"README.md:{chain[0].line}: {status}")
            if result.returncode != 0:
                failed += 1
                print(result.stdout + result.stderr, file=sys.stderr)
        script_path = work / "venv" / "bin" / "idem-middleware"
        version = subprocess.run(
            [str(script_path), "--version"], capture_output=True, text=True, check=True
        )
        print(version.stdout.strip())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
