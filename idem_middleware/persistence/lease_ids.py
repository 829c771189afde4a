"""Lease ids: a token per claim that no other claim, in any process, ever draws.

A lease id is a random prefix drawn once per process, then a counter: unique within the process
by the counter, and across processes and restarts by the prefix, 96 random bits (drawn again in
a child after ``fork``, which would otherwise repeat its parent's ids). Two processes share a
prefix with a probability of about n² / 2⁹⁷ for n processes ever started: about 10⁻¹⁷ for a
million. A lease is fenced on its id and its end (``in_progress_expiry_timestamp``) together, so
a repeated id would matter only for two claims of the same key whose leases end in the same
millisecond as well.

Lease ids need to be unique, not unpredictable: they never leave the server (a client sees
neither the record nor its lease). One ``os.urandom`` call per claim, as a random token per
claim took, cost a system call on every new key.
"""

from __future__ import annotations

import itertools
import os
import secrets

_prefix = ""
_counter = itertools.count()


def _draw_prefix() -> None:
    global _prefix, _counter
    _prefix = secrets.token_hex(12)
    _counter = itertools.count()


def new_lease_id() -> str:
    """A lease id no other claim has or will have: 24 hex digits, then at least 8 more."""
    # next() on itertools.count is atomic: two threads never get the same number.
    return f"{_prefix}{next(_counter):08x}"


_draw_prefix()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_draw_prefix)
