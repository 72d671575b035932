"""The test clock: every test that needs time to pass moves this one."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta


class ManualClock:
    """Implements server.runtime.clock.Clock; time moves only when the test says, so a whole
    shift runs in seconds. Its bound methods `now` and `monotonic` serve code that takes a plain
    callable."""

    def __init__(self, start: datetime = datetime(2026, 11, 2, 8, 0, tzinfo=UTC)) -> None:
        self._elapsed = 0.0
        self._start = start
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def monotonic(self) -> float:
        return self._elapsed

    def now(self) -> datetime:
        return self._start + timedelta(seconds=self._elapsed)

    async def sleep_until(self, deadline: float) -> None:
        if deadline <= self._elapsed:
            return
        wake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (deadline, wake)
        self._sleepers.append(entry)
        try:
            await wake
        finally:
            if entry in self._sleepers:
                self._sleepers.remove(entry)

    def advance(self, by: float | timedelta) -> None:
        """Moves both clocks on by `by` (seconds or a timedelta) and wakes whoever's deadline
        has come. Call it on the event loop the sleepers wait on, if any."""
        seconds = by.total_seconds() if isinstance(by, timedelta) else by
        if seconds < 0:
            raise ValueError("a monotonic clock never goes back")
        self._elapsed += seconds
        for deadline, wake in list(self._sleepers):
            if deadline <= self._elapsed and not wake.done():
                wake.set_result(None)
