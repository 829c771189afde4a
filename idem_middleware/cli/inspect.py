"""``idem-middleware inspect``: one key's record, as text or JSON."""

from __future__ import annotations

import argparse
import base64
import json
import time
from datetime import datetime, timezone
from typing import Any, TextIO

from idem_middleware.cli.errors import PROG, CLIError, wrap
from idem_middleware.cli.records import add_record_options, open_record
from idem_middleware.exceptions import IdempotencyItemNotFoundError
from idem_middleware.persistence.record import STATUS_INPROGRESS, DataRecord


def register(commands: Any) -> None:
    parser: argparse.ArgumentParser = commands.add_parser(
        "inspect",
        help="show the record of one idempotency key",
        description=wrap(
            "Show the stored record of a client's Idempotency-Key: status, expiry, "
            "lease, and the stored response's status and headers (its body with --show-body). "
            "The stored key is built as the middleware builds it, so pass the app's --scope and "
            "--key-prefix."
        ),
        epilog=f"examples:\n  {PROG} inspect order-1234 --sqlite-path idempotency.sqlite3 "
        f"--scope user:alice\n  {PROG} inspect order-1234 --table idempotency --scope "
        f"user:alice --json\n  {PROG} inspect order-1234 --url "
        "'dynamodb://idempotency?region=eu-west-1'\n"
        f"  {PROG} inspect order-1234 --postgres-dsn postgresql://app@db/app --scope user:alice\n"
        f"  {PROG} inspect 'idempotency#3f…' --stored-key --redis-url redis://localhost:6379/0",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_record_options(parser)
    output = parser.add_argument_group("output")
    output.add_argument("--show-body", action="store_true", help="print the stored body too")
    output.add_argument("--json", action="store_true", help="print the record as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace, out: TextIO) -> int:
    with open_record(args) as (store, key):
        try:
            record = store.layer.get_record(key)
        except IdempotencyItemNotFoundError:
            raise CLIError(
                f"no live record for this key in {store.description} (stored key {key}; "
                "check --scope and --key-prefix, or it has expired)"
            ) from None
    report = _record_report(record, store.description, args.show_body)
    if args.json:
        json.dump(report, out, indent=2, ensure_ascii=False)
        out.write("\n")
    else:
        _print_report(report, out)
    return 0


def _timestamp(epoch_seconds: float, now: float) -> dict[str, Any]:
    moment = datetime.fromtimestamp(epoch_seconds, tz=timezone.utc)
    return {
        "at": moment.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "in_seconds": round(epoch_seconds - now, 3),
    }


def _relative(seconds: float) -> str:
    span = abs(seconds)
    if span < 120:
        text = f"{span:.0f} s"
    elif span < 2 * 3600:
        text = f"{span / 60:.0f} min"
    elif span < 2 * 86400:
        text = f"{span / 3600:.1f} h"
    else:
        text = f"{span / 86400:.1f} days"
    return f"in {text}" if seconds >= 0 else f"{text} ago"


def _record_report(record: DataRecord, store: str, show_body: bool) -> dict[str, Any]:
    now = time.time()
    report: dict[str, Any] = {
        "store": store,
        "stored_key": record.idempotency_key,
        "status": record.current_status(now),
        "expires": None,
        "lease": None,
        "fingerprint": record.payload_hash,
        "response": None,
    }
    if record.expiry_timestamp is not None:
        report["expires"] = _timestamp(record.expiry_timestamp, now)
    if record.in_progress_expiry_timestamp is not None:
        lease = _timestamp(record.in_progress_expiry_timestamp / 1000, now)
        lease["expired"] = record.lease_expired(now)
        report["lease"] = lease
    if record.response_data is not None:
        try:
            response = record.response
        except ValueError:
            report["response"] = {"unreadable": True}
        else:
            assert response is not None
            details: dict[str, Any] = {
                "status": response.status,
                "headers": [list(header) for header in response.headers],
                "body_bytes": len(response.body),
                "body_omitted": response.body_omitted,
            }
            if show_body:
                try:
                    details["body"] = response.body.decode("utf-8")
                except UnicodeDecodeError:
                    details["body_base64"] = base64.b64encode(response.body).decode("ascii")
            report["response"] = details
    return report


def _print_report(report: dict[str, Any], out: TextIO) -> None:
    def line(label: str, value: str) -> None:
        print(f"{label:<12} {value}", file=out)

    line("store", report["store"])
    line("stored key", report["stored_key"])
    status = report["status"]
    lease = report["lease"]
    if status == STATUS_INPROGRESS and lease is not None:
        status += (
            " (lease expired: the next request with this key runs the handler again)"
            if lease["expired"]
            else " (a request is running it, or crashed: retries get 409 until the lease ends)"
        )
    line("status", status)
    if report["expires"] is not None:
        expires = report["expires"]
        line("expires", f"{expires['at']} ({_relative(expires['in_seconds'])})")
    if lease is not None and report["status"] == STATUS_INPROGRESS:
        state = "ended" if lease["expired"] else "held until"
        line("lease", f"{state} {lease['at']} ({_relative(lease['in_seconds'])})")
    if report["fingerprint"]:
        line("fingerprint", report["fingerprint"])
    response = report["response"]
    if response is None:
        line("response", "none yet")
        return
    if response.get("unreadable"):
        line("response", "stored, but not readable as a response")
        return
    line("response", f"status {response['status']}")
    for index, (name, value) in enumerate(response["headers"]):
        line("headers" if index == 0 else "", f"{name}: {value}")
    if response["body_omitted"]:
        line("body", "not stored (over the size limit): replays send an empty body")
    elif "body" in response:
        line("body", f"{response['body_bytes']} bytes:")
        print(response["body"], file=out)
    elif "body_base64" in response:
        line("body", f"{response['body_bytes']} bytes, not UTF-8; base64:")
        print(response["body_base64"], file=out)
    else:
        line("body", f"{response['body_bytes']} bytes (--show-body prints it)")
