"""A RedisPersistenceLayer whose store calls all go through its native asyncio primitives
(:mod:`tests.support.loop_driven`): the suite checks the asyncio client, the scripts registered
on it and the batching of their calls.
"""

from __future__ import annotations

from idem_middleware.persistence.redis import RedisPersistenceLayer
from tests.support.loop_driven import LoopDriven


class AsyncDrivenRedisLayer(LoopDriven, RedisPersistenceLayer):
    """Every record primitive runs as its asyncio twin on ``loop_thread``."""

    def close(self) -> None:
        self.stop_loop()
        self.client.close()
