"""The demo behind ``make demo`` (``python -m tooling.demo``): the example payments apps on real
servers, retried the way clients retry, with what idempotency changes shown step by step.

:mod:`tooling.demo.stores` checks the chosen store before any server starts,
:mod:`tooling.demo.scenario` is what the demo sends and expects, :mod:`tooling.demo.run` starts
the servers (:mod:`tooling.servers`) and prints the tables. It needs the ``demo`` dependency
group of ``pyproject.toml``, which ``make demo`` installs.
"""

from __future__ import annotations

import importlib.util

#: What ``pip install --group demo`` brings (``make demo`` does it).
DEMO_DEPENDENCIES = ("rich", "httpx", "fastapi", "uvicorn", "flask", "gunicorn")


class DemoError(Exception):
    """The demo cannot run (a missing dependency, an unusable store, a server that fails)."""


def missing_dependencies() -> list[str]:
    """The demo's dependencies that are not installed."""
    return [name for name in DEMO_DEPENDENCIES if importlib.util.find_spec(name) is None]
