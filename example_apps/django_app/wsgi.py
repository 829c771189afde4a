"""``gunicorn example_apps.django_app.wsgi:application``: Django's WSGI application wrapped in
``IdempotencyWSGIMiddleware``.
"""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example_apps.django_app.settings")

from django.conf import settings  # type: ignore[import-untyped]
from django.core.wsgi import get_wsgi_application  # type: ignore[import-untyped]

from example_apps.store import configure_logging, persistence_layer_from_env
from idem_middleware import IdempotencyWSGIMiddleware

configure_logging()
application = IdempotencyWSGIMiddleware(
    get_wsgi_application(),
    persistence_layer=persistence_layer_from_env(),
    config=settings.IDEMPOTENCY_CONFIG,
)
