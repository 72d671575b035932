"""The one clock that all shift timing goes through, so tests can run a whole shift in seconds
(ManualClock below moves only when told) while the service runs on real time."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards; for intervals and deadlines."""

    def now(self) -> datetime:
        """Wall-clock time in UTC; for records and events."""

    async def sleep_until(self, deadline: float) -> None:
        """Returns once monotonic() >= deadline. Cancellable."""


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def now(self) -> datetime:
        return datetime.now(UTC)

    async def sleep_until(self, deadline: float) -> None:
        await asyncio.sleep(max(0.0, deadline - time.monotonic()))


class ManualClock:
    """A Clock whose time moves only by `advance`, so a whole shift runs in seconds: for the
    tests and for benchmarks that simulate hours (server/tools/takeover_bench.py). Its bound
    methods `now` and `monotonic` serve code that takes a plain callable."""

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
