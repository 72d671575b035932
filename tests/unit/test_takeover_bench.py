"""The pure parts of `voxauth bench shifts takeover`: the simulated leg of a call, the
spread of times, the virtual clock and the counting of the service's work in flight. (The
benchmark itself runs for many minutes; README, "Change of voice", has its figures.)"""

from __future__ import annotations

import asyncio
import itertools

import numpy as np
import pytest

from server.runtime.clock import ManualClock
from server.tools.takeover_bench import (
    RATE,
    CountingPool,
    Spread,
    Turn,
    conversation,
    material_heard,
    pauses,
    shared_material,
    wilson,
)


def reader(phrases: int) -> np.ndarray:
    """A recording of `phrases` phrases of 0.5 s at 0.3, each followed by 0.2 s of silence."""
    phrase = np.concatenate([np.full(RATE // 2, 0.3), np.zeros(RATE // 5)])
    return np.tile(phrase, phrases).astype(np.float32)


def test_pauses_are_found_between_phrases_not_inside_them() -> None:
    material = reader(10)
    cuts = pauses(material)
    assert cuts[0] == 0 and cuts[-1] == len(material)
    inner = cuts[1:-1]
    assert len(inner) == 10  # each phrase's pause (the last one ends the recording)
    for cut in inner:
        assert material[cut] == 0.0  # in silence
        assert (cut % int(0.7 * RATE)) > RATE // 2  # after the phrase's speech


def test_a_leg_is_turns_of_the_speaker_with_pauses_between() -> None:
    rng = np.random.default_rng(5)
    material = reader(15)  # 10.5 s
    turns: list[Turn] = []
    leg, spoken = conversation(material, 600.0, rng, turns)
    assert len(leg) == 600 * RATE
    assert spoken == pytest.approx(sum(t.seconds for t in turns))
    # Turns of 2-8 s (one at the recording's end may be shorter), with 2-8 s of line noise
    # between them: about half the time is a turn.
    assert 0.3 < spoken / 600 < 0.65
    cuts = set(pauses(material))
    for turn in turns[:-1]:
        start = round(turn.source * RATE)
        assert start in cuts  # turns start in a pause...
        assert start + round(turn.seconds * RATE) in cuts  # ...and end in one, never wrapping
        assert turn.seconds <= 8.0 + 0.7
    # Read on in order: each turn starts where the one before stopped (or at the start).
    for before, after in itertools.pairwise(turns):
        stopped = before.source + before.seconds
        assert after.source == pytest.approx(stopped) or (
            after.source == 0.0 and stopped == pytest.approx(len(material) / RATE)
        )
    # The pauses between turns are line noise, far below speech.
    gaps = np.ones(len(leg), dtype=bool)
    for turn in turns:
        gaps[round(turn.at * RATE) : round((turn.at + turn.seconds) * RATE)] = False
    assert np.max(np.abs(leg[gaps])) < 0.01


def test_spliced_turns_start_anywhere() -> None:
    rng = np.random.default_rng(5)
    turns: list[Turn] = []
    conversation(reader(15), 600.0, rng, turns, spliced=True)
    cuts = set(pauses(reader(15)))
    assert sum(round(t.source * RATE) in cuts for t in turns) < len(turns) / 2


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


def test_a_legs_turns_say_where_in_the_material_each_came_from() -> None:
    rng = np.random.default_rng(3)
    material = np.linspace(0.2, 0.4, RATE * 5, dtype=np.float32)
    turns: list[Turn] = []
    leg, spoken = conversation(material, 120.0, rng, turns)
    assert sum(t.seconds for t in turns) == pytest.approx(spoken)
    for turn in turns:
        at, source = round(turn.at * RATE), round(turn.source * RATE)
        expected = np.take(material, np.arange(source, source + 100), mode="wrap")
        # The leg carries the material from `source` on (plus line noise far below it).
        assert np.max(np.abs(leg[at : at + 100] - expected)) < 0.01


def test_shared_material_counts_the_same_recorded_speech_judged_twice() -> None:
    turns = [Turn(0.0, 0.0, 4.0), Turn(10.0, 2.0, 4.0), Turn(20.0, 6.0, 2.0)]
    # The first turn holds material 0-4 s; the second 2-6 s: half of it was in the first.
    assert np.sum(material_heard(turns, (0.0, 4.0), 8.0)) == 400
    assert shared_material(turns, (10.0, 14.0), (0.0, 4.0), 8.0) == pytest.approx(0.5)
    assert shared_material(turns, (20.0, 22.0), (0.0, 4.0), 8.0) == 0.0
    # Material wraps: a turn from 7 s of 8 s goes on from its start.
    wrapped = [Turn(0.0, 7.0, 2.0)]
    heard = material_heard(wrapped, (0.0, 2.0), 8.0)
    assert heard[700:].all() and heard[:100].all() and not heard[100:700].any()
    # Pauses between turns carry no material.
    assert not material_heard(turns, (5.0, 9.0), 8.0).any()


def test_wilson_interval_is_honest_for_zero_and_all() -> None:
    low, high = wilson(0, 28)
    assert low == 0.0
    assert high == pytest.approx(1.96**2 / (28 + 1.96**2), rel=1e-6)
    low, high = wilson(73, 73)
    assert high == pytest.approx(1.0) and 0.94 < low < 0.96
    low, high = wilson(2, 28)
    assert low < 2 / 28 < high
    assert wilson(0, 0) == (0.0, 1.0)
