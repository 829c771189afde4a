"""The neutral stored response, its serialised form, and RFC 9457 problem responses."""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from idem_middleware.exceptions import IdempotencyHTTPError

PROBLEM_CONTENT_TYPE = "application/problem+json"
BODY_OMITTED_HEADER = "Idempotent-Body-Omitted"

# What a server can send: a three-digit status, field names that are RFC 9110 tokens, values of
# latin-1 text without CR, LF or NUL (which would split or cut the response).
_FIELD_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(r"[^\r\n\x00\u0100-\U0010ffff]*")

# Statuses that never carry content and must not be sent a Content-Length (RFC 9110 8.6).
_BODILESS_STATUSES = frozenset({204, 304})


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """A complete HTTP response as captured from the app and replayed to retries.

    Header names keep the case the app sent; values are ``str`` decoded as latin-1, so any byte an
    app can put in a header survives the round trip. ``reason`` is the WSGI status line's reason
    phrase as the app wrote it (``"CREATED"``); ``None`` under ASGI, which has none.
    """

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    body_omitted: bool = False
    reason: str | None = None

    def without_body(self) -> StoredResponse:
        """The record kept when the body is over the stored-size limit."""
        return StoredResponse(self.status, self.headers, b"", body_omitted=True, reason=self.reason)

    def for_replay(self, replay_header: str) -> StoredResponse:
        """The response a retry gets: stored fields, a fresh Content-Length, the replay marker."""
        # Built field by field rather than with dataclasses.replace, which costs a replay more
        # than everything else here together.
        # Content-Length keeps the name and place the app gave it, so a replay is byte-exact.
        length: str | None = None
        if self.status not in _BODILESS_STATUSES and not 100 <= self.status < 200:
            length = str(len(self.body))
        headers = []
        for header in self.headers:
            if header[0].lower() != "content-length":
                headers.append(header)
            elif length is not None:
                headers.append((header[0], length))
                length = None
        if length is not None:
            headers.append(("content-length", length))
        headers.append((replay_header, "true"))
        if self.body_omitted:
            headers.append((BODY_OMITTED_HEADER, "true"))
        return StoredResponse(
            self.status, tuple(headers), self.body, self.body_omitted, self.reason
        )

    def with_content_length(self) -> StoredResponse:
        """This response with a Content-Length that matches its body (after a
        ``response_hook`` changed the body); itself when it already does.
        """
        if self.status in _BODILESS_STATUSES or 100 <= self.status < 200:
            return self
        length = str(len(self.body))
        lengths = [value for name, value in self.headers if name.lower() == "content-length"]
        if lengths == [length]:
            return self
        headers = [header for header in self.headers if header[0].lower() != "content-length"]
        headers.append(("content-length", length))
        return StoredResponse(
            self.status, tuple(headers), self.body, self.body_omitted, self.reason
        )

    def encode(self) -> str:
        """Serialise to the JSON string kept in a record's ``data`` attribute.

        UTF-8 bodies (nearly every API response) are stored as text so a record can be read in the
        DynamoDB console; anything else is base64.
        """
        document: dict[str, object] = {"status": self.status, "headers": self.headers}
        try:
            document["body"] = self.body.decode("utf-8")
        except UnicodeDecodeError:
            document["body_b64"] = base64.b64encode(self.body).decode("ascii")
        if self.body_omitted:
            document["body_omitted"] = True
        if self.reason is not None:
            document["reason"] = self.reason
        return json.dumps(document, ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def decode(cls, data: str) -> StoredResponse:
        """Inverse of :meth:`encode`; ``ValueError`` when the data is not a stored response."""
        try:
            document = json.loads(data)
            if "body_b64" in document:
                body = base64.b64decode(document["body_b64"], validate=True)
            else:
                body = document.get("body", "").encode("utf-8")
            reason = document.get("reason")  # absent from records stored before it was kept
            response = cls(
                status=int(document["status"]),
                headers=tuple((str(name), str(value)) for name, value in document["headers"]),
                body=body,
                body_omitted=bool(document.get("body_omitted", False)),
                reason=None if reason is None else str(reason),
            )
            status = document["status"]
        except (KeyError, TypeError, AttributeError, binascii.Error, json.JSONDecodeError) as exc:
            raise ValueError(f"not a stored response: {exc}") from exc
        # A corrupted or forged record must be a store error, not a 500 when the server refuses
        # to send it, nor a split response replayed to a client.
        if type(status) is not int or not 100 <= status <= 999:
            raise ValueError(f"not a stored response: status {status!r}")
        for name, value in response.headers:
            if _FIELD_NAME.fullmatch(name) is None or _FIELD_VALUE.fullmatch(value) is None:
                raise ValueError(f"not a stored response: header {name!r}")
        if response.reason is not None and _FIELD_VALUE.fullmatch(response.reason) is None:
            raise ValueError("not a stored response: reason phrase")
        return response


def problem_response(error: IdempotencyHTTPError) -> StoredResponse:
    """An RFC 9457 ``application/problem+json`` response for an error a client can act on."""
    body = json.dumps(
        {
            "type": f"urn:idem-middleware:problem:{error.code}",
            "title": error.title,
            "status": error.status,
            "detail": error.detail,
            "code": error.code,
        },
        separators=(",", ":"),
    ).encode("utf-8")
    headers = [("content-type", PROBLEM_CONTENT_TYPE), ("content-length", str(len(body)))]
    if error.retry_after is not None:
        headers.append(("retry-after", str(error.retry_after)))
    return StoredResponse(status=error.status, headers=tuple(headers), body=body)
