"""The size policy, once for both adapters: how large a covered request body may be, and how
much of a response body is stored.

A request body is buffered before its key is claimed, so it is bounded by
``max_request_body_bytes`` (a declared Content-Length over it is refused before reading). A
response body is stored up to ``max_stored_response_bytes`` (default: the persistence layer's own
limit); past it the response still streams through and its record keeps status and headers only.
"""

from __future__ import annotations

from dataclasses import dataclass

from idem_middleware.config import IdempotencyConfig


@dataclass(frozen=True, slots=True)
class SizeLimits:
    """The two limits of one middleware, resolved once at construction."""

    max_request_body: int
    max_stored_response: int

    @classmethod
    def resolve(cls, config: IdempotencyConfig, layer_max_response_bytes: int) -> SizeLimits:
        stored = config.max_stored_response_bytes
        return cls(
            max_request_body=config.max_request_body_bytes,
            max_stored_response=layer_max_response_bytes if stored is None else stored,
        )

    def request_body_too_large(self, size: int) -> bool:
        """Whether a request body of ``size`` bytes (declared or read so far) is refused."""
        return size > self.max_request_body

    def stores_body(self, size: int) -> bool:
        """Whether a response body of ``size`` bytes is kept in the record."""
        return size <= self.max_stored_response

    def response_copy(self) -> ResponseCopy:
        return ResponseCopy(self.max_stored_response)


class ResponseCopy:
    """A response body as the app produces it: counted, and copied while it fits the
    stored-size limit, so a streamed response is stored whole or not at all.
    """

    __slots__ = ("_chunks", "_limit", "size")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._chunks: list[bytes] | None = []
        #: Bytes of body produced so far, kept or not.
        self.size = 0

    def add(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self._chunks is not None:
            if self.size > self._limit:
                self._chunks = None
            else:
                self._chunks.append(chunk)

    def give_up(self) -> None:
        """Keep no body: what was produced will not be stored whole (the stream was cut)."""
        self._chunks = None

    @property
    def body(self) -> bytes | None:
        """The body to store, or ``None`` when it is over the limit or was given up."""
        return None if self._chunks is None else b"".join(self._chunks)
