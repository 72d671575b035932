"""A bounded executor for the blocking work (decoding, VAD, the speaker model), so none of it
runs on the event loop and a burst of requests cannot queue up without limit."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from server.config import InferenceLimits
from server.errors import CapacityError

T = TypeVar("T")


class InferencePool:
    def __init__(self, limits: InferenceLimits) -> None:
        # Process-wide: torch (features, speech detection) has one intra-op thread pool,
        # shared by all workers; the speaker network has its own threads per worker. Imported
        # here, not at the top: the domain modules that name this pool stay free of torch.
        import torch

        torch.set_num_threads(limits.threads)
        self._executor = ThreadPoolExecutor(
            max_workers=limits.workers, thread_name_prefix="voxauth-inference"
        )
        self._capacity = limits.workers + limits.max_queued
        self._in_flight = 0
        self._lock = threading.Lock()

    async def run(self, work: Callable[[], T]) -> T:
        """Runs `work` on a worker; raises CapacityError at once when the queue is full."""
        with self._lock:
            if self._in_flight >= self._capacity:
                raise CapacityError(
                    f"the server is busy ({self._in_flight} requests in progress); retry shortly"
                )
            self._in_flight += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, work)
        finally:
            with self._lock:
                self._in_flight -= 1

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
