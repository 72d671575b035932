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

RETRY_HINT_MIN_SECONDS = 0.5
RETRY_HINT_MAX_SECONDS = 10.0
"""The bounds of the retry hint a refusal carries (see `retry_hint_seconds`)."""
_PRIOR_JOB_SECONDS = 0.3
"""The average job before any has finished: about one check's CPU time (README "Speed")."""
_JOB_AVERAGE_WEIGHT = 0.2
"""Each finished job's weight in the moving average: about the last ten jobs count."""


def retry_hint_seconds(mean_job_seconds: float, queued: int, workers: int) -> float:
    """How long a caller refused by a full queue should wait before trying again: the time
    the workers take to get through the work queued ahead of it and the one running job that
    frees its slot, at the recent average job time, bounded.

    Not the time to the next free slot (about mean / workers): every caller refused meanwhile
    wants that slot too, and retrying then mostly meets a full queue again; by the time the
    queue ahead has drained, the retry finds room. Jobs differ (a login check, a change-watch
    look, a long upload); the average is of what the pool ran lately, as the queue holds. The
    hint grows with the load the pool can see: longer jobs (cores contended) and a deeper
    queue. The floor keeps a refused crowd from coming back faster than a job takes; the cap
    keeps a stale average (the model loads at the start, a burst of long uploads) from
    sending callers away for long: a retry that comes too soon costs the server only another
    refusal, and the caller's own backoff grows from there."""
    estimate = mean_job_seconds * (max(0, queued) + 1) / max(1, workers)
    return min(RETRY_HINT_MAX_SECONDS, max(RETRY_HINT_MIN_SECONDS, estimate))


class InferencePool:
    def __init__(
        self,
        limits: InferenceLimits,
        telemetry: Telemetry = NO_TELEMETRY,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
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
        self._monotonic = monotonic
        self._mean_job_seconds = _PRIOR_JOB_SECONDS

    @property
    def in_flight(self) -> int:
        """Work admitted and not finished: running on a worker or queued for one."""
        return self._in_flight

    @property
    def queued(self) -> int:
        """Work waiting for a worker (an upper bound: a worker may be just taking one)."""
        return max(0, self._in_flight - self._workers)

    @property
    def mean_job_seconds(self) -> float:
        """The moving average of the time a job held its worker."""
        return self._mean_job_seconds

    def retry_after_seconds(self) -> float:
        """The retry hint for a caller refused now (see `retry_hint_seconds`)."""
        return retry_hint_seconds(self._mean_job_seconds, self.queued, self._workers)

    async def run(self, work: Callable[[], T]) -> T:
        """Runs `work` on a worker; raises CapacityError at once when the queue is full, with
        the time to wait before trying again."""
        with self._lock:
            if self._in_flight >= self._capacity:
                in_flight, wait = self._in_flight, self.retry_after_seconds()
                raise CapacityError(
                    f"the server is busy ({in_flight} requests in progress); "
                    f"retry in about {wait:.1f} s",
                    retry_after_seconds=wait,
                )
            self._in_flight += 1
        submitted = self._monotonic()
        # In the caller's context, so the work's log lines name the caller's request.
        context = contextvars.copy_context()

        def timed() -> T:
            started = self._monotonic()
            self._telemetry.inference_waited(started - submitted)
            try:
                return context.run(work)
            finally:
                self._finished(self._monotonic() - started)

        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, timed)
        finally:
            with self._lock:
                self._in_flight -= 1

    def _finished(self, seconds: float) -> None:
        with self._lock:
            self._mean_job_seconds += _JOB_AVERAGE_WEIGHT * (seconds - self._mean_job_seconds)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
