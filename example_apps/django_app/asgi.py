"""``uvicorn example_apps.django_app.asgi:application``: Django's ASGI application wrapped in
``IdempotencyMiddleware``.
"""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example_apps.django_app.settings")

from django.conf import settings  # type: ignore[import-untyped]
from django.core.asgi import get_asgi_application  # type: ignore[import-untyped]

from example_apps.store import configure_logging, persistence_layer_from_env
from idem_middleware import IdempotencyMiddleware

configure_logging()
application = IdempotencyMiddleware(
    get_asgi_application(),
    persistence_layer=persistence_layer_from_env(),
    config=settings.IDEMPOTENCY_CONFIG,
)
