"""A loopback port that refuses connections for as long as a test needs it to.

``tooling.processes.free_port`` names a port nothing listens on *now*: another process (a
server of a test session running side by side) may bind it a moment later, and a test about an
unreachable store would then reach that server. A socket bound to the port and never listening
keeps it: connections are refused (RST), and no other process can bind it meanwhile (Linux lets
a second socket share the port only when both set SO_REUSEADDR; this one does not).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator


@contextlib.contextmanager
def refusing_port() -> Iterator[int]:
    """A 127.0.0.1 port where every connection is refused until the block ends."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])
