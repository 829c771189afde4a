"""The benchmark's outputs: rich tables, pass/fail per target, a PNG chart, BENCHMARKS.md."""

from __future__ import annotations

import os
import platform
import re
import statistics
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from benchmarks.dynamodb import CASES, EXPECTED_CALLS, PAIRS, DynamoDBResult
from benchmarks.http_load import HTTPResult
from benchmarks.inprocess import InProcessResult

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "docs" / "benchmarks.png"
MARKDOWN = ROOT / "BENCHMARKS.md"
RESULTS_START = "<!-- results:start (written by python -m benchmarks) -->"
RESULTS_END = "<!-- results:end -->"
PEER = "asgi-idempotency-header"
BARE = "bare Starlette"


@dataclass
class Results:
    inprocess: InProcessResult | None = None
    dynamodb: DynamoDBResult | None = None
    http: HTTPResult | None = None


@dataclass
class TargetCheck:
    name: str
    measured: str
    limit: str
    passed: bool


# Tables: (title, header, rows, note) -----------------------------------------------------

Table = tuple[str, list[str], list[list[str]], str]


def inprocess_table(result: InProcessResult) -> Table:
    rows = []
    for row in result.rows:
        quarter = max(1, len(row.us_per_round) // 4)
        early = statistics.median(row.us_per_round[:quarter])
        late = statistics.median(row.us_per_round[-quarter:])
        rows.append(
            [
                row.name,
                f"{row.us:.1f}",
                f"{row.ratio:.2f}x {row.baseline.removeprefix('bare ')}",
                f"{early:.1f} -> {late:.1f}",
            ]
        )
    stored = result.rounds * result.per_round
    note = (
        f"{result.rounds} interleaved rounds of {result.per_round} requests per variant; "
        f"a new key for every request (each store ends with {stored:,} keys). µs = median over "
        "the rounds of the CPU time per request; ratio = median of the per-round ratios to the "
        "bare app of the same framework; the last column compares the first and last quarter "
        "of the rounds, as the stores fill."
    )
    return (
        "1. In-process ASGI, memory stores: cost per request",
        ["variant", "µs/request", "ratio to bare", "µs, first -> last quarter"],
        rows,
        note,
    )


def dynamodb_table(result: DynamoDBResult) -> Table:
    rows = []
    for ours_name, theirs_name in PAIRS:
        for case in CASES:
            ours = result.case(ours_name, case)
            theirs = result.case(theirs_name, case)
            rows.append(
                [
                    f"{ours_name} / {theirs_name}",
                    case,
                    f"{ours.median_ms:.2f}",
                    _calls(ours.calls_per_request),
                    f"{theirs.median_ms:.2f}",
                    _calls(theirs.calls_per_request),
                    f"{ours.median_ms / theirs.median_ms:.2f}",
                ]
            )
    rows.append(["raw PutItem (floor)", "", f"{result.put_item_ms:.2f}", "1", "", "", ""])
    note = (
        f"{result.implementation}; {result.requests_per_case} requests per case and library, "
        "interleaved; medians. From an event loop: our ASGI middleware (store calls on the loop "
        "through aiobotocore, the dynamodb-async extra; in worker threads without it) and "
        "Powertools' idempotent_function run in a worker thread, as an async app "
        "must run it; in the calling thread: our WSGI middleware and the function called "
        "directly. Powertools is set to do what ours does: validate the payload and lease "
        "in-progress records (from a Lambda context). One thread hop "
        f"(anyio.to_thread.run_sync of a no-op) took "
        f"{result.thread_hop_ms:.2f} ms (median) on this machine in this run: through worker "
        "threads a new key makes two (claim, complete), Powertools from a loop one."
    )
    return (
        "2. DynamoDB Local: latency and store calls per request",
        ["ours / Powertools", "case", "ours ms", "calls", "Powertools ms", "calls", "ratio"],
        rows,
        note,
    )


def http_table(result: HTTPResult) -> Table:
    rows = []
    for row in result.rows:
        bare = result.row(row.server, "bare", "new keys").result.rps
        r = row.result
        rows.append(
            [
                row.server,
                row.variant,
                row.traffic,
                f"{r.rps:,.0f}",
                f"{r.rps / bare:.0%}",
                f"{r.p50_ms:.1f}",
                f"{r.p99_ms:.1f}",
                str(r.errors),
            ]
        )
    note = (
        f"{result.generator}, 32 keep-alive connections over loopback, {result.seconds:g} s per "
        "run after a 1 s warm-up; one server worker (uvicorn; gunicorn gthread with 8 threads); "
        "DynamoDB Local, the load generator and the server share the machine."
    )
    return (
        "3. HTTP under load",
        ["server", "variant", "traffic", "req/s", "of bare", "p50 ms", "p99 ms", "errors"],
        rows,
        note,
    )


def loop_health_table(result: HTTPResult) -> Table | None:
    health = result.loop_health
    if health is None:
        return None
    rows = [
        ["idle server", f"{health.idle_p50_ms:.2f}", f"{health.idle_p99_ms:.2f}", "", ""],
        [
            "32 DynamoDB-bound POSTs in flight",
            f"{health.loaded_p50_ms:.2f}",
            f"{health.loaded_p99_ms:.2f}",
            f"{health.covered_rps:,.0f}",
            str(health.covered_errors),
        ],
    ]
    note = (
        "uvicorn + Starlette with the DynamoDB store; GET /health one at a time, 5 ms apart, "
        f"{health.samples} samples under load."
    )
    return (
        "4. Event-loop health: GET /health (not covered)",
        ["while", "p50 ms", "p99 ms", "covered req/s", "covered errors"],
        rows,
        note,
    )


def _calls(bounds: tuple[int, int]) -> str:
    low, high = bounds
    return str(low) if low == high else f"{low}..{high}"


# Targets ----------------------------------------------------------------------------------


def targets(results: Results) -> list[TargetCheck]:
    checks = []
    if results.inprocess:
        new = results.inprocess.row("ours, new key").ratio
        replay = results.inprocess.row("ours, replay").ratio
        checks.append(TargetCheck("memory, new key / bare", f"{new:.2f}x", "<= 1.5x", new <= 1.5))
        checks.append(
            TargetCheck("memory, replay / bare", f"{replay:.2f}x", "<= 0.8x", replay <= 0.8)
        )
    if results.dynamodb:
        for ours_name, _ in PAIRS:
            for case in CASES:
                calls = results.dynamodb.case(ours_name, case).calls_per_request
                expected = EXPECTED_CALLS[case]
                checks.append(
                    TargetCheck(
                        f"DynamoDB store calls, {ours_name}, {case}",
                        _calls(calls),
                        f"= {expected}",
                        calls == (expected, expected),
                    )
                )
        for ours_name, theirs_name in PAIRS:
            for case in CASES:
                ours = results.dynamodb.case(ours_name, case).median_ms
                theirs = results.dynamodb.case(theirs_name, case).median_ms
                ratio = ours / theirs
                checks.append(
                    TargetCheck(
                        f"DynamoDB latency {ours_name} / {theirs_name}, {case}",
                        f"{ratio:.2f}",
                        "<= 1.0",
                        ratio <= 1,
                    )
                )
    if results.http:
        checks.extend(http_targets(results.http))
    return checks


STARLETTE = "uvicorn + Starlette"

#: Share of the bare app's req/s each store must keep on uvicorn + Starlette: (variant, traffic,
#: least share). The embedded default must be fast with durable commits (FULL) and faster with
#: NORMAL; a replay needs no write.
HTTP_SHARES = (
    ("ours, memory", "new keys", 0.8),
    ("ours, memory", "replays", 0.8),
    ("ours, sqlite", "new keys", 0.25),
    ("ours, sqlite", "replays", 0.8),
    ("ours, sqlite-normal", "new keys", 0.5),
    ("ours, sqlite-normal", "replays", 0.8),
    ("ours, redis", "new keys", 0.4),
    ("ours, redis", "replays", 0.6),
    ("ours, postgres", "new keys", 0.3),
    ("ours, postgres", "replays", 0.6),
)
#: Variants whose p99 may be at most this many times the bare app's.
HTTP_P99_RATIOS = (("ours, sqlite", 3.0), ("ours, sqlite-normal", 3.0))
#: (ours, peer, traffic, least ratio of req/s): ours against the peer on the same Redis server;
#: a least ratio of 1 means ahead of it.
HTTP_PEER_RATIOS = (
    ("ours, redis", f"{PEER}, redis", "new keys", 2.0),
    ("ours, redis", f"{PEER}, redis", "replays", 1.0),
)


def http_targets(result: HTTPResult) -> list[TargetCheck]:
    """The HTTP targets whose rows this run measured (``--only`` and store choices skip some)."""
    measured = {(r.server, r.variant, r.traffic): r.result for r in result.rows}
    checks = []
    for server in dict.fromkeys(r.server for r in result.rows):
        bare = measured.get((server, "bare", "new keys"))
        if bare is None:
            continue
        for variant, traffic, least in HTTP_SHARES:
            if variant == "ours, memory" or server == STARLETTE:
                row = measured.get((server, variant, traffic))
                if row is not None:
                    share = row.rps / bare.rps
                    checks.append(
                        TargetCheck(
                            f"HTTP {variant.removeprefix('ours, ')} req/s / bare, {server}, "
                            f"{traffic}",
                            f"{share:.0%}",
                            f">= {least:.0%}",
                            share >= least,
                        )
                    )
    bare = measured.get((STARLETTE, "bare", "new keys"))
    for variant, most in HTTP_P99_RATIOS:
        for traffic in ("new keys", "replays"):
            row = measured.get((STARLETTE, variant, traffic))
            if bare is not None and row is not None:
                ratio = row.p99_ms / bare.p99_ms
                checks.append(
                    TargetCheck(
                        f"HTTP {variant.removeprefix('ours, ')} p99 / bare, {STARLETTE}, {traffic}",
                        f"{ratio:.1f}x",
                        f"<= {most:g}x",
                        ratio <= most,
                    )
                )
    for ours, peer, traffic, least in HTTP_PEER_RATIOS:
        ours_row = measured.get((STARLETTE, ours, traffic))
        peer_row = measured.get((STARLETTE, peer, traffic))
        if ours_row is not None and peer_row is not None:
            ratio = ours_row.rps / peer_row.rps
            ahead = least == 1.0
            checks.append(
                TargetCheck(
                    f"HTTP {ours} req/s / {peer}, {traffic}",
                    f"{ratio:.2f}x",
                    f"> {least:g}x" if ahead else f">= {least:g}x",
                    ratio > least if ahead else ratio >= least,
                )
            )
    if result.loop_health:
        ratio = result.loop_health.ratio
        checks.append(
            TargetCheck("GET /health p99 under load / idle", f"{ratio:.1f}x", "<= 3x", ratio <= 3)
        )
    return checks


# Machine ----------------------------------------------------------------------------------

VERSIONED = (
    "starlette",
    "fastapi",
    "uvicorn",
    "gunicorn",
    "flask",
    "boto3",
    "asgi-idempotency-header",
    "aws-lambda-powertools",
)


def machine() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = []
    for name in VERSIONED:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "libraries": ", ".join(versions),
    }


# Output -----------------------------------------------------------------------------------


def tables(results: Results) -> list[Table]:
    out: list[Table | None] = []
    if results.inprocess:
        out.append(inprocess_table(results.inprocess))
    if results.dynamodb:
        out.append(dynamodb_table(results.dynamodb))
    if results.http:
        out.append(http_table(results.http))
        out.append(loop_health_table(results.http))
    return [table for table in out if table is not None]


def print_rich(results: Results, checks: list[TargetCheck]) -> None:
    from rich.console import Console
    from rich.table import Table as RichTable

    # Wide enough for the tables when the output is a file or a pipe, not a terminal.
    console = Console(width=None if sys.stdout.isatty() else 140)
    for title, header, rows, note in tables(results):
        table = RichTable(title=title, caption=note, caption_justify="left")
        for i, name in enumerate(header):
            table.add_column(name, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    targets_table = RichTable(title="Targets")
    for name in ("target", "measured", "limit", "result"):
        targets_table.add_column(name)
    for check in checks:
        verdict = "[green]pass[/green]" if check.passed else "[red]FAIL[/red]"
        targets_table.add_row(check.name, check.measured, check.limit, verdict)
    console.print(targets_table)


def markdown_results(results: Results, checks: list[TargetCheck], chart: Path | None) -> str:
    lines = []
    info = machine()
    lines.append(f"Run on {info['date']}: {info['machine']}; {info['python']}.")
    lines.append(f"Libraries: {info['libraries']}.")
    lines.append("")
    if chart is not None:
        lines.append(f"![benchmark chart]({chart.relative_to(ROOT).as_posix()})")
        lines.append("")
    for title, header, rows, note in tables(results):
        lines.append(f"### {title}")
        lines.append("")
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
        lines.extend("| " + " | ".join(row) + " |" for row in rows)
        lines.append("")
        lines.append(note)
        lines.append("")
    lines.append("### Targets")
    lines.append("")
    lines.append("| target | measured | limit | result |")
    lines.append("|---|---:|---:|---|")
    lines.extend(
        f"| {c.name} | {c.measured} | {c.limit} | {'pass' if c.passed else '**FAIL**'} |"
        for c in checks
    )
    return "\n".join(lines)


def update_markdown(results: Results, checks: list[TargetCheck], chart: Path | None) -> None:
    """Replace the results block of BENCHMARKS.md; the prose around it is written by hand."""
    block = f"{RESULTS_START}\n{markdown_results(results, checks, chart)}\n{RESULTS_END}"
    text = MARKDOWN.read_text(encoding="utf-8") if MARKDOWN.exists() else ""
    pattern = re.compile(re.escape(RESULTS_START) + ".*?" + re.escape(RESULTS_END), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = (text.rstrip() + "\n\n" if text else "# Benchmarks\n\n") + block + "\n"
    MARKDOWN.write_text(text, encoding="utf-8")


def _rolling_median(values: list[float], window: int) -> list[float]:
    half = window // 2
    return [statistics.median(values[max(0, i - half) : i + half + 1]) for i in range(len(values))]


def write_chart(results: Results, path: Path = CHART) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in (results.inprocess, results.dynamodb, results.http) if p is not None]
    if not panels:
        return None
    columns = 2 if results.inprocess else 1
    count = (2 if results.inprocess else 0) + bool(results.dynamodb) + bool(results.http)
    figure_rows = (count + columns - 1) // columns
    figure, axes_grid = plt.subplots(
        figure_rows, columns, figsize=(13, 4.6 * figure_rows), squeeze=False
    )
    axes = list(axes_grid.flat)
    for extra in axes[count:]:
        extra.set_visible(False)
    colours = {"bare": "#9e9e9e", "ours": "#1f77b4", "peer": "#ff7f0e"}

    def colour(name: str) -> str:
        if name.startswith("bare"):
            return colours["bare"]
        return colours["peer"] if name.startswith(PEER) else colours["ours"]

    index = 0
    if results.inprocess:
        rows = results.inprocess.rows
        ax = axes[index]
        ax.barh([r.name for r in rows], [r.us for r in rows], color=[colour(r.name) for r in rows])
        for i, r in enumerate(rows):
            ax.text(r.us, i, f" {r.us:.0f} µs ({r.ratio:.2f}x)", va="center", fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("CPU µs per request (median of rounds)")
        ax.set_title("In-process ASGI, memory stores")
        ax.margins(x=0.25)
        ax = axes[index + 1]
        per_round = results.inprocess.per_round
        for r in rows:
            if "FastAPI" in r.name:
                continue
            keys = [(i + 1) * per_round for i in range(len(r.us_per_round))]
            style = ":" if "cache" in r.name else "--" if "replay" in r.name else "-"
            smoothed = _rolling_median(r.us_per_round, 5)
            ax.plot(keys, smoothed, label=r.name, color=colour(r.name), linestyle=style)
        ax.set_xlabel("keys in the store")
        ax.set_ylabel("CPU µs per request (rolling median of 5 rounds)")
        ax.set_title("Cost as the stores fill (Starlette)")
        ax.legend(fontsize=7)
        index += 2
    if results.dynamodb:
        ax = axes[index]
        libraries = [name for pair in PAIRS for name in pair]
        palette = ["#1f77b4", "#ff7f0e", "#6baed6", "#fdae6b"]
        width = 0.8 / len(libraries)
        for n, library in enumerate(libraries):
            values = [results.dynamodb.case(library, case).median_ms for case in CASES]
            offsets = [p + (n - (len(libraries) - 1) / 2) * width for p in range(len(CASES))]
            ax.bar(offsets, values, width, label=library, color=palette[n])
        ax.axhline(
            results.dynamodb.put_item_ms, color="#444", linestyle=":", label="one raw PutItem"
        )
        ax.set_xticks(list(range(len(CASES))), CASES)
        ax.set_ylabel("ms per request (median)")
        ax.set_title("DynamoDB Local: ours vs Powertools")
        ax.legend(fontsize=7)
        index += 1
    if results.http:
        ax = axes[index]
        labels = [
            f"{r.server.split(' + ')[0]}: {r.variant}, {r.traffic}"
            if r.variant != "bare"
            else f"{r.server.split(' + ')[0]}: bare"
            for r in results.http.rows
        ]
        values = [r.result.rps for r in results.http.rows]
        ax.barh(labels, values, color=[colour(r.variant) for r in results.http.rows])
        ax.invert_yaxis()
        ax.set_xlabel("requests/s, 32 connections")
        ax.set_title("HTTP under load (one worker)")
        ax.tick_params(axis="y", labelsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
