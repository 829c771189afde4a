"""``from_url``: a persistence layer from one URL, for settings held in an environment variable.

========================================================== ======================================
``memory://``                                              :class:`InMemoryPersistenceLayer`
``sqlite:///relative/path.sqlite3``                        :class:`SQLitePersistenceLayer`
``sqlite:////absolute/path.sqlite3``                       (three slashes, then the path, as in
                                                           SQLAlchemy: a fourth makes it absolute;
                                                           ``%3F`` stands for ``?``, ``%23`` for
                                                           ``#``, ``%25`` for ``%``)
``redis://[user:password@]host[:port][/db]``, ``rediss://`` :class:`RedisPersistenceLayer` (the URL
                                                           goes to redis-py as it is)
``dynamodb://TABLE?region=…&endpoint_url=…&profile=…``     :class:`DynamoDBPersistenceLayer` (and
                                                           ``connect_timeout``, ``read_timeout``,
                                                           ``max_attempts`` for its client)
``postgresql://[user[:password]@][host][:port]/dbname``    :class:`PostgresPersistenceLayer` (the
(or ``postgres://``)                                       URL goes to psycopg as it is, libpq
                                                           parameters such as ``sslmode`` too)
========================================================== ======================================

Query parameters name constructor options (``sqlite:///f.sqlite3?table_name=records``,
``dynamodb://t?key_attr=pk&sort_key_attr=sk``); keyword arguments of :func:`from_url` are
passed to the constructor too, for what a URL cannot carry (a ``boto_config``, a ``client``).
A URL that cannot be used raises :class:`ValueError` saying why; a backend whose optional
dependency is missing raises :class:`ImportError` naming the extra to install. Backends are
imported only when their scheme is used, so ``memory://`` and ``sqlite://`` need neither boto3
nor redis.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import SplitResult, parse_qsl, unquote, urlsplit, urlunsplit

from idem_middleware.persistence.base import BasePersistenceLayer

__all__ = ["from_url", "redacted"]

Converter = Callable[[str], Any]
#: A layer class: its constructor's options differ from one backend to the next.
LayerClass = Callable[..., BasePersistenceLayer]


def redacted(url: str) -> str:
    """The URL with its password replaced by ``***``: for messages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:  # unparseable: show no part that could be a secret
        return url.partition("://")[0] + "://…" if "@" in url else url
    if "@" not in parts.netloc:
        return url
    userinfo, _, host = parts.netloc.rpartition("@")
    if ":" not in userinfo:
        return url
    username = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{username}:***@{host}"))


@dataclass(frozen=True)
class _Scheme:
    """How one URL scheme becomes a layer: ``build(layer_class, url_parts, options)``.

    The query parameters named in ``parameters`` (name -> converter) are converted and joined
    to the caller's keyword arguments in ``options`` before ``build`` runs; any other parameter
    is refused. ``module`` is imported only when the scheme is used.
    """

    module: str
    layer: str
    build: Callable[[LayerClass, SplitResult, dict[str, Any]], BasePersistenceLayer]
    parameters: Mapping[str, Converter] = field(default_factory=dict)
    extra: str | None = None  # the pip extra its dependency comes with
    dependency: str | None = None


def _memory(layer: LayerClass, parts: SplitResult, options: dict[str, Any]) -> BasePersistenceLayer:
    if parts.netloc or parts.path not in ("", "/"):
        raise ValueError("memory:// takes no host nor path")
    return layer(**options)


def _sqlite(layer: LayerClass, parts: SplitResult, options: dict[str, Any]) -> BasePersistenceLayer:
    if parts.netloc:
        raise ValueError(
            f"sqlite:// has no host ({parts.netloc!r}): write sqlite:///relative/path or "
            "sqlite:////absolute/path"
        )
    # urlsplit keeps the slash after the empty host: "sqlite:///a.db" has path "/a.db".
    path = unquote(parts.path[1:])
    if not path:
        raise ValueError("sqlite:// needs a file: sqlite:///relative/path or sqlite:////abs/path")
    return layer(path, **options)


def _redis(layer: LayerClass, parts: SplitResult, options: dict[str, Any]) -> BasePersistenceLayer:
    if not parts.hostname:
        raise ValueError(f"{parts.scheme}:// needs a host: {parts.scheme}://localhost:6379/0")
    # redis-py reads its own query parameters (socket_timeout, …): the URL goes as it is.
    return layer(urlunsplit(parts), **options)


def _postgres(
    layer: LayerClass, parts: SplitResult, options: dict[str, Any]
) -> BasePersistenceLayer:
    # No host is libpq's default (a local socket), and urlunsplit would drop the empty
    # authority ("postgresql:///db" -> "postgresql:/db"): the URL is put back together by hand.
    url = f"{parts.scheme}://{parts.netloc}{parts.path}"
    return layer(f"{url}?{parts.query}" if parts.query else url, **options)


def _dynamodb(
    layer: LayerClass, parts: SplitResult, options: dict[str, Any]
) -> BasePersistenceLayer:
    table = parts.netloc
    if not table:
        raise ValueError("dynamodb:// needs a table name: dynamodb://TABLE?region=eu-west-1")
    if parts.path not in ("", "/"):
        raise ValueError(f"dynamodb://{table}: unexpected path {parts.path!r} after the table")
    client_settings = {name: options.pop(name) for name in _CLIENT_PARAMETERS if name in options}
    if "boto3_client" in options:
        if client_settings:
            raise ValueError(
                f"dynamodb://{table}: {', '.join(client_settings)} configure the client from_url "
                "builds; with boto3_client, configure that client instead"
            )
        return layer(table, **options)
    import boto3
    import botocore.config
    import botocore.exceptions

    profile = client_settings.get("profile")
    timeouts: dict[str, Any] = {
        name: client_settings[name]
        for name in ("connect_timeout", "read_timeout")
        if name in client_settings
    }
    if "max_attempts" in client_settings:
        attempts = client_settings["max_attempts"]
        timeouts["retries"] = {"mode": "standard", "total_max_attempts": attempts}
    config = botocore.config.Config(**timeouts)
    given_config = options.pop("boto_config", None)
    if given_config is not None:
        config = given_config.merge(config)
    try:
        session = options.pop("boto3_session", None) or boto3.session.Session(profile_name=profile)
        client = session.client(
            "dynamodb",
            region_name=client_settings.get("region"),
            endpoint_url=client_settings.get("endpoint_url"),
            config=config,
        )
    except botocore.exceptions.ProfileNotFound:
        raise ValueError(f"dynamodb://{table}: no AWS profile {profile!r}") from None
    except botocore.exceptions.NoRegionError:
        raise ValueError(
            f"dynamodb://{table}: no AWS region: add ?region=…, or set AWS_DEFAULT_REGION"
        ) from None
    except ValueError as exc:  # botocore's own: an endpoint_url that is not a URL, …
        raise ValueError(f"dynamodb://{table}: {exc}") from None
    return layer(table, boto3_client=client, **options)


def _number(text: str) -> float:
    number = float(text)
    if not number >= 0:
        raise ValueError(text)
    return number


def _count(text: str) -> int:
    number = int(text)
    if number < 1:
        raise ValueError(text)
    return number


#: Query parameters of dynamodb:// that configure the boto3 client rather than the layer.
_CLIENT_PARAMETERS: dict[str, Converter] = {
    "region": str,
    "endpoint_url": str,
    "profile": str,
    "connect_timeout": _number,
    "read_timeout": _number,
    "max_attempts": _count,
}


_MEMORY_PARAMETERS: dict[str, Converter] = {
    "max_items": _count,
    "sweep_interval_seconds": _number,
}
_SQLITE_PARAMETERS: dict[str, Converter] = {
    "table_name": str,
    "busy_timeout_seconds": _number,
    "purge_interval_seconds": _number,
    "synchronous": str.upper,
}
_DYNAMODB_PARAMETERS: dict[str, Converter] = {
    **_CLIENT_PARAMETERS,
    **{
        name: str
        for name in (
            "key_attr",
            "static_pk_value",
            "sort_key_attr",
            "expiry_attr",
            "in_progress_expiry_attr",
            "status_attr",
            "data_attr",
            "validation_key_attr",
        )
    },
}

_PERSISTENCE = "idem_middleware.persistence"
#: One line per scheme. A backend whose constructor takes the URL itself (Redis, PostgreSQL)
#: gets it whole, its query included: the client library reads it.
_SCHEMES: dict[str, _Scheme] = {
    "memory": _Scheme(
        f"{_PERSISTENCE}.memory", "InMemoryPersistenceLayer", _memory, _MEMORY_PARAMETERS
    ),
    "sqlite": _Scheme(
        f"{_PERSISTENCE}.sqlite", "SQLitePersistenceLayer", _sqlite, _SQLITE_PARAMETERS
    ),
    "redis": _Scheme(
        f"{_PERSISTENCE}.redis", "RedisPersistenceLayer", _redis, {}, "redis", "redis-py"
    ),
    "rediss": _Scheme(
        f"{_PERSISTENCE}.redis", "RedisPersistenceLayer", _redis, {}, "redis", "redis-py"
    ),
    "dynamodb": _Scheme(
        f"{_PERSISTENCE}.dynamodb",
        "DynamoDBPersistenceLayer",
        _dynamodb,
        _DYNAMODB_PARAMETERS,
        "dynamodb",
        "boto3",
    ),
    "postgresql": _Scheme(
        f"{_PERSISTENCE}.postgres", "PostgresPersistenceLayer", _postgres, {}, "postgres", "psycopg"
    ),
    "postgres": _Scheme(
        f"{_PERSISTENCE}.postgres", "PostgresPersistenceLayer", _postgres, {}, "postgres", "psycopg"
    ),
}


def from_url(url: str, **options: Any) -> BasePersistenceLayer:
    """The persistence layer ``url`` names (see the module's table), built with ``options``.

    >>> from_url("memory://")  # doctest: +ELLIPSIS
    <idem_middleware.persistence.memory.InMemoryPersistenceLayer object at ...>
    """
    if not isinstance(url, str):
        raise TypeError(f"from_url needs a URL string, got {type(url).__name__}")
    shown = redacted(url)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parsed lazily; a bad port raises ValueError here
    except ValueError as exc:
        raise ValueError(f"invalid store URL {shown!r}: {exc}") from None
    scheme_name = parts.scheme.lower()
    known = ", ".join(f"{name}://" for name in _SCHEMES)
    if not scheme_name or "://" not in url:
        raise ValueError(f"not a store URL: {shown!r} (expected one of {known})")
    scheme = _SCHEMES.get(scheme_name)
    if scheme is None:
        raise ValueError(f"unknown store URL scheme {parts.scheme!r} in {shown!r} (known: {known})")
    if parts.fragment:
        raise ValueError(f"invalid store URL {shown!r}: unexpected fragment #{parts.fragment}")
    if scheme.parameters:
        options = {**_parameters(scheme, parts, shown, options), **options}
        parts = parts._replace(query="")
    try:
        module = importlib.import_module(scheme.module)
    except ImportError as exc:
        if scheme.extra is None or (exc.name or "").startswith("idem_middleware"):
            raise
        raise ImportError(
            f"the {scheme_name}:// store needs {scheme.dependency}: "
            f"pip install 'idem-middleware[{scheme.extra}]'",
            name=exc.name,
        ) from exc
    layer: LayerClass = getattr(module, scheme.layer)
    try:
        return scheme.build(layer, parts._replace(scheme=scheme_name), options)
    except ValueError as exc:
        message = str(exc)
        if message.startswith(f"{scheme_name}:"):
            raise
        raise ValueError(f"store URL {shown!r}: {message}") from None


def _parameters(
    scheme: _Scheme, parts: SplitResult, shown: str, options: Mapping[str, Any]
) -> dict[str, Any]:
    """The URL's query parameters as constructor options, each known, given once, converted."""
    parameters: dict[str, Any] = {}
    for name, text in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
        convert = scheme.parameters.get(name)
        if convert is None:
            raise ValueError(
                f"store URL {shown!r}: unknown parameter {name!r} "
                f"(known: {', '.join(sorted(scheme.parameters))})"
            )
        if name in parameters:
            raise ValueError(f"store URL {shown!r}: parameter {name!r} given twice")
        if name in options:
            raise ValueError(
                f"store URL {shown!r}: {name!r} given both in the URL and as an option"
            )
        if not text:
            raise ValueError(f"store URL {shown!r}: parameter {name!r} is empty")
        try:
            parameters[name] = convert(text)
        except ValueError:
            raise ValueError(f"store URL {shown!r}: invalid {name}={text!r}") from None
    return parameters
