"""The pure parts of `voxauth bench shifts takeover`: the simulated leg of a call, the
spread of times, the virtual clock and the counting of the service's work in flight. (The
benchmark itself runs for many minutes; README, "Change of voice", has its figures.)"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from server.runtime.clock import ManualClock
from server.tools.takeover_bench import (
    RATE,
    CountingPool,
    LeftOut,
    Measured,
    Spread,
    Turn,
    Voice,
    bench_config,
    conversation,
    held_apart_voices,
    material_heard,
    pauses,
    shared_material,
    split_recordings,
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


def recordings(seconds: Sequence[float]) -> list[tuple[str, np.ndarray]]:
    """Recordings of one speaker, each a constant level telling which it is."""
    return [
        (f"7-1-{index:04d}", np.full(round(s * RATE), 0.01 * (index + 1), dtype=np.float32))
        for index, s in enumerate(seconds)
    ]


def speech(values: Sequence[float], usable: Sequence[bool] | None = None) -> dict[str, Measured]:
    flags = usable or [True] * len(values)
    return {
        f"7-1-{i:04d}": Measured(v, ok) for i, (v, ok) in enumerate(zip(values, flags, strict=True))
    }


def test_several_recordings_enroll_in_name_order_until_the_minimum_and_the_rest_make_the_leg() -> (
    None
):
    material = recordings([8, 9, 10, 6, 7, 12])
    voice = split_recordings("7", material, speech([7, 8, 9, 5, 6, 11]), 20.0)
    assert isinstance(voice, Voice)
    # 7 + 8 < 20; 7 + 8 + 9 = 24 meets it: the first three enroll, no more.
    assert voice.enrolled_from == ("7-1-0000", "7-1-0001", "7-1-0002")
    assert voice.enrollment_net_speech == 24.0
    assert [len(part) for part in voice.enrollment] == [8 * RATE, 9 * RATE, 10 * RATE]
    # The login and the leg are the other three only, in order: nothing enrolled is judged.
    assert voice.leg_from == ("7-1-0003", "7-1-0004", "7-1-0005")
    assert voice.leg_net_speech == 22.0
    expected = np.concatenate([samples for _, samples in material[3:]])
    assert np.array_equal(voice.material, expected)
    enrolled_levels = {float(part[0]) for part in voice.enrollment}
    assert not enrolled_levels & set(np.unique(voice.material).tolist())
    # The login: the leg's first recordings, up to 8 s of speech (5 + 6).
    assert len(voice.login) == (6 + 7) * RATE
    assert voice.skipped == ()


def test_a_recording_enrollment_would_refuse_is_in_neither_part() -> None:
    voice = split_recordings(
        "7",
        recordings([8, 9, 10, 6, 7, 12]),
        speech([7, 8, 9, 5, 6, 11], [True, False, True, True, True, True]),
        20.0,
    )
    assert isinstance(voice, Voice)
    # Without the refused second, 7 + 9 < 20: the fourth enrolls too.
    assert voice.enrolled_from == ("7-1-0000", "7-1-0002", "7-1-0003")
    assert voice.skipped == ("7-1-0001",)
    assert voice.leg_from == ("7-1-0004", "7-1-0005")
    assert voice.enrollment_net_speech == 21.0 and voice.leg_net_speech == 17.0


def test_speakers_with_too_little_speech_are_left_out_with_the_reason() -> None:
    too_little = split_recordings("7", recordings([8, 9]), speech([7, 8]), 20.0)
    assert isinstance(too_little, LeftOut)
    assert "15.0 s of net speech" in too_little.reason and "20 s needed" in too_little.reason
    refused = split_recordings(
        "7", recordings([8, 9, 10]), speech([7, 8, 9], [True, False, False]), 20.0
    )
    assert isinstance(refused, LeftOut) and "7.0 s" in refused.reason
    # Enough to enroll, but not enough left for two checkpoints' speech on the call.
    short_leg = split_recordings("7", recordings([12, 12, 9]), speech([10, 10, 8]), 20.0)
    assert isinstance(short_leg, LeftOut)
    assert "8.0 s of net speech left for the call" in short_leg.reason
    assert "16 s needed" in short_leg.reason


def test_a_folder_of_several_recordings_per_speaker_is_split_by_recording(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(1)
    for name in ["11-1-0000", "11-1-0001", "11-1-0002", "11-1-0003", "12-1-0000", "13-1-0000"]:
        sf.write(tmp_path / f"{name}.flac", 0.1 * rng.standard_normal(RATE * 13), RATE)
    measured: list[int] = []

    def measure(samples: Sequence[np.ndarray]) -> list[Measured]:
        measured.append(len(samples))
        return [Measured(12.0, True) for _ in samples]

    speakers = {
        s: sorted(tmp_path.glob(f"{s}-*.flac"), key=lambda p: p.name) for s in ("11", "12", "13")
    }
    voices, left_out = held_apart_voices(speakers, True, measure, 20.0)
    assert measured == [4]  # only the speaker of several, measured in one go
    assert [v.speaker for v in voices] == ["11"]
    assert voices[0].enrolled_from == ("11-1-0000", "11-1-0001")
    assert voices[0].leg_from == ("11-1-0002", "11-1-0003")
    assert {o.speaker for o in left_out} == {"12", "13"}
    assert all("one recording" in o.reason for o in left_out)
    # A folder of one recording per speaker: each is split in half, as before; none measured.
    one = {s: speakers[s] for s in ("12", "13")}
    voices, left_out = held_apart_voices(one, False, measure, 4.0)
    assert measured == [4] and left_out == []
    for voice in voices:
        assert voice.leg_from == voice.enrolled_from
        assert len(voice.enrollment[0]) + len(voice.material) == 13 * RATE
        assert np.array_equal(voice.login, voice.material)


def test_only_a_folder_of_one_recording_per_speaker_lowers_the_enrollment_minimum(
    tmp_path: Path,
) -> None:
    lowered = bench_config(tmp_path, True, None, one_recording=True)
    assert lowered.enrollment.required_net_speech_seconds == 4.0
    kept = bench_config(tmp_path, True, None, one_recording=False)
    assert kept.enrollment.required_net_speech_seconds == 20.0
