"""Lease ids: unique per claim, within a process, across threads, and in a forked child."""

from __future__ import annotations

import os
import re
import threading

import pytest

from idem_middleware.persistence import InMemoryPersistenceLayer
from idem_middleware.persistence.lease_ids import new_lease_id


def test_each_claim_holds_a_lease_id_of_its_own() -> None:
    layer = InMemoryPersistenceLayer()
    ids = {layer.save_inprogress(f"k-{i}", "h").lease_id for i in range(1000)}
    assert len(ids) == 1000
    assert all(re.fullmatch(r"[0-9a-f]{32,}", lease_id or "") for lease_id in ids)


def test_threads_never_draw_the_same_id() -> None:
    drawn: list[list[str]] = [[] for _ in range(8)]

    def draw(into: list[str]) -> None:
        into.extend(new_lease_id() for _ in range(5000))

    threads = [threading.Thread(target=draw, args=(into,)) for into in drawn]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [lease_id for into in drawn for lease_id in into]
    assert len(set(every)) == len(every) == 40000


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() only")
def test_a_forked_child_draws_other_ids_than_its_parent() -> None:
    """A child of fork() starts with its parent's memory, counter included: without a prefix of
    its own, its first ids would be the ones its parent draws next.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.write(write_end, " ".join(new_lease_id() for _ in range(3)).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        child = pipe.read().split()
    os.waitpid(pid, 0)
    parent = [new_lease_id() for _ in range(3)]
    assert len(child) == 3
    assert not set(child) & set(parent)
    assert {lease_id[:24] for lease_id in child} != {lease_id[:24] for lease_id in parent}
