"""A bounded executor for the blocking work (decoding, VAD, the speaker model), so none of it
runs on the event loop and a burst of requests cannot queue up without limit."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from server.config import InferenceLimits
from server.errors import CapacityError
from server.runtime.telemetry import NO_TELEMETRY, Telemetry

T = TypeVar("T")


class InferencePool:
    def __init__(self, limits: InferenceLimits, telemetry: Telemetry = NO_TELEMETRY) -> None:
        # Process-wide: torch (features, speech detection) has one intra-op thread pool,
        # shared by all workers; the speaker network has its own threads per worker. Imported
        # here, not at the top: the domain modules that name this pool stay free of torch.
        import torch

        torch.set_num_threads(limits.threads)
        self._executor = ThreadPoolExecutor(
            max_workers=limits.workers, thread_name_prefix="voxauth-inference"
        )
        self._workers = limits.workers
        self._capacity = limits.workers + limits.max_queued
        self._in_flight = 0
        self._lock = threading.Lock()
        self._telemetry = telemetry

    @property
    def in_flight(self) -> int:
        """Work admitted and not finished: running on a worker or queued for one."""
        return self._in_flight

    @property
    def queued(self) -> int:
        """Work waiting for a worker (an upper bound: a worker may be just taking one)."""
        return max(0, self._in_flight - self._workers)

    async def run(self, work: Callable[[], T]) -> T:
        """Runs `work` on a worker; raises CapacityError at once when the queue is full."""
        with self._lock:
            if self._in_flight >= self._capacity:
                raise CapacityError(
                    f"the server is busy ({self._in_flight} requests in progress); retry shortly"
                )
            self._in_flight += 1
        submitted = time.monotonic()
        # In the caller's context, so the work's log lines name the caller's request.
        context = contextvars.copy_context()

        def timed() -> T:
            self._telemetry.inference_waited(time.monotonic() - submitted)
            return context.run(work)

        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, timed)
        finally:
            with self._lock:
                self._in_flight -= 1

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
