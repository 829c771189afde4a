"""The in-memory store's records add nothing to what the garbage collector walks.

Each full collection walks every object the collector tracks. A store that kept its records as
objects (a ``DataRecord`` and a ``StoredResponse`` each) made every full collection of a busy
server walk all of them: tens of milliseconds with some ten thousand records, the long tail of
the latencies under load (BENCHMARKS.md). Records kept as tuples of strings, numbers and bytes
are untracked by the first collection that sees them.
"""

from __future__ import annotations

import gc

from idem_middleware.persistence import DataRecord, InMemoryPersistenceLayer
from idem_middleware.persistence.record import STATUS_COMPLETED, STATUS_INPROGRESS
from idem_middleware.responses import StoredResponse

RECORDS = 2000


def _tracked() -> int:
    # A tuple is untracked once the tuples in it are (its headers): a record may take the
    # collector a second pass.
    gc.collect()
    gc.collect()
    return len(gc.get_objects())


def test_completed_records_are_not_tracked_by_the_garbage_collector() -> None:
    layer = InMemoryPersistenceLayer()
    before = _tracked()
    for i in range(RECORDS):
        lease = layer.save_inprogress(f"k-{i}", "h")
        response = StoredResponse(
            201, (("content-type", "application/json"), ("x-i", str(i))), b'{"id": %d}' % i
        )
        layer.save_success(lease, response)
    grown = _tracked() - before
    assert layer.record_count == RECORDS
    # Objects kept each tracked two objects per record; rows a collection has yet to untrack (a
    # few percent) are allowed.
    assert grown < RECORDS / 4, f"{grown} objects tracked for {RECORDS} records"


def test_records_read_back_as_they_were_written() -> None:
    layer = InMemoryPersistenceLayer()
    response = StoredResponse(201, (("Content-Type", "text/plain"),), b"ok", reason="Created")
    lease = layer.save_inprogress("k", "h")
    completed = layer.save_success(lease, response)
    read = layer.get_record("k")
    assert read is not completed  # a copy: nothing handed out shares state with the store
    assert (read.status, read.expiry_timestamp, read.in_progress_expiry_timestamp) == (
        STATUS_COMPLETED,
        completed.expiry_timestamp,
        lease.in_progress_expiry_timestamp,
    )
    assert (read.payload_hash, read.lease_id, read.response) == ("h", lease.lease_id, response)
    # A record given in its serialised form (as a store reads one back) keeps that form.
    layer._records["old"] = DataRecord(
        "old", STATUS_INPROGRESS, 2**40, 2**50, response_data=response.encode(), payload_hash="p"
    )
    old = layer.get_record("old")
    assert old.response_data == response.encode()
    assert old.response == response
    assert list(layer._records) == ["k", "old"]
    del layer._records["old"]
    assert layer.record_count == 1
