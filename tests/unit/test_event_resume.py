"""A subscriber resuming from the start while another replica stores the very first event
is not refused as expired: the resume check reads the newest id (which waits for a write in
progress) before the oldest kept, so the oldest is read with that write's event in it."""

from __future__ import annotations

import asyncio
from datetime import datetime

from server.config import StoreLimits
from server.runtime.store_pool import StorePool
from server.shifts.event_bus import StoreEventBus
from tests.clock import ManualClock


class OneWriteInProgress:
    """An events table, empty but for one event a writer has taken id 1 for and commits
    once a reader waits for it (as latest_event_id waits for the writer lock)."""

    def __init__(self) -> None:
        self.committed: list[int] = []

    def append_event(
        self, agent_id: str, payload: bytes, at: datetime, keep_after: datetime
    ) -> int:
        raise AssertionError("the check writes nothing")

    def events_after(self, after_id: int, limit: int) -> list[tuple[int, bytes]]:
        return [(i, b"{}") for i in self.committed if i > after_id][:limit]

    def latest_event_id(self) -> int:
        if not self.committed:
            self.committed.append(1)  # the write in progress ends before the answer
        return 1

    def oldest_event_id(self) -> int | None:
        return min(self.committed, default=None)


def test_a_resume_from_the_start_while_the_first_event_commits_is_accepted() -> None:
    async def check() -> None:
        pool = StorePool(StoreLimits())
        try:
            bus = StoreEventBus(OneWriteInProgress(), pool, None, ManualClock(), 3600.0)
            await bus.check_resumable(0)  # before: EventsExpiredError ("no longer kept")
        finally:
            pool.shutdown()

    asyncio.run(check())
