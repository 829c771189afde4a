"""A payments API on Django, made idempotent by wrapping Django's WSGI or ASGI application.

Run it::

    gunicorn --threads 8 example_apps.django_app.wsgi:application
    uvicorn example_apps.django_app.asgi:application
    IDEM_STORE_URL=sqlite:///idempotency.sqlite3 \
        gunicorn --workers 4 example_apps.django_app.wsgi:application

Routes: ``POST /payments``, ``GET /payments/<id>``, ``GET /health`` and ``GET /_stats``, with
the same ``Authorization: Bearer <user>`` and environment variables as the other example apps
(``example_apps.store``). The idempotency config lives in ``settings.IDEMPOTENCY_CONFIG``.
"""
