"""Where a request's idempotency key and payload fingerprint come from.

The key names the record; the fingerprint says whether a retry is the *same* request. Raw client
keys never leave this module unhashed: the persistence layer only sees the key material, which it
hashes together with the scope and prefix.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from typing import Any

import http_sf
import jmespath
import jmespath.exceptions
import jmespath.parser

from idem_middleware.config import IdempotencyConfig
from idem_middleware.exceptions import IdempotencyKeyError, IdempotencyKeyInvalidError
from idem_middleware.request import IdempotencyRequest

MAX_KEY_LENGTH = 255

Hasher = Callable[[bytes], "hashlib._Hash"]


def hasher(name: str) -> Hasher:
    """The hashlib constructor for ``name``, resolved once (``hashlib.new`` is slower per call)."""
    constructor = getattr(hashlib, name, None)
    if callable(constructor):
        return constructor  # type: ignore[no-any-return]
    return lambda data: hashlib.new(name, data)


def parse_key(values: list[str]) -> str:
    """The key named by the ``Idempotency-Key`` field values of one request.

    The field is an RFC 9651 sf-string (``"abc"``); bare values such as UUIDs are not valid
    sf-items, so a bare value is accepted as a lenient extension and names the same key as its
    quoted form. Parameters on a quoted item are ignored, as RFC 9651 asks of unknown
    parameters; a bare value is the key whole, ";" included: cutting it there would make
    ``order;1`` and ``order;2`` one key, and replay one request's answer to the other.
    """
    if len(values) != 1:
        raise IdempotencyKeyInvalidError("the Idempotency-Key header must appear exactly once")
    common = _PLAIN_BARE_KEY.fullmatch(values[0])
    if common is not None:  # what nearly every client sends: every check below in one match
        return common[1]
    value = values[0].strip(" \t")
    if value.startswith('"'):
        try:
            item = http_sf.parse(value.encode("latin-1"), tltype="item")
        except (http_sf.StructuredFieldError, UnicodeEncodeError) as exc:
            raise IdempotencyKeyInvalidError(
                "the Idempotency-Key header is not a valid quoted string"
            ) from exc
        key = item[0] if isinstance(item, tuple) else item
        if not isinstance(key, str):  # pragma: no cover - a leading quote always parses as a string
            raise IdempotencyKeyInvalidError("the Idempotency-Key header must be a string")
    else:
        key = value
        if not _is_bare_key(key):
            raise IdempotencyKeyInvalidError(
                "an unquoted Idempotency-Key must be printable ASCII without spaces, "
                "quotes or commas"
            )
    if not 1 <= len(key) <= MAX_KEY_LENGTH:
        raise IdempotencyKeyInvalidError(
            f"the Idempotency-Key must be 1 to {MAX_KEY_LENGTH} characters long"
        )
    if not key.isascii() or not key.isprintable():
        raise IdempotencyKeyInvalidError("the Idempotency-Key must be printable ASCII")
    return key


def header_key_material(key: str) -> str:
    """The key material of a header key (as :func:`parse_key` returns it), for the persistence
    layer's ``build_idempotency_key``; the CLI uses it to find a client's record.
    """
    return "header:" + key


# Visible ASCII (0x21-0x7E) but the double quote and the comma; one regex match per request is
# several times cheaper than testing each character in Python.
_BARE_KEY = re.compile(r"[\x21\x23-\x2b\x2d-\x7e]*")


def _is_bare_key(key: str) -> bool:
    return _BARE_KEY.fullmatch(key) is not None


# A bare key of 1 to 255 characters, blanks around it allowed: the value parse_key accepts as
# it is, decided by one match.
_PLAIN_BARE_KEY = re.compile(r"[ \t]*([\x21\x23-\x2b\x2d-\x7e]{1,255})[ \t]*")


class KeyDeriver:
    """Derives key material and fingerprints for one config; built once per middleware."""

    def __init__(self, config: IdempotencyConfig) -> None:
        self.config = config
        self._hash = hasher(config.hash_function)
        self._event_key = _compile(config.event_key_jmespath)
        self._payload_selection = _compile(config.payload_validation_jmespath)
        #: The ``detail`` of the 400 ``idempotency_key_missing`` answer, in the terms of the
        #: configured key source.
        self.missing_key_detail = _missing_key_detail(config)

    def key_material(self, request: IdempotencyRequest) -> str | None:
        """What names this request's record, or ``None`` when the request carries no key.

        A body-derived key is scoped to the method, route path and query, as Powertools scopes
        keys to the function: the same body sent to two routes is two operations. A selection
        that is null, an empty string, or a list or object of nulls only is no key (as in
        Powertools), so requests lacking the selected fields never share one record.

        Raises :class:`IdempotencyKeyInvalidError` for a malformed header and
        :class:`IdempotencyKeyError` when a JMESPath is configured and the body is not JSON or
        cannot be evaluated.
        """
        source = self.config.key_source
        if source != "body":
            values = request.headers.getlist(self.config.header_name)
            if values:
                return header_key_material(parse_key(values))
            if source == "header":
                return None
        if self._event_key is not None:
            selected = _select(self._event_key, request.body)
            if _selects_nothing(selected):
                return None
            content = _canonical_json(selected)
        elif request.body:
            content = request.body
        else:
            return None
        method = request.method.upper().encode("ascii")
        path = request.path.encode("utf-8", "surrogateescape")
        digest = self._hash(b"\0".join((method, path, b"")))
        digest.update(content)
        if request.query_string:
            # The fingerprint covers the query, so two requests that differ in it are two
            # operations: one key would answer the second with a 422 it has no key to change.
            # Appended after the fixed-length hex digest, it cannot be confused with a body, and
            # keys of requests without a query stay as they were.
            return f"body:{digest.hexdigest()}?{request.query_string}"
        return "body:" + digest.hexdigest()

    def fingerprint(self, request: IdempotencyRequest) -> str:
        """A hash of what must not change between a request and its retries: method, path,
        query and body, or only the body's selection when ``payload_validation_jmespath`` is set.
        """
        # The hash of method NUL path NUL query NUL body, in as few calls as possible: stored
        # fingerprints must not change, and each update has a fixed cost. Methods are covered
        # case-insensitively (werkzeug routes "post" to a POST view): "post" is "POST".
        method = request.method.upper().encode("ascii")
        path = request.path.encode("utf-8", "surrogateescape")
        if self._payload_selection is not None:
            selected = _canonical_json(_select(self._payload_selection, request.body))
            # The query joins only when there is one, so that records stored before it was part
            # of this fingerprint keep validating for requests without one. Canonical JSON
            # has no raw NUL, so a query never reads as part of a selection.
            if request.query_string:
                query = request.query_string.encode("latin-1", "replace")
                return self._hash(b"\0".join((method, path, query, selected))).hexdigest()
            return self._hash(b"\0".join((method, path, selected))).hexdigest()
        query = request.query_string.encode("latin-1", "replace")
        digest = self._hash(b"\0".join((method, path, query, b"")))
        digest.update(request.body)  # a body may be a megabyte: hashed in place, not copied
        return digest.hexdigest()


def _missing_key_detail(config: IdempotencyConfig) -> str:
    header = f"an {config.header_name} header"
    if config.event_key_jmespath is not None:
        body = f"a JSON body in which {config.event_key_jmespath!r} selects a value"
    else:
        body = "a request body"
    if config.key_source == "header":
        return f"this endpoint requires {header}"
    if config.key_source == "body":
        return f"this endpoint derives its idempotency key from {body}, and none was sent"
    return f"this endpoint requires {header} or {body} to derive its idempotency key from"


def _compile(expression: str | None) -> jmespath.parser.ParsedResult | None:
    return None if expression is None else jmespath.compile(expression)


def _select(expression: jmespath.parser.ParsedResult, body: bytes) -> Any:
    """What ``expression`` selects in the JSON ``body``; an empty body selects nothing."""
    if not body:
        return None
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise IdempotencyKeyError(
            "the request body must be JSON: the idempotency key or fingerprint is selected from it"
        ) from exc
    except RecursionError as exc:
        raise _too_deep() from exc
    try:
        return expression.search(document)
    except RecursionError as exc:
        raise _too_deep() from exc
    except (jmespath.exceptions.JMESPathError, ArithmeticError, TypeError, ValueError) as exc:
        # The expression was validated at startup, so what fails now is the client's data: a
        # function given a type it does not take (length(5)), a sum that overflows.
        raise IdempotencyKeyError(
            f"the idempotency key or fingerprint cannot be selected from this body: {exc}"
        ) from exc


def _selects_nothing(selected: Any) -> bool:
    if isinstance(selected, list):
        return all(item is None for item in selected)
    if isinstance(selected, dict):
        return all(value is None for value in selected.values())
    return selected is None or selected == ""


def _too_deep() -> IdempotencyKeyError:
    return IdempotencyKeyError("the request body is nested too deeply")


def _canonical_json(value: Any) -> bytes:
    try:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except RecursionError as exc:
        raise _too_deep() from exc
    # json.loads accepts lone surrogates ("\ud800"), which strict UTF-8 cannot encode; every
    # other string encodes exactly as before.
    return text.encode("utf-8", "surrogatepass")
