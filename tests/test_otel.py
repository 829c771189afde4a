"""``OpenTelemetryHook``: each decision becomes a span event on the request's span, a count of
``idempotency.decisions`` and, when it took store calls, a record of ``idempotency.store.duration``,
read back with the SDK's in-memory exporter and metric reader. Also the levels decisions log at.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from idem_middleware import IdempotencyConfig
from idem_middleware.exceptions import IdempotencyPersistenceLayerError
from idem_middleware.otel import DECISIONS_COUNTER, STORE_DURATION_HISTOGRAM, OpenTelemetryHook
from idem_middleware.persistence import BasePersistenceLayer, DataRecord, InMemoryPersistenceLayer
from idem_middleware.persistence.sqlite import SQLitePersistenceLayer
from tests.support.harness import Harness, Reply

ROOT = Path(__file__).resolve().parents[1]


class Telemetry:
    def __init__(self) -> None:
        self.spans = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.tracer = self.tracer_provider.get_tracer("test")
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    def points(self, name: str) -> list[Any]:
        """The data points of the metric ``name``."""
        points: list[Any] = []
        data = self.reader.get_metrics_data()
        for resource in data.resource_metrics if data else []:
            for scope in resource.scope_metrics:
                assert scope.scope.name == "idem_middleware"
                for metric in scope.metrics:
                    assert metric.name in (DECISIONS_COUNTER, STORE_DURATION_HISTOGRAM)
                    if metric.name == name:
                        points.extend(metric.data.data_points)  # type: ignore[union-attr]
        return points

    def decisions(self) -> dict[tuple[Any, ...], int]:
        """The counter's value per (decision, method, status)."""
        counts: dict[tuple[Any, ...], int] = {}
        for point in self.points(DECISIONS_COUNTER):
            a = point.attributes or {}
            key = (
                a["idempotency.decision"],
                a["http.request.method"],
                a.get("http.response.status_code"),
            )
            counts[key] = int(point.value)
        return counts

    def store_durations(self) -> dict[tuple[Any, ...], tuple[int, float, float]]:
        """The histogram's (count, min, sum) per (decision, method)."""
        durations: dict[tuple[Any, ...], tuple[int, float, float]] = {}
        for point in self.points(STORE_DURATION_HISTOGRAM):
            a = point.attributes or {}
            assert set(a) == {"idempotency.decision", "http.request.method"}
            key = (a["idempotency.decision"], a["http.request.method"])
            durations[key] = (point.count, point.min, point.sum)
        return durations

    def finished(self, name: str) -> ReadableSpan:
        (span,) = [s for s in self.spans.get_finished_spans() if s.name == name]
        return span


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    telemetry = Telemetry()
    yield telemetry
    telemetry.tracer_provider.shutdown()
    telemetry.meter_provider.shutdown()


@pytest.fixture(params=["asgi-memory", "asgi-sqlite", "wsgi-memory", "wsgi-sqlite"])
def layer_and_kind(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Any]:
    """SQLite blocks, so under ASGI the engine runs in worker threads: the request's span must
    still be the current one there.
    """
    kind, store = request.param.split("-")
    layer: BasePersistenceLayer = (
        InMemoryPersistenceLayer()
        if store == "memory"
        else SQLitePersistenceLayer(str(tmp_path / "idem.sqlite3"))
    )
    return kind, layer


def events(span: ReadableSpan) -> list[tuple[str, dict[str, Any]]]:
    return [(event.name, dict(event.attributes or {})) for event in span.events]


def test_decisions_become_span_events_and_counts(
    telemetry: Telemetry, layer_and_kind: tuple[str, Any]
) -> None:
    kind, layer = layer_and_kind
    hook = OpenTelemetryHook(meter_provider=telemetry.meter_provider)
    harness = Harness(kind, layer, IdempotencyConfig(on_event=hook))

    def post(span_name: str, path: str, key: str, body: Any) -> Reply:
        with telemetry.tracer.start_as_current_span(span_name):
            return harness.request("POST", path, headers=[("Idempotency-Key", key)], json_body=body)

    assert post("first", "/orders", "k1", {"n": 1}).status == 201
    assert post("retry", "/orders", "k1", {"n": 1}).replayed
    assert post("reuse", "/orders", "k1", {"n": 2}).status == 422
    assert post("failure", "/server-error", "k2", {"n": 1}).status == 503

    first = telemetry.finished("first")
    assert [name for name, _ in events(first)] == ["idempotency.claimed", "idempotency.completed"]
    completed = events(first)[1][1]
    assert completed["http.request.method"] == "POST"
    assert completed["url.path"] == "/orders"
    assert completed["http.response.status_code"] == 201
    assert completed["idempotency.key"]
    assert first.attributes is not None
    assert first.attributes["idempotency.decision"] == "completed"
    assert "idempotency.replayed" not in first.attributes

    retry = telemetry.finished("retry")
    assert [name for name, _ in events(retry)] == ["idempotency.replayed"]
    assert retry.attributes is not None
    assert retry.attributes["idempotency.replayed"] is True

    reuse = telemetry.finished("reuse")
    (mismatch,) = events(reuse)
    assert mismatch[0] == "idempotency.mismatch"
    assert mismatch[1]["idempotency.detail"] == "idempotency_key_reused"
    assert mismatch[1]["http.response.status_code"] == 422

    failure = telemetry.finished("failure")
    assert [name for name, _ in events(failure)] == ["idempotency.claimed", "idempotency.released"]

    assert telemetry.decisions() == {
        ("claimed", "POST", None): 2,
        ("completed", "POST", 201): 1,
        ("replayed", "POST", 201): 1,
        ("mismatch", "POST", 422): 1,
        ("released", "POST", 503): 1,
    }


def test_record_key_false_keeps_the_key_off_spans(telemetry: Telemetry) -> None:
    hook = OpenTelemetryHook(meter_provider=telemetry.meter_provider, record_key=False)
    harness = Harness("asgi", InMemoryPersistenceLayer(), IdempotencyConfig(on_event=hook))
    with telemetry.tracer.start_as_current_span("request"):
        harness.request("POST", "/orders", headers=[("Idempotency-Key", "secret-ish")])
    span = telemetry.finished("request")
    assert span.events
    assert all("idempotency.key" not in (event.attributes or {}) for event in span.events)


def test_outside_any_span_only_the_counter_moves(telemetry: Telemetry) -> None:
    hook = OpenTelemetryHook(meter_provider=telemetry.meter_provider)
    harness = Harness("wsgi", InMemoryPersistenceLayer(), IdempotencyConfig(on_event=hook))
    harness.request("POST", "/orders", headers=[("Idempotency-Key", "k")])
    assert telemetry.spans.get_finished_spans() == ()
    assert telemetry.decisions() == {("claimed", "POST", None): 1, ("completed", "POST", 201): 1}


def test_without_an_sdk_the_hook_is_a_no_op_until_one_is_configured() -> None:
    """The API alone: nothing recorded, nothing raised, no SDK imported. An SDK configured
    later (as auto-instrumentation agents do) receives the counts from then on.
    """
    code = textwrap.dedent(
        """
        import sys
        from idem_middleware import IdempotencyConfig
        from idem_middleware.otel import OpenTelemetryHook
        from idem_middleware.persistence import InMemoryPersistenceLayer
        from tests.support.harness import Harness

        hook = OpenTelemetryHook()
        harness = Harness("asgi", InMemoryPersistenceLayer(), IdempotencyConfig(on_event=hook))
        assert harness.request("POST", "/orders", headers=[("Idempotency-Key", "a")]).status == 201
        assert "opentelemetry.sdk" not in sys.modules, "the hook imported the SDK"

        from opentelemetry import metrics
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader

        reader = InMemoryMetricReader()
        metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
        assert harness.request("POST", "/orders", headers=[("Idempotency-Key", "b")]).status == 201
        metrics_data = reader.get_metrics_data().resource_metrics[0].scope_metrics[0].metrics
        (metric,) = [m for m in metrics_data if m.name == "idempotency.decisions"]
        print(sorted(
            (p.attributes["idempotency.decision"], p.value) for p in metric.data.data_points
        ))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[('claimed', 1), ('completed', 1)]"


def test_a_broken_exporter_never_breaks_a_request(telemetry: Telemetry) -> None:
    class Broken(OpenTelemetryHook):
        def __call__(self, event: Any) -> None:
            raise RuntimeError("collector down")

    harness = Harness("asgi", InMemoryPersistenceLayer(), IdempotencyConfig(on_event=Broken()))
    assert harness.request("POST", "/orders", headers=[("Idempotency-Key", "k")]).status == 201


# Store-call latency -------------------------------------------------------------------------


def test_each_decision_with_store_calls_records_their_duration(
    telemetry: Telemetry, layer_and_kind: tuple[str, Any]
) -> None:
    kind, layer = layer_and_kind
    hook = OpenTelemetryHook(meter_provider=telemetry.meter_provider)
    harness = Harness(kind, layer, IdempotencyConfig(on_event=hook))

    def post(path: str, key: str, body: Any) -> Reply:
        return harness.request("POST", path, headers=[("Idempotency-Key", key)], json_body=body)

    assert post("/orders", "k1", {"n": 1}).status == 201  # claimed, completed
    assert post("/orders", "k1", {"n": 1}).replayed  # replayed from the record the claim met
    assert post("/orders", "k1", {"n": 2}).status == 422  # mismatch
    assert post("/server-error", "k2", {"n": 1}).status == 503  # claimed, released
    assert post("/orders", "", {"n": 1}).status == 400  # rejected: no store call

    durations = telemetry.store_durations()
    assert {key: count for key, (count, _, _) in durations.items()} == {
        ("claimed", "POST"): 2,
        ("completed", "POST"): 1,
        ("replayed", "POST"): 1,
        ("mismatch", "POST"): 1,
        ("released", "POST"): 1,
    }
    assert all(minimum >= 0 for _, minimum, _ in durations.values())
    assert ("rejected", "POST", 400) in telemetry.decisions()


def test_a_local_cache_replay_records_no_store_duration(telemetry: Telemetry) -> None:
    events: list[Any] = []
    hook = OpenTelemetryHook(meter_provider=telemetry.meter_provider)

    def both(event: Any) -> None:
        events.append(event)
        hook(event)

    config = IdempotencyConfig(on_event=both, use_local_cache=True)
    harness = Harness("asgi", InMemoryPersistenceLayer(), config)
    headers = [("Idempotency-Key", "cached")]
    assert harness.request("POST", "/orders", headers=headers).status == 201
    assert harness.request("POST", "/orders", headers=headers).replayed

    assert [(e.name, e.store_seconds is None) for e in events] == [
        ("claimed", False),
        ("completed", False),
        ("replayed", True),
    ]
    assert ("replayed", "POST", 201) in telemetry.decisions()
    assert set(telemetry.store_durations()) == {("claimed", "POST"), ("completed", "POST")}


SLOW = 0.05


class StoreClock:
    """The engine's ``perf_counter`` for the slow store: time passes only in its slow calls, so
    what the durations show does not depend on how loaded the machine is.
    """

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class SlowLayer(InMemoryPersistenceLayer):
    """Each claim takes ``SLOW`` seconds of ``clock``, blocking or (``native_async``) on the
    event loop.
    """

    def __init__(self, *, native: bool, clock: StoreClock) -> None:
        super().__init__()
        self.native_async = native
        self.store_clock = clock

    def _put_record(self, data_record: DataRecord) -> None:
        self.store_clock.now += SLOW
        super()._put_record(data_record)

    async def _aput_record(self, data_record: DataRecord) -> None:
        await asyncio.sleep(0)  # a suspension on the loop, as a store call has
        self.store_clock.now += SLOW
        InMemoryPersistenceLayer._put_record(self, data_record)

    async def _aget_record(self, idempotency_key: str) -> DataRecord:
        return self._get_record(idempotency_key)

    async def _aupdate_record(self, data_record: DataRecord) -> None:
        self._update_record(data_record)

    async def _arenew_record(self, lease: DataRecord, renewed: DataRecord) -> None:
        self._renew_record(lease, renewed)

    async def _adelete_record(self, data_record: DataRecord) -> None:
        self._delete_record(data_record)


@pytest.mark.parametrize(
    ("kind", "native"), [("wsgi", False), ("asgi", False), ("asgi", True)], ids=str
)
def test_a_slow_store_shows_in_the_duration(
    telemetry: Telemetry, kind: str, native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = StoreClock()
    # The clocks that time store calls (the steps of a store call, and SQLite's inline reads).
    monkeypatch.setattr("idem_middleware.persistence.steps.perf_counter", clock)
    monkeypatch.setattr("idem_middleware.engine.perf_counter", clock)
    hook = OpenTelemetryHook(meter_provider=telemetry.meter_provider)
    harness = Harness(kind, SlowLayer(native=native, clock=clock), IdempotencyConfig(on_event=hook))
    assert harness.request("POST", "/orders", headers=[("Idempotency-Key", "k")]).status == 201

    durations = telemetry.store_durations()
    count, minimum, _ = durations[("claimed", "POST")]
    assert count == 1
    assert minimum == SLOW
    _, completed, _ = durations[("completed", "POST")]
    assert completed == 0  # its own calls only, not the claim's


class DownLayer(InMemoryPersistenceLayer):
    def _put_record(self, data_record: DataRecord) -> None:
        time.sleep(SLOW)  # a store that times out
        raise IdempotencyPersistenceLayerError("store down")


def test_a_store_error_carries_the_time_lost_on_the_store(telemetry: Telemetry) -> None:
    hook = OpenTelemetryHook(meter_provider=telemetry.meter_provider)
    harness = Harness("wsgi", DownLayer(), IdempotencyConfig(on_event=hook))
    assert harness.request("POST", "/orders", headers=[("Idempotency-Key", "k")]).status == 503
    count, minimum, _ = telemetry.store_durations()[("store_error", "POST")]
    assert (count, minimum >= SLOW) == (1, True)


# Log levels ---------------------------------------------------------------------------------


def test_decisions_log_at_debug_and_store_trouble_at_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A busy service runs at INFO without a line per request; store trouble still shows."""
    caplog.set_level(logging.DEBUG, logger="idem_middleware")
    harness = Harness("wsgi", InMemoryPersistenceLayer(), IdempotencyConfig())
    harness.request("POST", "/orders", headers=[("Idempotency-Key", "k")])
    harness.request("POST", "/orders", headers=[("Idempotency-Key", "k")])
    down = Harness("wsgi", DownLayer(), IdempotencyConfig())
    down.request("POST", "/orders", headers=[("Idempotency-Key", "k")])

    levels = [
        (record.idempotency.name, record.levelname)  # type: ignore[attr-defined]
        for record in caplog.records
        if hasattr(record, "idempotency")
    ]
    assert levels == [
        ("claimed", "DEBUG"),
        ("completed", "DEBUG"),
        ("replayed", "DEBUG"),
        ("store_error", "WARNING"),
    ]
    (claimed,) = [r.getMessage() for r in caplog.records if "idempotency claimed" in r.getMessage()]
    assert "store_seconds=" in claimed


def test_store_calls_are_timed_only_when_something_reads_the_events(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Without ``on_event`` and with decisions' DEBUG lines off, no request pays for timing:
    a store error logged at WARNING then has no ``store_seconds``.
    """
    caplog.set_level(logging.WARNING, logger="idem_middleware")
    Harness("wsgi", DownLayer(), IdempotencyConfig()).request(
        "POST", "/orders", headers=[("Idempotency-Key", "k")]
    )
    (event,) = [r.idempotency for r in caplog.records if hasattr(r, "idempotency")]  # type: ignore[attr-defined]
    assert (event.name, event.store_seconds) == ("store_error", None)

    caplog.set_level(logging.DEBUG, logger="idem_middleware")
    caplog.clear()
    Harness("wsgi", DownLayer(), IdempotencyConfig()).request(
        "POST", "/orders", headers=[("Idempotency-Key", "k")]
    )
    (event,) = [r.idempotency for r in caplog.records if hasattr(r, "idempotency")]  # type: ignore[attr-defined]
    assert event.name == "store_error"
    assert event.store_seconds >= SLOW
