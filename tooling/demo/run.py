"""The example payments apps on real servers, shown to a newcomer.

For each server (FastAPI on uvicorn, then Flask on gunicorn) the demo starts the example app on
a free loopback port with the chosen store, runs :func:`tooling.demo.scenario.exercise`
and prints a table of what was expected and what happened; then a one-line verdict. Servers are
stopped whatever happens (an error, Ctrl-C, SIGTERM), and the temporary directory holding the
SQLite files and logs is removed.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from rich.console import Console
from rich.table import Table
from rich.text import Text

from tooling import ROOT
from tooling.demo import DemoError
from tooling.demo.scenario import Check, exercise
from tooling.demo.stores import DemoStore
from tooling.servers import Server, ServerStartError, start_gunicorn, start_uvicorn

#: The card processor's simulated latency: long enough for the retries to overlap the first
#: request, short enough for a quick demo.
CHARGE_DELAY_SECONDS = 0.5
CONCURRENT_RETRIES = 20
#: Between two lines of the streamed export: slow enough to see the lines arrive one by one.
EXPORT_LINE_DELAY_SECONDS = 0.15
#: How long a duplicate may wait for the first request's answer, on the server that allows it.
CONFLICT_WAIT_SECONDS = 5.0


@dataclass(frozen=True)
class Deployment:
    """An example app on a server."""

    title: str
    server: str  # "uvicorn" or "gunicorn"
    app: str
    workers: int = 1
    threads: int = 1
    #: ``IDEM_CONFLICT_WAIT_SECONDS``: 0, a duplicate of a request in flight gets 409 at once.
    conflict_wait_seconds: float = 0

    def start(self, root: Path, env: Mapping[str, str], log_dir: Path) -> Server:
        if self.server == "uvicorn":
            return start_uvicorn(
                self.app, root=root, env=env, log_dir=log_dir, workers=self.workers
            )
        return start_gunicorn(
            self.app,
            root=root,
            env=env,
            log_dir=log_dir,
            workers=self.workers,
            threads=self.threads,
        )


def deployments(store: DemoStore) -> list[Deployment]:
    workers, threads = (2, 4) if store.shared_by_processes else (1, 8)
    return [
        # Waiting duplicates hold no thread under ASGI: the 20 retries wait on the event loop.
        Deployment(
            f"FastAPI on uvicorn (duplicates wait up to {CONFLICT_WAIT_SECONDS:g} s)",
            "uvicorn",
            "example_apps.fastapi_app:app",
            conflict_wait_seconds=CONFLICT_WAIT_SECONDS,
        ),
        Deployment(
            f"Flask on gunicorn ({workers} worker process{'es' if workers > 1 else ''}, "
            f"{threads} threads each)",
            "gunicorn",
            "example_apps.flask_app:app",
            workers=workers,
            threads=threads,
        ),
    ]


def run_demo(store: DemoStore, console: Console | None = None) -> bool:
    """Run the demo on every deployment; ``True`` when every expectation held."""
    root = ROOT
    # Outside a terminal (a log, CI) rich would assume 80 columns; the tables read better wider.
    console = console or Console(highlight=False, width=None if sys.stdout.isatty() else 100)
    _introduce(console, store)
    results: list[tuple[Deployment, list[Check]]] = []
    with _stopped_on_sigterm(), tempfile.TemporaryDirectory(prefix="idem-demo-") as tmp:
        work = Path(tmp)
        for index, deployment in enumerate(deployments(store), start=1):
            checks = _run_one(console, root, work, index, deployment, store)
            results.append((deployment, checks))
    return _verdict(console, results)


def _introduce(console: Console, store: DemoStore) -> None:
    console.print()
    console.print(Text("idem-middleware demo", style="bold"))
    console.print(
        "A payments API whose POST /payments charges a card (it takes "
        f"{CHARGE_DELAY_SECONDS:g} s) and whose POST /exports streams a CSV export line by "
        "line. Clients retry such requests: on a timeout, a lost connection, a double click. "
        "With the same Idempotency-Key, the middleware must let the card be charged once, "
        "stream the export as it is produced, and answer every retry as the first request was "
        "answered: a retry that comes while the first still runs gets 409 (try later), or, on a "
        "server that lets duplicates wait, the first request's answer as soon as it is ready."
    )
    console.print(f"Idempotency store: {store.description}")
    console.print()


def _run_one(
    console: Console,
    root: Path,
    work: Path,
    index: int,
    deployment: Deployment,
    store: DemoStore,
) -> list[Check]:
    env = {
        "IDEM_STORE_URL": store.url(work, index),
        "EXAMPLE_LEDGER_PATH": str(work / f"ledger-{index}.sqlite3"),
        "EXAMPLE_CHARGE_DELAY_SECONDS": str(CHARGE_DELAY_SECONDS),
        "EXAMPLE_EXPORT_LINE_DELAY_SECONDS": str(EXPORT_LINE_DELAY_SECONDS),
    }
    if deployment.conflict_wait_seconds > 0:
        env["IDEM_CONFLICT_WAIT_SECONDS"] = str(deployment.conflict_wait_seconds)
    with console.status(f"Starting {deployment.title} …"):
        try:
            server = deployment.start(root, env, work)
        except ServerStartError as exc:
            _print_log_tail(console, exc.log)
            raise DemoError(f"{deployment.title} did not start: {exc.summary}") from None
    try:
        with console.status(f"{deployment.title} at {server.base_url}: sending requests …"):
            checks = asyncio.run(
                exercise(
                    server.base_url,
                    concurrent_retries=CONCURRENT_RETRIES,
                    retries_after_seconds=CHARGE_DELAY_SECONDS * 0.4,
                    conflict_wait_seconds=deployment.conflict_wait_seconds,
                )
            )
        title = f"{index}. {deployment.title} - {server.base_url}"
        console.print(_table(title, checks, console.width))
        if not all(check.ok for check in checks):
            _print_log_tail(console, server.log())
        console.print()
        return checks
    finally:
        server.stop()


def _table(title: str, checks: list[Check], width: int) -> Table:
    table = Table(
        title=title, title_justify="left", title_style="bold", expand=True, width=min(width, 110)
    )
    table.add_column("", justify="right", style="dim")
    table.add_column("Step", ratio=1, overflow="fold")
    table.add_column("Expected", ratio=1, overflow="fold")
    table.add_column("Observed", ratio=1, overflow="fold")
    table.add_column("", justify="center")
    for number, check in enumerate(checks, start=1):
        table.add_row(
            str(number),
            check.step,
            check.expected,
            check.observed,
            Text("✓", style="bold green") if check.ok else Text("✗", style="bold red"),
        )
    return table


def _print_log_tail(console: Console, log: str, lines: int = 30) -> None:
    tail = "\n".join(log.splitlines()[-lines:])
    if tail:
        console.print(Text("Server log (last lines):", style="bold"))
        console.print(Text(tail, style="dim"))


def _verdict(console: Console, results: list[tuple[Deployment, list[Check]]]) -> bool:
    checks = [check for _, table in results for check in table]
    failed = [check for check in checks if not check.ok]
    if not failed:
        console.print(
            Text(
                f"✓ All {len(checks)} expectations held: one charge per payment, one export "
                "per key, and every retry got the first answer.",
                style="bold green",
            )
        )
        return True
    console.print(
        Text(
            f"✗ {len(failed)} of {len(checks)} expectations failed (marked ✗ above).",
            style="bold red",
        )
    )
    return False


@contextmanager
def _stopped_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into SystemExit while the demo runs, so its ``finally`` blocks
    stop the servers (which run in their own process groups, out of reach of the terminal).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def exit_on_signal(signum: int, frame: FrameType | None) -> None:
        sys.exit(128 + signum)

    caught = [sig for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)) if sig is not None]
    previous = {sig: signal.signal(sig, exit_on_signal) for sig in caught}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
