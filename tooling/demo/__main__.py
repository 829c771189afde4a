"""``python -m tooling.demo`` (``make demo``): the example apps on real servers, retried.

Exit codes: 0 when every expectation held, 1 otherwise or on an error (one line on stderr),
130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence

from tooling.demo import DemoError, missing_dependencies, stores

PROG = "make demo"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tooling.demo",
        description="Start the example FastAPI app under uvicorn (duplicates of a request in "
        "flight wait for its answer), then the Flask app under gunicorn (they get 409), on free "
        "localhost ports; send a payment, 20 concurrent retries, a reused key and a late retry, "
        "then a streamed CSV export and its retry; show what each step did and whether the card "
        "was charged once.",
        epilog='examples:\n  make demo\n  make demo DEMO_ARGS="--store dynamodb --endpoint-url '
        'http://localhost:8000"\n  make demo DEMO_ARGS="--store redis --redis-url '
        'redis://localhost:6379/0"\n  make demo DEMO_ARGS="--store redis-local"\n  '
        'make demo DEMO_ARGS="--store postgres"',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--store",
        choices=(
            "sqlite",
            "memory",
            "dynamodb",
            "redis",
            "postgres",
            "dynamodb-local",
            "redis-local",
        ),
        default="sqlite",
        help="the idempotency store (default: %(default)s, a temporary file that needs no "
        "service); dynamodb-local and redis-local start DynamoDB Local or a redis-server for the "
        "demo and stop it after; postgres makes a table of its own on the server at "
        f"IDEM_DEMO_POSTGRES_DSN (default {stores.DEFAULT_POSTGRES_DSN}, or a private server "
        "when none answers there) and drops it after",
    )
    parser.add_argument(
        "--table",
        default=stores.DEMO_TABLE,
        metavar="NAME",
        help="DynamoDB table, created if missing - in your AWS account unless --endpoint-url "
        "names DynamoDB Local (--store dynamodb; default: %(default)s)",
    )
    parser.add_argument(
        "--endpoint-url", metavar="URL", help="DynamoDB endpoint, e.g. http://localhost:8000"
    )
    parser.add_argument("--region", help="AWS region (default: from the AWS configuration)")
    parser.add_argument(
        "--redis-url",
        metavar="URL",
        help=f"Redis server (--store redis; default {stores.DEFAULT_REDIS_URL})",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        missing = missing_dependencies()
        if missing:
            raise DemoError(
                f"the demo needs {', '.join(missing)}: run it with make demo, which installs "
                "them (pip install --group demo)"
            )
        from tooling.demo.run import run_demo

        with contextlib.ExitStack() as services:
            if args.store == "memory":
                store = stores.memory()
            elif args.store == "sqlite":
                store = stores.sqlite()
            elif args.store == "redis":
                store = stores.redis(args.redis_url)
            elif args.store == "postgres":
                store = stores.postgres(services)
            elif args.store == "redis-local":
                store = stores.redis_local(services)
            elif args.store == "dynamodb-local":
                store = stores.dynamodb_local(services)
            else:
                store = stores.dynamodb(args.table, args.endpoint_url, args.region)
            return 0 if run_demo(store) else 1
    except DemoError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("demo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
