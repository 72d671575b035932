"""The one clock that all shift timing goes through, so tests can run a whole shift in seconds
(tests/clock.py has a manual one) while the service runs on real time."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
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
