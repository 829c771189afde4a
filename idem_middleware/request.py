"""The neutral view of an HTTP request that both adapters build and the engine decides on."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


class Headers(Mapping[str, str]):
    """Read-only, case-insensitive request headers that keep repeated fields.

    ``headers["x"]`` and ``get`` return the first value; ``getlist`` returns all of them, which is
    how a repeated ``Idempotency-Key`` is told apart from a single one.
    """

    __slots__ = ("_items",)

    def __init__(self, items: Sequence[tuple[str, str]] = ()) -> None:
        self._items = [(name.lower(), value) for name, value in items]

    @classmethod
    def from_lowercase(cls, items: list[tuple[str, str]]) -> Headers:
        """Wrap pairs whose names are already lower-case (as ASGI guarantees) without copying."""
        headers = cls.__new__(cls)
        headers._items = items
        return headers

    def getlist(self, name: str) -> list[str]:
        name = name.lower()
        return [value for key, value in self._items if key == name]

    def __getitem__(self, name: str) -> str:
        name = name.lower()
        for key, value in self._items:
            if key == name:
                return value
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys(key for key, _ in self._items))

    def __len__(self) -> int:
        return len({key for key, _ in self._items})

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._items!r})"


@dataclass(frozen=True, slots=True)
class IdempotencyRequest:
    """What the engine needs to know about a request, independent of ASGI or WSGI.

    ``raw`` is the ASGI scope or the WSGI environ, for a ``scope`` callable that needs more
    (an authenticated user set by another middleware, say).
    """

    method: str
    path: str
    query_string: str
    headers: Headers
    body: bytes
    raw: Any = None
