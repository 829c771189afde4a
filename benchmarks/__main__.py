"""Every benchmark in one run: ``python -m benchmarks`` (or ``make bench``).

Prints the tables and the targets, writes ``docs/benchmarks.png`` and the results block of
``BENCHMARKS.md``. DynamoDB Local is started once (as the test session does) unless
``--endpoint-url`` names one. ``--quick`` runs every section briefly, to check the setup;
``--only`` runs some sections (``inprocess``, ``dynamodb``, ``http``, ``streaming``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from benchmarks import dynamodb, http_load, inprocess, report, streaming
from benchmarks.store_roundtrips import dynamodb as dynamodb_server

SECTIONS = ("inprocess", "dynamodb", "http", "streaming")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="short runs: check the setup")
    parser.add_argument("--only", action="append", choices=SECTIONS, help="repeatable")
    parser.add_argument("--endpoint-url", help="a running DynamoDB (Local); default: start one")
    parser.add_argument(
        "--no-write", action="store_true", help="print only: leave BENCHMARKS.md and the chart"
    )
    args = parser.parse_args(argv)
    # The benchmark apps have no users to scope keys to: the startup warning about it is noise.
    logging.getLogger("idem_middleware").setLevel(logging.ERROR)
    sections = args.only or SECTIONS
    # DynamoDB Local accepts any credentials; never pick up real ones.
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "benchmark")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "benchmark")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

    results = report.Results()
    if "inprocess" in sections:
        print("1/3 in-process ASGI ...", file=sys.stderr, flush=True)
        results.inprocess = (
            inprocess.run(rounds=8, per_round=250) if args.quick else inprocess.run()
        )
    if "dynamodb" in sections or "http" in sections:
        with dynamodb_server(args.endpoint_url) as (url, implementation):
            if "dynamodb" in sections:
                print("2/3 DynamoDB Local ...", file=sys.stderr, flush=True)
                rounds, per_round = (2, 10) if args.quick else (10, 20)
                results.dynamodb = dynamodb.run_against(url, implementation, rounds, per_round)
            if "http" in sections:
                print("3/3 HTTP under load ...", file=sys.stderr, flush=True)
                results.http = http_load.run(seconds=2 if args.quick else 5, dynamodb_url=url)

    if "streaming" in sections:
        print("streaming: time to first byte ...", file=sys.stderr, flush=True)
        streamed = streaming.run(*((30, 20) if args.quick else ()))
        streaming.print_table(streamed)
        if not args.no_write:
            streaming.update_markdown(streamed)
        if set(sections) == {"streaming"}:
            return 0  # the other sections' results block stays as it is

    checks = report.targets(results)
    report.print_rich(results, checks)
    if not args.no_write:
        chart = report.write_chart(results)
        report.update_markdown(results, checks, chart)
        print(f"wrote {report.MARKDOWN.name} and {chart}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
