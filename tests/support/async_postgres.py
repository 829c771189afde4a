"""A PostgresPersistenceLayer whose store calls all go through its native asyncio primitives
(:mod:`tests.support.loop_driven`): the suite checks the asyncio pool and statements.
"""

from __future__ import annotations

from idem_middleware.persistence.postgres import PostgresPersistenceLayer
from tests.support.loop_driven import LoopDriven


class AsyncDrivenPostgresLayer(LoopDriven, PostgresPersistenceLayer):
    """Every record primitive runs as its asyncio twin on ``loop_thread``."""

    def close(self) -> None:
        self.stop_loop()
        super().close()
