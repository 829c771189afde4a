"""Which engine serves a request, when some endpoints carry ``@idempotent``.

Once per middleware, at startup (ASGI lifespan) or on the first request, the app's routes are
read - Starlette's and FastAPI's ``routes`` (``Mount`` included), Flask's ``url_map`` and
``view_functions`` - and every route becomes one alternative of a regex per method, in the order
the router tries them, each mapping to its target: the middleware's own engine for a route
without the decorator, a route's engine (its config, the shared persistence layer) for a
decorated one, nothing (pass through) for a route opted out. A request then costs one dict
lookup and one ``fullmatch``; an app without the decorator gets no table at all, so its
requests cost what they did before.

Routes added after the table is built (after the first request) are not seen.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from idem_middleware.config import HTTP_METHODS, IdempotencyConfig
from idem_middleware.decorator import RouteOptions, route_options
from idem_middleware.engine import IdempotencyEngine, _all_cases

__all__ = [
    "Endpoint",
    "RouteResolver",
    "RouteTable",
    "build_route_table",
    "discover_endpoints",
    "route_config",
]

logger = logging.getLogger("idem_middleware")

#: RFC 9110 section 9.2.1: methods a decorated route does not cover unless ``methods`` says so.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})

# How far down a chain of middleware (``.app``) and bound methods (``__self__``) to look for
# the app that has the routes.
_MAX_DEPTH = 64
_NAMED_GROUP = re.compile(r"\(\?P<[^>]+>")
_WERKZEUG_VARIABLE = re.compile(
    r"<(?:([a-zA-Z_][a-zA-Z0-9_]*)(?:\([^)]*\))?:)?([a-zA-Z_][a-zA-Z0-9_]*)>"
)


@dataclass(frozen=True)
class Endpoint:
    """One route as the router matches it."""

    #: Regex (for ``fullmatch``) of the paths it routes.
    pattern: str
    #: The methods it accepts; ``None``: any.
    methods: frozenset[str] | None
    #: Its path as OpenAPI writes it (``/orders/{order_id}``), for messages and documents.
    path: str
    #: The function or class that serves it, where ``@idempotent`` is looked for.
    endpoint: object

    def options(self, method: str) -> RouteOptions | None:
        return route_options(self.endpoint, method)

    def label(self, method: str | None = None) -> str:
        name = getattr(self.endpoint, "__qualname__", None) or repr(self.endpoint)
        return f"{method + ' ' if method else ''}{self.path} ({name})"


# Discovery ----------------------------------------------------------------------------------


def discover_endpoints(app: object) -> list[Endpoint] | None:
    """The routes of the app (or of the app under a chain of middleware), in the order its
    router tries them; ``None`` when no Starlette, FastAPI or Flask app is found.
    """
    node: object = app
    seen: set[int] = set()
    for _ in range(_MAX_DEPTH):
        if node is None or id(node) in seen:
            return None
        seen.add(id(node))
        if hasattr(node, "url_map") and hasattr(node, "view_functions"):
            return _flask_endpoints(node)
        routes = getattr(node, "routes", None)
        if isinstance(routes, list):
            return _starlette_endpoints(routes)
        # A bound method (Flask's ``app.wsgi_app``) or a middleware holding the next app.
        node = getattr(node, "__self__", None) or getattr(node, "app", None)
    return None


def _starlette_endpoints(routes: list[Any]) -> list[Endpoint] | None:
    try:
        from starlette.routing import Mount, Route, compile_path
    except ImportError:  # something else with a ``routes`` list
        return None

    def pattern(template: str) -> str:
        # Starlette's own regex (custom convertors included), its groups made anonymous.
        regex = compile_path(template)[0].pattern
        return _NAMED_GROUP.sub("(?:", regex.removeprefix("^").removesuffix("$"))

    def walk(routes: Iterable[Any], prefix: str, prefix_path: str) -> Iterator[Endpoint]:
        for route in routes:
            if isinstance(route, Route):
                yield Endpoint(
                    prefix + pattern(route.path),
                    frozenset(route.methods) if route.methods else None,
                    prefix_path + route.path_format,
                    route.endpoint,
                )
            elif isinstance(route, Mount):
                mount = prefix + pattern(route.path)
                yield from walk(route.routes, mount, prefix_path + route.path_format)
                # A Mount takes every path under it, even those its own routes do not route.
                yield Endpoint(mount + "/.*", None, prefix_path + route.path_format, None)
            else:
                # FastAPI's included routers (kept lazily since FastAPI 0.1xx), through the
                # iterator its own OpenAPI generator uses.
                for context in _fastapi_route_contexts(route):
                    if isinstance(context.original_route, Mount):
                        mount = prefix + pattern(context.path)
                        yield from walk(context.routes, mount, prefix_path + context.path_format)
                        yield Endpoint(mount + "/.*", None, prefix_path + context.path_format, None)
                    elif isinstance(context.original_route, Route):
                        methods = context.methods
                        yield Endpoint(
                            prefix + pattern(context.path),
                            frozenset(methods) if methods else None,
                            prefix_path + context.path_format,
                            context.endpoint,
                        )
            # Host and WebSocketRoute: not told apart by an HTTP path; requests they route
            # follow the middleware's config.

    return list(walk(routes, "", ""))


def _fastapi_route_contexts(route: object) -> Iterator[Any]:
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # not FastAPI, or a FastAPI that flattens included routers
        return iter(())
    return iter_route_contexts([route])  # type: ignore[list-item]


def _flask_endpoints(app: Any) -> list[Endpoint]:
    url_map = app.url_map
    view_functions = app.view_functions
    endpoints = []
    for rule in sorted(url_map.iter_rules(), key=_werkzeug_order):
        view = view_functions.get(rule.endpoint)
        # ``MethodView.as_view`` returns a function; the methods are on its ``view_class``.
        target = getattr(view, "view_class", view)
        endpoints.append(
            Endpoint(
                _werkzeug_pattern(rule, url_map),
                frozenset(rule.methods) if rule.methods else None,
                _WERKZEUG_VARIABLE.sub(lambda m: "{" + m[2] + "}", rule.rule),
                target if isinstance(target, type) else view,
            )
        )
    return endpoints


def _werkzeug_pattern(rule: Any, url_map: Any) -> str:
    converters = getattr(rule, "_converters", {})
    out: list[str] = []
    position = 0
    for variable in _WERKZEUG_VARIABLE.finditer(rule.rule):
        out.append(re.escape(rule.rule[position : variable.start()]))
        converter = converters.get(variable[2]) or url_map.converters.get(variable[1] or "default")
        out.append(f"(?:{getattr(converter, 'regex', '[^/]+')})")
        position = variable.end()
    out.append(re.escape(rule.rule[position:]))
    return "".join(out)


def _werkzeug_order(rule: Any) -> tuple[int, ...]:
    # Werkzeug's matcher prefers, segment by segment, a static part to a variable one, and a
    # variable to a path that spans segments; registration order does not decide.
    key = []
    for segment in rule.rule.split("/"):
        if "<path:" in segment:
            key.append(2)
        else:
            key.append(1 if "<" in segment else 0)
    return tuple(key)


# Per-route configs --------------------------------------------------------------------------


def route_config(
    base: IdempotencyConfig, options: RouteOptions, endpoint: Endpoint, method: str
) -> IdempotencyConfig | None:
    """The config of ``method`` on a decorated route; ``None`` when the route does not cover
    that method (opted out, or a method the decorator leaves alone).

    Raises :class:`ValueError` naming the route and the field when an option is invalid.
    """
    if not options.enabled:
        return None
    overrides = dict(options.overrides)
    if "methods" not in overrides:
        if endpoint.methods is None:
            overrides["methods"] = base.methods
        else:
            overrides["methods"] = frozenset(endpoint.methods - SAFE_METHODS)
    try:
        config = dataclasses.replace(base, include_paths=None, exclude_paths=(), **overrides)
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"{options!r} on {endpoint.label()}: {exc}") from exc
    return config if method.upper() in config.methods else None


# The table ----------------------------------------------------------------------------------


class RouteTable:
    """Resolves a request to the engine that serves it: per method, the request path's first
    segment picks the regex of the routes that can match it (those whose first segment is that
    literal, and those whose first segment is a variable), so a request pays one small match
    however many routes the app has.
    """

    def __init__(self, default: IdempotencyEngine, by_method: dict[str, _MethodRoutes]) -> None:
        self.default = default
        self._by_method = by_method

    def engine_for(self, method: str, path: str) -> IdempotencyEngine | None:
        """The engine of the route that serves ``method path``; ``None``: pass it through."""
        routes = self._by_method.get(method)
        if routes is None:
            return self.default
        end = path.find("/", 1)
        regex, targets = routes.by_segment.get(path[1:end] if end > 0 else path[1:], routes.rest)
        match = regex.fullmatch(path)
        if match is None:
            return self.default
        return targets[match.lastindex or 0]


Compiled = tuple[re.Pattern[str], list[IdempotencyEngine | None]]


@dataclass(frozen=True)
class _MethodRoutes:
    #: By literal first segment: the routes that may match a path starting with it.
    by_segment: dict[str, Compiled]
    #: For any other first segment: the routes whose first segment is a variable.
    rest: Compiled


def _compile(
    routes: list[tuple[Endpoint, IdempotencyEngine | None]], default: IdempotencyEngine
) -> Compiled:
    """One regex of ``routes``, in order, and the target of each of its groups."""
    alternatives: list[str] = []
    targets: list[IdempotencyEngine | None] = [default]  # group 0: never a route's
    last_special = 0
    for endpoint, chosen in routes:
        alternatives.append(f"({endpoint.pattern})")
        targets.append(chosen)
        # Groups inside the route's own regex take the numbers after its group.
        targets.extend([default] * re.compile(endpoint.pattern).groups)
        if chosen is not default:
            last_special = len(alternatives)
    # Routes after the last special one resolve to the default, as no match does.
    regex = re.compile("|".join(alternatives[:last_special]) or "(?!)", re.DOTALL)
    return regex, targets[: regex.groups + 1]


def _first_segment(template: str) -> str | None:
    """The literal first segment of every path a route template matches; ``None`` when it
    holds a variable.
    """
    if not template.startswith("/"):
        return None  # a Mount at the root: it may take any path
    segment = template[1:].partition("/")[0]
    return None if "{" in segment else segment


def build_route_table(endpoints: list[Endpoint], default: IdempotencyEngine) -> RouteTable | None:
    """The table of ``endpoints``; ``None`` when none is decorated (nothing to resolve).

    Raises :class:`ValueError` (or :class:`TypeError`) for invalid per-route options.
    """
    base = default.config
    engines: dict[tuple[int, frozenset[str]], IdempotencyEngine] = {}

    def target(endpoint: Endpoint, method: str) -> IdempotencyEngine | None:
        options = endpoint.options(method)
        if options is None:
            return default
        config = route_config(base, options, endpoint, method)
        if config is None:
            # Not covered here; the same as the default when the default never covers it.
            return default if method not in base.methods else None
        # One engine per options and methods, shared by the routes that share them.
        cache_key = (id(options), config.methods)
        engine = engines.get(cache_key)
        if engine is None:
            engine = engines[cache_key] = default.for_route(config)
        return engine

    special: set[str] = set()
    for endpoint in endpoints:
        if endpoint.endpoint is not None:
            for method in endpoint.methods or HTTP_METHODS:
                if target(endpoint, method) is not default:  # validates the options too
                    special.add(method)
    by_method: dict[str, _MethodRoutes] = {}
    for method in sorted(special):
        routes = [
            (endpoint, default if endpoint.endpoint is None else target(endpoint, method))
            for endpoint in endpoints
            if endpoint.methods is None or method in endpoint.methods
        ]
        firsts = [_first_segment(endpoint.path) for endpoint, _ in routes]
        paired = list(zip(routes, firsts, strict=True))
        entry = _MethodRoutes(
            by_segment={
                segment: _compile([r for r, f in paired if f in (segment, None)], default)
                for segment in {f for f in firsts if f is not None}
            },
            rest=_compile([r for r, f in paired if f is None], default),
        )
        for spelling in _all_cases(frozenset({method})):
            by_method[spelling] = entry
    return RouteTable(default, by_method) if by_method else None


class RouteResolver:
    """The route table of one middleware, built once: at startup (:meth:`resolve`, from the
    ASGI lifespan or the Flask extension) or, failing that, on the first request.

    ``table`` is what a request reads: a table that builds itself until it is built, then the
    built table, or ``None`` when no route carries ``@idempotent`` (nothing to resolve).
    """

    def __init__(self, app: object, engine: IdempotencyEngine) -> None:
        self._app = app
        self._engine = engine
        self._lock = threading.Lock()
        self._resolved = False
        self.table: RouteTable | None = _PendingTable(engine, self.resolve)

    def resolve(self) -> RouteTable | None:
        """Build the table (once; safe from many threads) and return it.

        Raises :class:`ValueError` (or :class:`TypeError`) naming the route and the field when
        a route's options are invalid; the table stays unbuilt, so every request fails alike.
        """
        with self._lock:
            if not self._resolved:
                endpoints = discover_endpoints(self._app)
                if endpoints is None:
                    # Once, at startup: a middleware that hides the app (no ``.app``) hides its
                    # decorators too.
                    logger.info(
                        "no Starlette, FastAPI or Flask routes found under the idempotency "
                        "middleware (in %r): every request follows its config, and @idempotent "
                        "options, if any, are not applied",
                        self._app,
                    )
                table = None if endpoints is None else build_route_table(endpoints, self._engine)
                self.table = table
                self._resolved = True
        return self.table


class _PendingTable(RouteTable):
    """Stands in for the table until it is built: the first request builds it."""

    def __init__(
        self, default: IdempotencyEngine, resolve: Callable[[], RouteTable | None]
    ) -> None:
        super().__init__(default, {})
        self._resolve = resolve

    def engine_for(self, method: str, path: str) -> IdempotencyEngine | None:
        table = self._resolve()
        return self.default if table is None else table.engine_for(method, path)
