"""The pure parts of `voxauth bench shifts takeover`: the simulated leg of a call, the
spread of times, the virtual clock and the counting of the service's work in flight. (The
benchmark itself runs for many minutes; README, "Change of voice", has its figures.)"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from server.runtime.clock import ManualClock
from server.tools.takeover_bench import RATE, CountingPool, Spread, conversation


def test_a_leg_is_turns_of_the_speaker_with_pauses_between() -> None:
    rng = np.random.default_rng(5)
    material = np.full(RATE * 10, 0.3, dtype=np.float32)
    leg, spoken = conversation(material, 600.0, rng)
    assert len(leg) == 600 * RATE
    loud = float(np.mean(np.abs(leg) > 0.1))
    # Turns and pauses of 2-8 s each: about half the time is speech, as counted.
    assert 0.35 < loud < 0.65
    assert spoken == pytest.approx(loud * 600, rel=0.01)
    assert np.max(np.abs(leg[np.abs(leg) < 0.1])) < 0.01  # the pauses are line noise


def test_spread_takes_observed_values() -> None:
    spread = Spread.of([30.0, 90.0, 60.0, 45.0, 120.0])
    assert spread == Spread(median=60.0, p90=120.0, max=120.0)
    assert Spread.of([]) is None


def test_virtual_time_moves_only_when_told_and_work_in_flight_is_counted() -> None:
    async def scenario() -> list[str]:
        clock = ManualClock()
        seen: list[str] = []

        async def sleeper() -> None:
            await clock.sleep_until(10.0)
            seen.append(f"woke at {clock.monotonic():g}")

        task = asyncio.create_task(sleeper())
        await asyncio.sleep(0)
        clock.advance(9.0)
        await asyncio.sleep(0)
        seen.append(f"asleep at {clock.monotonic():g}")
        clock.advance(1.0)
        await task

        class Pool:
            async def run(self, work: object) -> int:
                seen.append(f"busy {counting.busy}")
                return 7

        counting = CountingPool(Pool())
        assert await counting.run(lambda: 7) == 7
        seen.append(f"idle {counting.busy}")
        return seen

    assert asyncio.run(scenario()) == ["asleep at 9", "woke at 10", "busy 1", "idle 0"]
