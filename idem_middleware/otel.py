"""OpenTelemetry for the decisions: ``IdempotencyConfig(on_event=OpenTelemetryHook())``.

Each decision (:class:`~idem_middleware.IdempotencyEvent`) becomes

* a span event ``idempotency.<name>`` on the current span (the request's span, when the app is
  instrumented, e.g. by ``opentelemetry-instrumentation-asgi``), with the method, path, status
  and stored key; the span also gets ``idempotency.decision`` (the latest decision) and, on a
  replay, ``idempotency.replayed = true``;
* one increment of the counter ``idempotency.decisions``, by ``idempotency.decision``,
  ``http.request.method`` and ``http.response.status_code`` (no path and no key: they would
  make one time series per request);
* for a decision made with store calls (``IdempotencyEvent.store_seconds``), one record of the
  histogram ``idempotency.store.duration`` (seconds): the time those calls took, by
  ``idempotency.decision`` and ``http.request.method``. A local-cache replay or a refusal
  before the claim makes no store call and records nothing.

Through the OpenTelemetry API only (the ``otel`` extra, ``opentelemetry-api``): without an SDK
configured, all are the API's no-ops.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

try:
    from opentelemetry import metrics, trace
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "idem_middleware.otel needs the OpenTelemetry API: pip install 'idem-middleware[otel]'"
    ) from exc

from idem_middleware import __version__

if TYPE_CHECKING:
    from opentelemetry.util.types import AttributeValue

    from idem_middleware.engine import IdempotencyEvent

__all__ = ["DECISIONS_COUNTER", "STORE_DURATION_HISTOGRAM", "OpenTelemetryHook"]

DECISIONS_COUNTER = "idempotency.decisions"
STORE_DURATION_HISTOGRAM = "idempotency.store.duration"
_SCOPE = "idem_middleware"


class OpenTelemetryHook:
    """An ``on_event`` callable reporting each decision to OpenTelemetry.

    Events go on whatever span is current when the decision is made. ``meter_provider``
    defaults to the global one (set by the SDK or an auto-instrumentation agent, even after
    this hook is built). ``record_key=False`` keeps the
    stored key off spans (it is a hash when ``scope`` or a body key is used, but a header key
    is stored as the client sent it).
    """

    def __init__(
        self,
        *,
        meter_provider: metrics.MeterProvider | None = None,
        record_key: bool = True,
    ) -> None:
        meter = metrics.get_meter(_SCOPE, __version__, meter_provider)
        self._decisions = meter.create_counter(
            DECISIONS_COUNTER,
            unit="{decision}",
            description="Decisions of the idempotency middleware, by decision and status.",
        )
        self._store_duration = meter.create_histogram(
            STORE_DURATION_HISTOGRAM,
            unit="s",
            description="Time the store calls behind one decision took, by decision.",
        )
        self.record_key = record_key

    def __call__(self, event: IdempotencyEvent) -> None:
        labels: dict[str, AttributeValue] = {
            "idempotency.decision": event.name,
            "http.request.method": event.method,
        }
        if event.status is not None:
            labels["http.response.status_code"] = event.status
        self._decisions.add(1, labels)
        if event.store_seconds is not None:
            self._store_duration.record(
                event.store_seconds,
                {"idempotency.decision": event.name, "http.request.method": event.method},
            )

        span = trace.get_current_span()
        if not span.is_recording():
            return
        attributes = {**labels, "url.path": event.path}
        if event.detail is not None:
            attributes["idempotency.detail"] = event.detail
        if event.key is not None and self.record_key:
            attributes["idempotency.key"] = event.key
        span.add_event(f"idempotency.{event.name}", attributes)
        span.set_attribute("idempotency.decision", event.name)
        if event.name == "replayed":
            span.set_attribute("idempotency.replayed", True)
