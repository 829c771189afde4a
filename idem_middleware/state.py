"""What a handler can know about the idempotency of the request it serves.

The middleware puts an :class:`IdempotencyState` where the handler finds it whenever the handler
runs under a claimed key:

* ASGI: ``scope["state"]["idempotency"]``, i.e. ``request.state.idempotency`` in Starlette and
  FastAPI;
* WSGI: ``environ["idem_middleware.idempotency"]``, and ``flask.g.idempotency`` with the Flask
  extension (:class:`idem_middleware.flask.Idempotency`).

A request that is not deduplicated (not covered, no key, or the store unreachable under
``on_store_error="passthrough"``) has none: ``getattr(request.state, "idempotency", None)``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

__all__ = ["ENVIRON_KEY", "STATE_NAME", "IdempotencyState"]

#: The name in the ASGI scope's ``state`` (``request.state.idempotency``).
STATE_NAME = "idempotency"
#: The key in the WSGI environ.
ENVIRON_KEY = "idem_middleware.idempotency"


@dataclass(frozen=True, slots=True)
class IdempotencyState:
    """The handler runs for a request that holds ``key``, and its response will be replayed to
    every retry.

    ``key`` is the stored key (``prefix#hash``), never the client's raw key. ``first_execution``
    says that no earlier execution for this key completed: this one's response is the one that
    will be stored. An earlier one may have started and died (its process crashed, its lease ran
    out, or it failed with a 5xx and released the key), so side effects outside this service
    must be idempotent too: pass them a :meth:`child_key`.
    """

    key: str
    first_execution: bool = True

    def child_key(self, name: str) -> str:
        """A key for a downstream API (a payment provider's own ``Idempotency-Key``), named by
        ``name`` (``"stripe"``, ``"ledger:debit"``).

        The same for every execution under this key, so a retry that runs again after a crash
        sends the downstream API the same key, and it deduplicates too; different for each name
        and each key. 64 hex digits (SHA-256), within every provider's limit (Stripe: 255).
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"name: must be a non-empty string, got {name!r}")
        digest = hashlib.sha256(self.key.encode("utf-8"))
        digest.update(b"\0")
        digest.update(name.encode("utf-8"))
        return digest.hexdigest()
