"""The bounded inference pool: work runs off the event loop, and a full queue is refused."""

from __future__ import annotations

import asyncio
import threading

import pytest

from server.config import InferenceLimits
from server.errors import CapacityError
from server.runtime.inference import InferencePool


def test_work_beyond_the_bound_is_refused_at_once() -> None:
    async def scenario() -> None:
        pool = InferencePool(InferenceLimits(workers=1, threads=1, max_queued=1))
        release = threading.Event()
        loop_thread = threading.get_ident()
        ran_on: list[int] = []

        def blocked() -> int:
            ran_on.append(threading.get_ident())
            release.wait(10)
            return 1

        running = asyncio.ensure_future(pool.run(blocked))
        queued = asyncio.ensure_future(pool.run(blocked))
        await asyncio.sleep(0.05)
        with pytest.raises(CapacityError, match="busy"):
            await pool.run(blocked)
        release.set()
        assert await running + await queued == 2
        assert loop_thread not in ran_on
        # Capacity is given back once the work is done.
        assert await pool.run(lambda: 3) == 3
        pool.shutdown()

    asyncio.run(scenario())


def test_a_burst_gets_exactly_the_bound_and_the_rest_are_refused() -> None:
    async def scenario() -> None:
        pool = InferencePool(InferenceLimits(workers=2, threads=1, max_queued=3))
        release = threading.Event()
        burst = [asyncio.ensure_future(pool.run(lambda: release.wait(10))) for _ in range(12)]
        await asyncio.sleep(0.05)
        release.set()
        results = await asyncio.gather(*burst, return_exceptions=True)
        # Two running plus three queued; the other seven refused at once, not left waiting.
        assert sum(r is True for r in results) == 5
        assert sum(isinstance(r, CapacityError) for r in results) == 7
        pool.shutdown()

    asyncio.run(scenario())
