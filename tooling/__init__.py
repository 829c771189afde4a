"""The checkout's tooling, never shipped: what the tests, the benchmarks and the demo start.

=============================== ===========================================================
:mod:`tooling.processes`        free ports, waiting for a service, stopping its processes
:mod:`tooling.servers`          an app on uvicorn or gunicorn
:mod:`tooling.dynamodb_local`   Amazon's DynamoDB Local (npm + Java), else moto's server
:mod:`tooling.redis_server`     a private ``redis-server``
:mod:`tooling.demo`             ``make demo``: ``python -m tooling.demo``
=============================== ===========================================================

A new service (PostgreSQL, say) is one module: pick a port with
:func:`~tooling.processes.free_port`, ``spawn`` it, ``wait_until`` it answers, and give it a
``stop`` that calls :func:`~tooling.processes.stop`.
"""

from __future__ import annotations

from pathlib import Path

#: The checkout: where ``example_apps``, ``benchmarks`` and ``.cache`` are.
ROOT = Path(__file__).resolve().parents[1]
