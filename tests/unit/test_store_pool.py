"""The store's pool: work runs on its own threads, never on the event loop, in the caller's
context, and a burst waits its turn instead of being refused."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading

from server.config import StoreLimits
from server.runtime.store_pool import StorePool

_request: contextvars.ContextVar[str] = contextvars.ContextVar("request")


def test_a_burst_beyond_the_threads_waits_and_all_of_it_runs_off_the_loop() -> None:
    async def scenario() -> tuple[list[int], set[int], int]:
        pool = StorePool(StoreLimits(workers=2))
        release = threading.Event()
        ran_on: set[int] = set()

        def store_call(number: int) -> int:
            ran_on.add(threading.get_ident())
            release.wait(10)
            return number

        calls = [functools.partial(store_call, n) for n in range(20)]
        burst = [asyncio.ensure_future(pool.run(call)) for call in calls]
        await asyncio.sleep(0.05)
        release.set()
        results = await asyncio.gather(*burst)
        pool.shutdown()
        return results, ran_on, threading.get_ident()

    results, ran_on, loop_thread = asyncio.run(scenario())
    assert results == list(range(20))
    assert loop_thread not in ran_on
    assert len(ran_on) <= 2


def test_work_sees_the_callers_context() -> None:
    async def scenario() -> str:
        pool = StorePool(StoreLimits())
        _request.set("call-7")
        try:
            return await pool.run(_request.get)
        finally:
            pool.shutdown()

    assert asyncio.run(scenario()) == "call-7"
