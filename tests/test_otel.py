"""``OpenTelemetryHook``: each decision becomes a span event on the request's span and a count
of ``idempotency.decisions``, read back with the SDK's in-memory exporter and metric reader.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
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
from idem_middleware.otel import DECISIONS_COUNTER, OpenTelemetryHook
from idem_middleware.persistence import BasePersistenceLayer, InMemoryPersistenceLayer
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

    def decisions(self) -> dict[tuple[Any, ...], int]:
        """The counter's value per (decision, method, status)."""
        counts: dict[tuple[Any, ...], int] = {}
        data = self.reader.get_metrics_data()
        for resource in data.resource_metrics if data else []:
            for scope in resource.scope_metrics:
                assert scope.scope.name == "idem_middleware"
                for metric in scope.metrics:
                    assert metric.name == DECISIONS_COUNTER
                    for point in metric.data.data_points:  # type: ignore[union-attr]
                        a = point.attributes or {}
                        key = (
                            a["idempotency.decision"],
                            a["http.request.method"],
                            a.get("http.response.status_code"),
                        )
                        counts[key] = int(point.value)
        return counts

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
        (metric,) = reader.get_metrics_data().resource_metrics[0].scope_metrics[0].metrics
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
