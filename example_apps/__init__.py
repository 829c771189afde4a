"""Example payments APIs made idempotent by idem_middleware.

Three versions of the same small API, one per framework, each wiring the middleware the way its
users would:

* ``example_apps.fastapi_app`` - ``app.add_middleware(IdempotencyMiddleware, ...)``
* ``example_apps.starlette_app`` - ``Starlette(middleware=[Middleware(IdempotencyMiddleware,
  ...)])``
* ``example_apps.flask_app`` - ``app.wsgi_app = IdempotencyWSGIMiddleware(app.wsgi_app, ...)``

Routes: ``POST /payments``, ``POST /payments/{id}/refunds``, ``GET /payments/{id}``,
``POST /exports`` (a CSV of the user's payments, streamed line by line), ``GET /health`` and
``GET /_stats`` (how many payments, refunds and exports the handlers created).
Callers authenticate with ``Authorization: Bearer <user>``; in these demos the token *is* the
user id. Environment variables (store, ledger) are listed in ``example_apps.store``.
"""
