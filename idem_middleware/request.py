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

    __slots__ = ("_items", "_raw")

    def __init__(self, items: Sequence[tuple[str, str]] = ()) -> None:
        self._items: list[tuple[str, str]] | None = [(name.lower(), value) for name, value in items]
        self._raw: Sequence[tuple[bytes, bytes]] = ()

    @classmethod
    def from_asgi(cls, raw: Sequence[tuple[bytes, bytes]]) -> Headers:
        """Wrap an ASGI scope's ``headers`` (lower-case names, latin-1 bytes) as they are.

        Most requests are asked for one header, the idempotency key: lookups compare bytes and
        decode only what they return, and the whole list is decoded only if it is iterated.
        """
        headers = cls.__new__(cls)
        headers._items = None
        headers._raw = raw
        return headers

    def _decoded(self) -> list[tuple[str, str]]:
        if self._items is None:
            self._items = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in self._raw]
        return self._items

    def getlist(self, name: str) -> list[str]:
        name = name.lower()
        if self._items is None:
            raw_name = _raw_name(name)
            return [value.decode("latin-1") for key, value in self._raw if key == raw_name]
        return [value for key, value in self._items if key == name]

    def __getitem__(self, name: str) -> str:
        name = name.lower()
        if self._items is None:
            raw_name = _raw_name(name)
            for raw_key, raw_value in self._raw:
                if raw_key == raw_name:
                    return raw_value.decode("latin-1")
            raise KeyError(name)
        for key, value in self._items:
            if key == name:
                return value
        raise KeyError(name)

    def __contains__(self, name: object) -> bool:
        # Asked of every covered request (is there a key?): spared Mapping's KeyError round trip,
        # and written as loops, which cost less than any() over a generator.
        if not isinstance(name, str):
            return False
        name = name.lower()
        if self._items is None:
            raw_name = _raw_name(name)
            for raw_key, _ in self._raw:  # noqa: SIM110
                if raw_key == raw_name:
                    return True
            return False
        for key, _ in self._items:  # noqa: SIM110
            if key == name:
                return True
        return False

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys(key for key, _ in self._decoded()))

    def __len__(self) -> int:
        return len({key for key, _ in self._decoded()})

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._decoded()!r})"


def _raw_name(name: str) -> bytes | None:
    """``name`` as ASGI spells header names, or ``None`` when no header can have it."""
    try:
        return name.encode("latin-1")
    except UnicodeEncodeError:
        return None


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
