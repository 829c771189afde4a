"""The run log the harness's slow handler writes: which process started and ended which key."""

from __future__ import annotations

import time
from pathlib import Path


class RunLog:
    """The ``start``/``end`` lines ``POST /slow`` appends, per key, with the pid that ran it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def pids(self, event: str, key: str) -> list[int]:
        if not self.path.exists():
            return []
        return [
            int(pid)
            for line in self.path.read_text(encoding="utf-8").splitlines()
            for kind, logged_key, pid in [line.split(" ")]
            if kind == event and logged_key == key
        ]

    def wait_for_start(self, key: str, count: int = 1, timeout: float = 15) -> list[int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            starts = self.pids("start", key)
            if len(starts) >= count:
                return starts
            time.sleep(0.02)
        raise AssertionError(f"the handler of {key} did not start {count} time(s) in {timeout} s")
