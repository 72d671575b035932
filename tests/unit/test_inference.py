"""The bounded inference pool: work runs off the event loop, and a full queue is refused with
a hint of when to retry: bounded, and growing with the recent job times and the queue."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import pytest

from server.config import InferenceLimits
from server.errors import CapacityError
from server.runtime.inference import (
    RETRY_HINT_MAX_SECONDS,
    RETRY_HINT_MIN_SECONDS,
    InferencePool,
    retry_hint_seconds,
)


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


class FakeClock:
    """The pool's monotonic clock, moved on by the work itself: job times without waiting."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def job(self, seconds: float) -> Callable[[], None]:
        def work() -> None:
            self.now += seconds

        return work


def test_the_retry_hint_is_bounded_and_grows_with_load() -> None:
    # Two workers, 32 queued (the defaults), 0.3 s jobs: the queue ahead drains in ~5 s.
    assert retry_hint_seconds(0.3, 32, 2) == pytest.approx(0.3 * 33 / 2)
    # Longer jobs, a deeper queue: a longer wait; more workers: a shorter one.
    assert retry_hint_seconds(0.4, 32, 2) > retry_hint_seconds(0.3, 32, 2)
    assert retry_hint_seconds(0.3, 32, 2) > retry_hint_seconds(0.3, 16, 2)
    assert retry_hint_seconds(0.3, 32, 4) < retry_hint_seconds(0.3, 32, 2)
    # Bounded both ways: never a storm of instant retries, never minutes away.
    assert retry_hint_seconds(0.001, 0, 8) == RETRY_HINT_MIN_SECONDS == 0.5
    assert retry_hint_seconds(60.0, 32, 2) == RETRY_HINT_MAX_SECONDS == 10.0
    assert retry_hint_seconds(0.0, -3, 0) == RETRY_HINT_MIN_SECONDS


def _refusal_after(job_seconds: float, jobs: int, max_queued: int) -> tuple[float, CapacityError]:
    """The pool's average job time after `jobs` jobs of `job_seconds`, and the refusal of one
    more call while one worker is busy and `max_queued` wait."""

    async def scenario() -> tuple[float, CapacityError]:
        clock = FakeClock()
        pool = InferencePool(
            InferenceLimits(workers=1, threads=1, max_queued=max_queued), monotonic=clock
        )
        for _ in range(jobs):
            await pool.run(clock.job(job_seconds))
        mean = pool.mean_job_seconds
        release = threading.Event()
        held = [
            asyncio.ensure_future(pool.run(lambda: release.wait(10))) for _ in range(1 + max_queued)
        ]
        await asyncio.sleep(0.05)
        try:
            with pytest.raises(CapacityError) as refused:
                await pool.run(lambda: None)
        finally:
            release.set()
            await asyncio.gather(*held)
            pool.shutdown()
        return mean, refused.value

    return asyncio.run(scenario())


def test_a_refusal_carries_a_hint_from_the_recent_job_times() -> None:
    mean, refusal = _refusal_after(0.4, jobs=30, max_queued=3)
    # A moving average: after 30 jobs of 0.4 s it is all but 0.4 s.
    assert mean == pytest.approx(0.4, abs=0.001)
    assert refusal.retry_after_seconds == pytest.approx(retry_hint_seconds(mean, 3, 1))
    assert refusal.retry_after_seconds == pytest.approx(0.4 * 4, abs=0.01)
    assert "retry in about 1.6 s" in refusal.message
    # Slower jobs (a contended host) and a deeper queue ask for a longer wait ...
    slower = _refusal_after(1.0, jobs=30, max_queued=3)[1].retry_after_seconds
    deeper = _refusal_after(0.4, jobs=30, max_queued=6)[1].retry_after_seconds
    hint = refusal.retry_after_seconds
    assert slower is not None and deeper is not None and hint is not None
    assert slower > hint and deeper > hint
    # ... within the bounds: fast jobs still wait the floor, a long model load only the cap.
    assert _refusal_after(0.01, jobs=30, max_queued=3)[1].retry_after_seconds == 0.5
    assert _refusal_after(60.0, jobs=1, max_queued=3)[1].retry_after_seconds == 10.0


def test_before_any_job_the_hint_comes_from_a_prior() -> None:
    mean, refusal = _refusal_after(0.0, jobs=0, max_queued=3)
    assert 0.1 <= mean <= 1.0
    assert refusal.retry_after_seconds is not None
    assert RETRY_HINT_MIN_SECONDS <= refusal.retry_after_seconds <= RETRY_HINT_MAX_SECONDS


def test_a_job_that_raises_still_counts_toward_the_average() -> None:
    async def scenario() -> float:
        clock = FakeClock()
        pool = InferencePool(InferenceLimits(workers=1, threads=1, max_queued=1), monotonic=clock)

        def failing() -> None:
            clock.now += 5.0
            raise ValueError("undecodable")

        with pytest.raises(ValueError):
            await pool.run(failing)
        pool.shutdown()
        return pool.mean_job_seconds

    assert asyncio.run(scenario()) > 1.0
