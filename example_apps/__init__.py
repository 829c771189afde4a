"""Example payments APIs made idempotent by idem_middleware.

Three versions of the same small API, one per framework, each wiring the middleware the way its
users would:

* ``example_apps.fastapi_app`` - ``app.add_middleware(IdempotencyMiddleware, ...)``
* ``example_apps.starlette_app`` - ``Starlette(middleware=[Middleware(IdempotencyMiddleware,
  ...)])``
* ``example_apps.flask_app`` - ``app.wsgi_app = IdempotencyWSGIMiddleware(app.wsgi_app, ...)``

Routes: ``POST /payments``, ``POST /payments/{id}/refunds``, ``GET /payments/{id}``,
``GET /health`` and ``GET /_stats`` (how many payments and refunds the handlers created).
Callers authenticate with ``Authorization: Bearer <user>``; in these demos the token *is* the
user id. Environment variables (store, ledger) are listed in ``example_apps.store``.
"""
