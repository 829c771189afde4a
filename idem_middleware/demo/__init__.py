"""The demo behind ``make demo`` / ``idem-middleware demo``: the example payments apps on real
servers, retried the way clients retry, with what idempotency changes shown step by step.

:mod:`idem_middleware.demo.servers` (standard library only) starts the servers; the end-to-end
tests use it too. :mod:`idem_middleware.demo.run` needs the ``demo`` extra.
"""

from __future__ import annotations

import importlib.util

#: What ``pip install 'idem-middleware[demo]'`` brings.
DEMO_DEPENDENCIES = ("rich", "httpx", "fastapi", "uvicorn", "flask", "gunicorn")


def missing_dependencies() -> list[str]:
    """The demo's dependencies that are not installed."""
    return [name for name in DEMO_DEPENDENCIES if importlib.util.find_spec(name) is None]
