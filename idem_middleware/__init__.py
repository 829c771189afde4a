"""idem_middleware: make HTTP APIs idempotent with the ``Idempotency-Key`` header.

A retried request with the same key runs the handler once; every retry gets the first response
back. See ``IdempotencyMiddleware`` (ASGI) and ``IdempotencyWSGIMiddleware`` (WSGI).
"""

from idem_middleware.asgi import IdempotencyMiddleware
from idem_middleware.config import IdempotencyConfig
from idem_middleware.decorator import idempotent
from idem_middleware.engine import IdempotencyEvent
from idem_middleware.request import IdempotencyRequest
from idem_middleware.responses import StoredResponse
from idem_middleware.state import IdempotencyState
from idem_middleware.wsgi import IdempotencyWSGIMiddleware

__all__ = [
    "IdempotencyConfig",
    "IdempotencyEvent",
    "IdempotencyMiddleware",
    "IdempotencyRequest",
    "IdempotencyState",
    "IdempotencyWSGIMiddleware",
    "StoredResponse",
    "idempotent",
]
__version__ = "0.1.0"
