"""Settings of the Django example: one file, no database (the ledger is ``example_apps.store``).

The middleware wraps the whole Django application (``wsgi.py``, ``asgi.py``) rather than sitting
in ``MIDDLEWARE``: a retry is then answered before Django parses anything, and the same
``IdempotencyConfig`` serves both servers.
"""

from __future__ import annotations

import os

from example_apps.store import on_store_error_from_env, user_scope
from idem_middleware import IdempotencyConfig

# A development key: set DJANGO_SECRET_KEY anywhere that matters.
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "django-insecure-idem-middleware-example")
DEBUG = False
ALLOWED_HOSTS = os.environ.get("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost,testserver").split(",")
ROOT_URLCONF = "example_apps.django_app.urls"
INSTALLED_APPS: list[str] = []
DATABASES: dict[str, dict[str, str]] = {}
# Kept, as in any real project, to show that the JSON API views must be exempted from it
# (urls.py): API clients send no CSRF token, so CsrfViewMiddleware would refuse their POSTs.
MIDDLEWARE = ["django.middleware.csrf.CsrfViewMiddleware"]
USE_TZ = True

IDEMPOTENCY_CONFIG = IdempotencyConfig(
    include_paths=("/payments",),
    require_key=True,
    scope=user_scope,
    on_store_error=on_store_error_from_env(),
)
