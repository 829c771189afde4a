"""``@idempotent``: per-route options for FastAPI and Starlette endpoints and Flask views.

The decorator only marks the function (an attribute, no wrapper), so it works above or below
the framework's own route decorator and costs the endpoint nothing. The middleware finds the
marked endpoints in the app's routes once (:mod:`idem_middleware.route_table`) and builds each
route's config from its own with :func:`dataclasses.replace`, so per-route options are checked
by ``IdempotencyConfig`` itself, with the same messages, when the app starts.

Options that belong to the persistence layer (``hash_function``, ``key_prefix``,
``in_progress_expires_after_seconds``, the local cache) or to the whole middleware
(``include_paths``, ``on_store_error``, ...) are not per-route: a layer serves one of each.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

if TYPE_CHECKING:
    from idem_middleware.config import KeySource
    from idem_middleware.request import IdempotencyRequest
    from idem_middleware.responses import StoredResponse

__all__ = ["ATTRIBUTE", "RouteOptions", "idempotent", "route_options"]

#: The attribute ``@idempotent`` sets on the function (or class) it marks.
ATTRIBUTE = "__idempotency__"

F = TypeVar("F")
ResponseHook = Callable[["StoredResponse", "IdempotencyRequest"], "StoredResponse"]


class _Unset(enum.Enum):
    UNSET = enum.auto()


UNSET: Literal[_Unset.UNSET] = _Unset.UNSET


@dataclass(frozen=True, eq=False)
class RouteOptions:
    """What ``@idempotent(...)`` said about one endpoint: opted out (``enabled=False``), or
    opted in with ``overrides`` of the middleware's ``IdempotencyConfig`` fields.
    """

    enabled: bool
    overrides: Mapping[str, Any]

    def __repr__(self) -> str:
        if not self.enabled:
            return "@idempotent(enabled=False)"
        options = ", ".join(f"{name}={value!r}" for name, value in self.overrides.items())
        return f"@idempotent({options})"


@overload
def idempotent(func: F, /) -> F: ...


@overload
def idempotent(
    *,
    enabled: bool = True,
    require_key: bool | _Unset = UNSET,
    key_source: KeySource | _Unset = UNSET,
    methods: frozenset[str] | set[str] | tuple[str, ...] | list[str] | _Unset = UNSET,
    header_name: str | _Unset = UNSET,
    event_key_jmespath: str | _Unset | None = UNSET,
    payload_validation_jmespath: str | _Unset | None = UNSET,
    expires_after_seconds: int | _Unset = UNSET,
    conflict_wait_seconds: float | _Unset = UNSET,
    scope: Callable[[IdempotencyRequest], str] | _Unset | None = UNSET,
    store_server_errors: bool | _Unset = UNSET,
    transient_statuses: frozenset[int] | set[int] | tuple[int, ...] | _Unset = UNSET,
    max_request_body_bytes: int | _Unset = UNSET,
    response_hook: ResponseHook | _Unset | None = UNSET,
) -> Callable[[F], F]: ...


def idempotent(
    func: Any = None,
    /,
    *,
    enabled: bool = True,
    require_key: Any = UNSET,
    key_source: Any = UNSET,
    methods: Any = UNSET,
    header_name: Any = UNSET,
    event_key_jmespath: Any = UNSET,
    payload_validation_jmespath: Any = UNSET,
    expires_after_seconds: Any = UNSET,
    conflict_wait_seconds: Any = UNSET,
    scope: Any = UNSET,
    store_server_errors: Any = UNSET,
    transient_statuses: Any = UNSET,
    max_request_body_bytes: Any = UNSET,
    response_hook: Any = UNSET,
) -> Any:
    """Opt a route in, with options of its own, or out with ``enabled=False``.

    ``@idempotent`` (or ``@idempotent()``) makes the route idempotent with the middleware's
    config; each option given replaces that config's field for this route only. By default a
    decorated route covers its own methods that are not safe (all but GET, HEAD, OPTIONS and
    TRACE); ``methods`` chooses others. Undecorated routes follow the middleware's config
    (``methods``, ``include_paths``, ``exclude_paths``) as before.
    """
    given = {
        "require_key": require_key,
        "key_source": key_source,
        "methods": methods,
        "header_name": header_name,
        "event_key_jmespath": event_key_jmespath,
        "payload_validation_jmespath": payload_validation_jmespath,
        "expires_after_seconds": expires_after_seconds,
        "conflict_wait_seconds": conflict_wait_seconds,
        "scope": scope,
        "store_server_errors": store_server_errors,
        "transient_statuses": transient_statuses,
        "max_request_body_bytes": max_request_body_bytes,
        "response_hook": response_hook,
    }
    overrides = {name: value for name, value in given.items() if value is not UNSET}
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled: must be True or False, got {enabled!r}")
    if not enabled and overrides:
        raise ValueError(
            f"enabled: False opts the route out, so {', '.join(sorted(overrides))} would be "
            "ignored; remove them"
        )
    options = RouteOptions(enabled, MappingProxyType(overrides))

    def mark(target: F) -> F:
        if not callable(target):
            raise TypeError(f"@idempotent decorates an endpoint or a view, not {target!r}")
        try:
            setattr(target, ATTRIBUTE, options)
        except (AttributeError, TypeError) as exc:
            raise TypeError(
                f"@idempotent cannot mark {target!r}: decorate the function itself"
            ) from exc
        return target

    if func is None:
        return mark
    return mark(func)


def route_options(endpoint: object, method: str | None = None) -> RouteOptions | None:
    """The options ``@idempotent`` set on an endpoint; for a class-based endpoint (Starlette's
    ``HTTPEndpoint``, Flask's ``MethodView``), those of its ``method`` handler, else the class's.
    """
    if method is not None and isinstance(endpoint, type):
        handler = getattr(endpoint, method.lower(), None)
        options = getattr(handler, ATTRIBUTE, None)
        if isinstance(options, RouteOptions):
            return options
    options = getattr(endpoint, ATTRIBUTE, None)
    return options if isinstance(options, RouteOptions) else None
