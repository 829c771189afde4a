"""The Flask extension: ``Idempotency(app, persistence_layer=...)`` or ``init_app``.

It wraps ``app.wsgi_app`` in :class:`~idem_middleware.IdempotencyWSGIMiddleware`, exactly what
wrapping it by hand does, and adds what only an extension can: ``flask.g.idempotency`` (the
:class:`~idem_middleware.state.IdempotencyState` of a request that holds a key, ``None``
otherwise) and ``app.extensions["idem_middleware"]``. ``@idempotent`` views are found in the
app's ``url_map`` on the first request; :meth:`Idempotency.resolve_routes` checks them sooner.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flask import Flask, g, request

from idem_middleware.config import IdempotencyConfig
from idem_middleware.persistence.base import BasePersistenceLayer
from idem_middleware.state import ENVIRON_KEY, STATE_NAME
from idem_middleware.wsgi import IdempotencyWSGIMiddleware

if TYPE_CHECKING:
    from idem_middleware.state import IdempotencyState

__all__ = ["EXTENSION_NAME", "Idempotency", "current_idempotency"]

#: The key of ``app.extensions`` this extension registers under.
EXTENSION_NAME = "idem_middleware"


class Idempotency:
    """Makes a Flask app's covered views idempotent.

    ``Idempotency(app, persistence_layer=layer, config=config)``, or, with an app factory,
    ``idempotency = Idempotency(persistence_layer=layer)`` then ``idempotency.init_app(app)``.
    One extension may serve several apps; each gets its own middleware over the same layer
    (and so the same config).
    """

    def __init__(
        self,
        app: Flask | None = None,
        *,
        persistence_layer: BasePersistenceLayer,
        config: IdempotencyConfig | None = None,
    ) -> None:
        if not isinstance(persistence_layer, BasePersistenceLayer):
            raise TypeError(
                "persistence_layer: expected a BasePersistenceLayer instance such as "
                f"InMemoryPersistenceLayer(), got {persistence_layer!r}"
            )
        self.persistence_layer = persistence_layer
        self.config = config
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        if EXTENSION_NAME in app.extensions:
            raise RuntimeError(f"Idempotency is already initialised on the Flask app {app.name!r}")
        middleware = IdempotencyWSGIMiddleware(
            app.wsgi_app, persistence_layer=self.persistence_layer, config=self.config
        )
        app.wsgi_app = middleware  # type: ignore[method-assign]  # Flask's documented idiom
        app.extensions[EXTENSION_NAME] = middleware
        app.before_request(_expose_state)

    @staticmethod
    def middleware(app: Flask) -> IdempotencyWSGIMiddleware:
        """The middleware ``init_app`` installed on ``app``."""
        middleware = app.extensions.get(EXTENSION_NAME)
        if not isinstance(middleware, IdempotencyWSGIMiddleware):
            raise RuntimeError(f"Idempotency is not initialised on the Flask app {app.name!r}")
        return middleware

    def resolve_routes(self, app: Flask) -> None:
        """Check the ``@idempotent`` options of ``app``'s views now, not on the first request:
        call it once every view and blueprint is registered.

        Raises :class:`ValueError` (or :class:`TypeError`) naming the route and the field.
        """
        self.middleware(app).resolve_routes()


def _expose_state() -> None:
    setattr(g, STATE_NAME, request.environ.get(ENVIRON_KEY))


def current_idempotency() -> IdempotencyState | None:
    """The idempotency state of the request being handled (works with or without the
    extension: it reads the environ), ``None`` when it is not deduplicated.
    """
    state: IdempotencyState | None = request.environ.get(ENVIRON_KEY)
    return state
