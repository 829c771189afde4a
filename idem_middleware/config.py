"""IdempotencyConfig: every option of the middleware, validated once at construction."""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import jmespath
import jmespath.exceptions

from idem_middleware.routes import translate

if TYPE_CHECKING:
    from idem_middleware.engine import IdempotencyEvent
    from idem_middleware.request import IdempotencyRequest
    from idem_middleware.responses import StoredResponse

KeySource = Literal["header", "body", "header_or_body"]
StoreErrorPolicy = Literal["reject", "passthrough"]

HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)

#: RFC 9110 section 7.6.1 hop-by-hop fields, plus fields that describe one particular
#: transmission (``date``, ``server``) or must never be handed to another client (``set-cookie``).
DEFAULT_REPLAY_EXCLUDED_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "date",
        "server",
        "set-cookie",
    }
)

#: Statuses that say "not now" rather than "done" (RFC 9110 408, RFC 8470 425, RFC 6585 429):
#: released like a 5xx, never stored, so the client's retry after its Retry-After runs the handler.
DEFAULT_TRANSIENT_STATUSES = frozenset({408, 425, 429})

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_KEY_SOURCES = ("header", "body", "header_or_body")
_STORE_ERROR_POLICIES = ("reject", "passthrough")
# Algorithms whose digest length must be chosen by the caller cannot name a stable key.
_VARIABLE_LENGTH_HASHES = frozenset({"shake_128", "shake_256"})


@dataclass(frozen=True, kw_only=True)
class IdempotencyConfig:
    """How requests are selected, keyed, fingerprinted, stored and replayed.

    The defaults are the safe common case: POST and PATCH on every path, key from the
    ``Idempotency-Key`` header, completed responses replayed for 24 hours, a 10 second lease on
    in-flight requests that the middleware renews while the handler runs (so a handler may run
    longer, and a crashed worker's key runs again within 10 s), a 409 at once for a duplicate of
    an in-flight request (``conflict_wait_seconds`` lets it wait for the replay instead).
    ``include_paths`` and ``exclude_paths`` take globs and route templates
    (:mod:`idem_middleware.routes`). Set ``scope`` whenever clients are not all the same
    principal: without it, a client that sends another client's key gets that client's stored
    response. ``response_hook(response, request)`` may adjust each replay before it is sent (a
    header, a redacted field); if it fails, the replay goes out as stored.
    Routes marked ``@idempotent`` get a copy with their own options (``dataclasses.replace``).
    """

    header_name: str = "Idempotency-Key"
    key_source: KeySource = "header"
    methods: frozenset[str] = frozenset({"POST", "PATCH"})
    include_paths: tuple[str, ...] | None = None
    exclude_paths: tuple[str, ...] = ()
    require_key: bool = False
    event_key_jmespath: str | None = None
    payload_validation_jmespath: str | None = None
    expires_after_seconds: int = 86_400
    in_progress_expires_after_seconds: int = 10
    conflict_wait_seconds: float = 0
    use_local_cache: bool = False
    local_cache_max_items: int = 1024
    hash_function: str = "sha256"
    key_prefix: str | None = None
    scope: Callable[[IdempotencyRequest], str] | None = None
    store_server_errors: bool = False
    transient_statuses: frozenset[int] = DEFAULT_TRANSIENT_STATUSES
    replay_header: str = "Idempotent-Replayed"
    replay_excluded_headers: frozenset[str] = DEFAULT_REPLAY_EXCLUDED_HEADERS
    max_request_body_bytes: int = 1_048_576
    max_stored_response_bytes: int | None = None
    on_store_error: StoreErrorPolicy = "reject"
    on_event: Callable[[IdempotencyEvent], None] | None = field(default=None, compare=False)
    response_hook: Callable[[StoredResponse, IdempotencyRequest], StoredResponse] | None = field(
        default=None, compare=False
    )

    def __post_init__(self) -> None:
        # Accept any iterable for the collection fields, but store immutable, normalised values
        # so that a config can be shared between threads and hashed.
        self._coerce("methods", frozenset(_members(self.methods, "methods")))
        self._coerce("exclude_paths", tuple(_members(self.exclude_paths, "exclude_paths")))
        if self.include_paths is not None:
            self._coerce("include_paths", tuple(_members(self.include_paths, "include_paths")))
        self._coerce(
            "transient_statuses", frozenset(_members(self.transient_statuses, "transient_statuses"))
        )
        headers = _members(self.replay_excluded_headers, "replay_excluded_headers")
        names = [header.lower() for header in headers if isinstance(header, str)]
        _require(
            len(names) == len(headers), "replay_excluded_headers", "must be header names (str)"
        )
        self._coerce("replay_excluded_headers", frozenset(names))
        self._validate()

    def _coerce(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)

    def _validate(self) -> None:
        _require(_is_token(self.header_name), "header_name", "must be an HTTP field name")
        _require(_is_token(self.replay_header), "replay_header", "must be an HTTP field name")
        _require(self.key_source in _KEY_SOURCES, "key_source", f"must be one of {_KEY_SOURCES}")
        for flag in ("require_key", "use_local_cache", "store_server_errors"):
            # A truthy string read from the environment ("false") must not turn an option on.
            value = getattr(self, flag)
            _require(isinstance(value, bool), flag, f"must be True or False, got {value!r}")
        _require(bool(self.methods), "methods", "must name at least one method")
        for method in self.methods:
            _require(
                method in HTTP_METHODS,
                "methods",
                f"{method!r} is not an upper-case HTTP method ({', '.join(sorted(HTTP_METHODS))})",
            )
        for name in ("include_paths", "exclude_paths"):
            patterns: Iterable[str] = getattr(self, name) or ()
            for pattern in patterns:
                _require(
                    isinstance(pattern, str) and pattern.startswith(("/", "*")),
                    name,
                    f"{pattern!r} must be a path glob or route template starting with '/' or '*'",
                )
                try:
                    re.compile(translate(pattern))
                except (ValueError, re.error) as exc:
                    raise ValueError(f"{name}: {exc}") from exc
        for name in ("event_key_jmespath", "payload_validation_jmespath"):
            expression = getattr(self, name)
            if expression is not None:
                _require(isinstance(expression, str), name, "must be a JMESPath expression")
                try:
                    jmespath.compile(expression)
                except jmespath.exceptions.JMESPathError as exc:
                    raise ValueError(f"{name}: invalid JMESPath expression: {exc}") from exc
        _require(
            self.event_key_jmespath is None or self.key_source != "header",
            "event_key_jmespath",
            'selects the body-hash key, so it needs key_source="body" or "header_or_body"; '
            'with key_source="header" it would be ignored',
        )
        _require_positive_int(self.expires_after_seconds, "expires_after_seconds")
        _require_positive_int(
            self.in_progress_expires_after_seconds, "in_progress_expires_after_seconds"
        )
        _require(
            self.expires_after_seconds >= self.in_progress_expires_after_seconds,
            "expires_after_seconds",
            f"{self.expires_after_seconds} is shorter than in_progress_expires_after_seconds "
            f"({self.in_progress_expires_after_seconds}): a record must outlive its lease, or a "
            "live request's key is taken over",
        )
        _require(
            isinstance(self.conflict_wait_seconds, int | float)
            and not isinstance(self.conflict_wait_seconds, bool)
            and math.isfinite(self.conflict_wait_seconds)
            and self.conflict_wait_seconds >= 0,
            "conflict_wait_seconds",
            f"must be a non-negative number of seconds, got {self.conflict_wait_seconds!r}",
        )
        _require(
            self.conflict_wait_seconds < self.expires_after_seconds,
            "conflict_wait_seconds",
            f"{self.conflict_wait_seconds} is not below expires_after_seconds "
            f"({self.expires_after_seconds}): the answer a duplicate waits for would expire first",
        )
        _require_positive_int(self.local_cache_max_items, "local_cache_max_items")
        _require_positive_int(self.max_request_body_bytes, "max_request_body_bytes")
        if self.max_stored_response_bytes is not None:
            _require_non_negative_int(self.max_stored_response_bytes, "max_stored_response_bytes")
        _require(
            self.hash_function in hashlib.algorithms_available
            and self.hash_function not in _VARIABLE_LENGTH_HASHES,
            "hash_function",
            f"{self.hash_function!r} is not a fixed-length hashlib algorithm",
        )
        if self.key_prefix is not None:
            _require(
                isinstance(self.key_prefix, str)
                and bool(self.key_prefix)
                and "#" not in self.key_prefix,
                "key_prefix",
                "must be a non-empty string without '#'",
            )
        for status in self.transient_statuses:
            _require(
                isinstance(status, int) and not isinstance(status, bool) and 100 <= status <= 599,
                "transient_statuses",
                f"{status!r} is not an HTTP status code (100-599)",
            )
        _require(self.scope is None or callable(self.scope), "scope", "must be callable")
        _require(self.on_event is None or callable(self.on_event), "on_event", "must be callable")
        _require(
            self.response_hook is None or callable(self.response_hook),
            "response_hook",
            "must be callable: (StoredResponse, IdempotencyRequest) -> StoredResponse",
        )
        _require(
            self.on_store_error in _STORE_ERROR_POLICIES,
            "on_store_error",
            f"must be one of {_STORE_ERROR_POLICIES}",
        )


def _members(value: object, name: str) -> list[object]:
    """The members of a collection option. A lone string or number is refused: iterating it
    (``"/orders"`` as ``"/"``, ``"o"``, ...) would silently configure something else.
    """
    if isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
        return list(value)
    hint = "" if value is None else f"; for one value write ({value!r},)"
    raise ValueError(f"{name}: expected a collection (tuple, list or set), got {value!r}{hint}")


def _is_token(value: object) -> bool:
    # fullmatch: "$" would let a final newline through ("Idempotency-Key\n").
    return isinstance(value, str) and _TOKEN.fullmatch(value) is not None


def _require(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{name}: {message}")


def _require_positive_int(value: object, name: str) -> None:
    _require(
        isinstance(value, int) and not isinstance(value, bool) and value > 0,
        name,
        f"must be a positive integer, got {value!r}",
    )


def _require_non_negative_int(value: object, name: str) -> None:
    _require(
        isinstance(value, int) and not isinstance(value, bool) and value >= 0,
        name,
        f"must be a non-negative integer, got {value!r}",
    )
