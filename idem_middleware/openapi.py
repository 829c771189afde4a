"""Publish the middleware's contract in an OpenAPI document (FastAPI's ``/openapi.json``).

A middleware is invisible to FastAPI's schema generator, so one explicit call documents it::

    app.add_middleware(IdempotencyMiddleware, persistence_layer=layer, config=config)
    document_idempotency(app, config)

Every operation the middleware covers (the config's ``methods``, ``include_paths`` and
``exclude_paths``, or an endpoint's ``@idempotent`` options, which win) then shows the
``Idempotency-Key`` header parameter (required when the operation's ``require_key`` is), the
``Idempotent-Replayed`` response header, and the 400 / 409 / 413 / 422 / 503 answers with an
RFC 9457 ``application/problem+json`` schema. Under 422 the package's problem and FastAPI's own
validation error stay apart: each keeps its media type (``application/problem+json`` and
``application/json``) with its own schema.

Explicit rather than automatic: ``add_middleware`` never sees the FastAPI app (only the ASGI app
inside it), and the call takes the same config object the middleware was given, so the document
cannot drift from what is enforced. :func:`add_idempotency_to_openapi` does the same to any
OpenAPI document (a Starlette ``SchemaGenerator``'s, a hand-written one).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

from idem_middleware.config import HTTP_METHODS, IdempotencyConfig
from idem_middleware.exceptions import IdempotencyHTTPError
from idem_middleware.responses import PROBLEM_CONTENT_TYPE
from idem_middleware.route_table import discover_endpoints, route_config
from idem_middleware.routes import compile_paths

__all__ = [
    "PROBLEM_SCHEMA_NAME",
    "add_idempotency_to_openapi",
    "document_idempotency",
    "route_configs",
]

PROBLEM_SCHEMA_NAME = "IdempotencyProblem"
_SCHEMA_REF = f"#/components/schemas/{PROBLEM_SCHEMA_NAME}"
_OPERATION_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
_PATH_PARAM = re.compile(r"\{([^}/]+)\}")
_UUID = "00000000-0000-4000-8000-000000000000"

OpenAPIDocument = dict[str, Any]


class _OpenAPIApp(Protocol):
    """What :func:`document_idempotency` needs of a FastAPI app."""

    openapi_schema: dict[str, Any] | None

    def openapi(self) -> dict[str, Any]: ...


def document_idempotency(app: _OpenAPIApp, config: IdempotencyConfig | None = None) -> None:
    """Make ``app.openapi()`` (and so ``/openapi.json`` and Swagger UI) document idempotency
    for every operation ``config`` covers. Call it once, with the middleware's config.
    """
    config = config or IdempotencyConfig()
    generate: Callable[[], dict[str, Any]] = app.openapi
    # The document already extended: FastAPI caches it, and regenerates it when its
    # ``openapi_schema`` is reset. Held (not its id) so that a new one is never mistaken for it.
    documented: list[dict[str, Any]] = []

    def openapi() -> dict[str, Any]:
        document = generate()
        if not documented or documented[0] is not document:
            add_idempotency_to_openapi(document, config, routes=route_configs(app, config))
            documented[:] = [document]
        return document

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented extension point


def add_idempotency_to_openapi(
    document: OpenAPIDocument,
    config: IdempotencyConfig | None = None,
    *,
    routes: Mapping[tuple[str, str], IdempotencyConfig | None] | None = None,
) -> OpenAPIDocument:
    """Extend ``document`` in place (and return it) with what the middleware adds to each
    operation ``config`` covers. Applying it twice changes nothing more.

    ``routes`` (see :func:`route_configs`) gives the operations of ``@idempotent`` routes, by
    OpenAPI path and lower-case method: their own config, or ``None`` for one not covered.
    """
    config = config or IdempotencyConfig()
    routes = routes or {}
    covered = False
    for path, item in document.get("paths", {}).items():
        for method in _OPERATION_METHODS:
            operation = item.get(method)
            if operation is None:
                continue
            if (path, method) in routes:
                operation_config = routes[path, method]
                if operation_config is None:
                    continue
            elif covers(config, method, _sample_path(path, item, method)):
                operation_config = config
            else:
                continue
            covered = True
            _document_operation(operation, operation_config)
    if covered:
        components = document.setdefault("components", {})
        components.setdefault("schemas", {})[PROBLEM_SCHEMA_NAME] = _problem_schema()
    return document


def route_configs(
    app: object, config: IdempotencyConfig
) -> dict[tuple[str, str], IdempotencyConfig | None]:
    """The config of each operation of an ``@idempotent`` route of ``app``, by OpenAPI path and
    lower-case method (``None``: not covered), as the middleware resolves them.

    Raises :class:`ValueError` naming the route and the field when its options are invalid.
    """
    found: dict[tuple[str, str], IdempotencyConfig | None] = {}
    for endpoint in discover_endpoints(app) or ():
        if endpoint.endpoint is None:
            continue
        for method in sorted(endpoint.methods or HTTP_METHODS):
            options = endpoint.options(method)
            if options is not None:
                # The first route of a path and method is the one the router serves.
                found.setdefault(
                    (endpoint.path, method.lower()),
                    route_config(config, options, endpoint, method),
                )
    return found


def covers(config: IdempotencyConfig, method: str, path: str) -> bool:
    """Whether the middleware handles ``method path`` (as ``IdempotencyEngine.covers`` does)."""
    if method.upper() not in config.methods:
        return False
    if config.include_paths is not None and not compile_paths(config.include_paths).fullmatch(path):
        return False
    return not compile_paths(config.exclude_paths).fullmatch(path)


def _sample_path(template: str, item: dict[str, Any], method: str) -> str:
    """A concrete path the template routes, each parameter replaced by a value of its declared
    type, so that globs and route templates with converters (``{id:int}``) both match it.
    """
    declared = {
        parameter.get("name"): parameter.get("schema", {})
        for parameter in [*item.get("parameters", []), *item[method].get("parameters", [])]
        if isinstance(parameter, dict) and parameter.get("in") == "path"
    }
    return _PATH_PARAM.sub(lambda match: _sample_value(declared.get(match[1], {})), template)


def _sample_value(schema: dict[str, Any]) -> str:
    types = {schema.get("type"), *(s.get("type") for s in schema.get("anyOf", []))}
    if "integer" in types:
        return "1"
    if "number" in types:
        return "1.5"
    if schema.get("format") == "uuid":
        return _UUID
    return "sample"


# One operation ------------------------------------------------------------------------------


def _document_operation(operation: dict[str, Any], config: IdempotencyConfig) -> None:
    responses: dict[str, Any] = operation.setdefault("responses", {})
    # The app's own answers below 500 are stored and replayed: they may carry the marker.
    for status, response in responses.items():
        if _replayable(status, config) and isinstance(response, dict) and not _ours(response):
            response.setdefault("headers", {})[config.replay_header] = {
                "description": "`true` when this is the stored response of an earlier request "
                "with the same idempotency key, replayed byte for byte; absent otherwise.",
                "schema": {"type": "string", "enum": ["true"]},
            }
    if config.key_source != "body":
        _add_key_parameter(operation, config)
    for code, errors in _problems_by_status(config).items():
        _add_problem_response(responses, code, errors)


def _replayable(status: str, config: IdempotencyConfig) -> bool:
    if status.isdigit():
        code = int(status)
        return (code < 500 or config.store_server_errors) and code not in config.transient_statuses
    # "2XX"-style ranges; "default" (anything else) is not claimed to be replayed.
    replayed_ranges = "12345" if config.store_server_errors else "1234"
    return len(status) == 3 and status[0] in replayed_ranges


def _ours(response: dict[str, Any]) -> bool:
    """Whether only this module documents this response (a problem, never replayed)."""
    content = response.get("content", {})
    return list(content) == [PROBLEM_CONTENT_TYPE] and content[PROBLEM_CONTENT_TYPE].get(
        "schema"
    ) == {"$ref": _SCHEMA_REF}


def _add_key_parameter(operation: dict[str, Any], config: IdempotencyConfig) -> None:
    parameters: list[Any] = operation.setdefault("parameters", [])
    name = config.header_name.lower()
    if any(
        isinstance(p, dict) and p.get("in") == "header" and str(p.get("name")).lower() == name
        for p in parameters
    ):
        return
    if config.key_source == "header_or_body":
        when = "Without it, the key is a hash of the request body."
    elif config.require_key:
        when = "Required: a request without it is refused with 400 `idempotency_key_missing`."
    else:
        when = "Without it, the request is not deduplicated."
    parameters.append(
        {
            "name": config.header_name,
            "in": "header",
            "required": config.require_key and config.key_source == "header",
            "description": "A unique key chosen by the client (a UUID) for this operation: "
            "a retry with the same key and the same request gets the first response back "
            f"instead of running again. {when}",
            "schema": {"type": "string", "minLength": 1, "maxLength": 255},
            "example": "8e03978e-40d5-43e8-bc93-6894a57f9324",
        }
    )


def _add_problem_response(
    responses: dict[str, Any], status: int, errors: list[type[IdempotencyHTTPError]]
) -> None:
    codes = ", ".join(f"`{error.code}`" for error in errors)
    summary = "; ".join(error.title for error in errors)
    media: dict[str, Any] = {
        "schema": {"$ref": _SCHEMA_REF},
        "examples": {
            error.code: {"summary": error.title, "value": _example(error)} for error in errors
        },
    }
    response = responses.setdefault(str(status), {"description": ""})
    content: dict[str, Any] = response.setdefault("content", {})
    existing = content.get(PROBLEM_CONTENT_TYPE)
    if existing is not None and existing.get("schema") not in (None, media["schema"]):
        # The app answers this status with problem+json of its own too: either may come.
        media["schema"] = {"oneOf": [existing["schema"], {"$ref": _SCHEMA_REF}]}
    content[PROBLEM_CONTENT_TYPE] = media
    ours = f"Idempotency ({PROBLEM_CONTENT_TYPE}, code {codes}): {summary}."
    description = response.get("description", "")
    if ours not in description:
        response["description"] = f"{description} | {ours}" if description else ours
    if any(error.retry_after is not None for error in errors):
        response.setdefault("headers", {})["Retry-After"] = {
            "description": "Seconds to wait before retrying.",
            "schema": {"type": "integer", "minimum": 0},
        }


def _problems_by_status(config: IdempotencyConfig) -> dict[int, list[type[IdempotencyHTTPError]]]:
    """The problems this config can answer a covered request with, by status."""
    by_status: dict[int, list[type[IdempotencyHTTPError]]] = {}
    for error in _http_errors():
        if error.code == "idempotency_key_missing" and not config.require_key:
            continue
        if error.code == "idempotency_key_invalid" and config.key_source == "body":
            continue
        if error.code == "request_body_invalid" and not (
            config.event_key_jmespath or config.payload_validation_jmespath
        ):
            continue  # the body is parsed only to select a key or a fingerprint
        if error.status == 503 and config.on_store_error == "passthrough":
            continue
        by_status.setdefault(error.status, []).append(error)
    return dict(sorted(by_status.items()))


def _http_errors() -> Iterator[type[IdempotencyHTTPError]]:
    pending = list(IdempotencyHTTPError.__subclasses__())
    while pending:
        error = pending.pop(0)
        pending.extend(error.__subclasses__())
        yield error


def _example(error: type[IdempotencyHTTPError]) -> dict[str, Any]:
    return {
        "type": f"urn:idem-middleware:problem:{error.code}",
        "title": error.title,
        "status": error.status,
        "detail": "What went wrong, for a human.",
        "code": error.code,
    }


def _problem_schema() -> dict[str, Any]:
    codes = sorted({error.code for error in _http_errors()})
    return {
        "title": PROBLEM_SCHEMA_NAME,
        "type": "object",
        "description": "An RFC 9457 problem detail sent by the idempotency middleware; "
        "`code` is stable, for programs.",
        "required": ["type", "title", "status", "detail", "code"],
        "properties": {
            "type": {"type": "string", "format": "uri-reference"},
            "title": {"type": "string"},
            "status": {"type": "integer", "minimum": 400, "maximum": 599},
            "detail": {"type": "string"},
            "code": {"type": "string", "enum": codes},
        },
    }
