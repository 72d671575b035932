"""The store's own threads: every store call from async code runs here, so it never blocks the
event loop and never waits behind model inference (a burst of Verify calls that fills the
inference queue leaves CreateAgent, DeleteAgent or GetShift answering at once)."""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from server.config import StoreLimits
from server.runtime.telemetry import NO_TELEMETRY, Telemetry

T = TypeVar("T")


class StorePool:
    """A fixed number of threads for blocking store work. Calls wait their turn rather than
    being refused: store calls take milliseconds, and background work (a checkpoint's save, an
    audit record) must not fail because the server is busy."""

    def __init__(self, limits: StoreLimits, telemetry: Telemetry = NO_TELEMETRY) -> None:
        self._executor = ThreadPoolExecutor(
            max_workers=limits.workers, thread_name_prefix="voxauth-store"
        )
        self._telemetry = telemetry

    async def run(self, work: Callable[[], T]) -> T:
        """Runs `work` on a store thread, in the caller's context (as asyncio.to_thread does)."""
        context = contextvars.copy_context()
        submitted = time.monotonic()
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._executor, context.run, work
            )
        finally:
            self._telemetry.store_called(time.monotonic() - submitted)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
