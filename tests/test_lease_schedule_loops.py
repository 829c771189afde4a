"""The lease schedule of an event loop does not outlive the loop."""

from __future__ import annotations

import asyncio
import gc

from idem_middleware import lease


def test_a_finished_event_loop_is_not_kept_alive_by_its_lease_schedule() -> None:
    async def schedule_renewals() -> None:
        lease._LoopSchedule.of(asyncio.get_running_loop())

    gc.collect()
    before = len(lease._SCHEDULES)
    for _ in range(3):
        asyncio.run(schedule_renewals())
    gc.collect()
    assert len(lease._SCHEDULES) == before
