"""The pure parts of `voxauth bench shifts`: latency statistics, pacing, CPU parsing and the
pass rule. (The benchmark itself is a command that runs for minutes, not a test.)"""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import replace

import pytest

from server.tools.shift_bench import (
    FRAME_BYTES,
    MESSAGE_FRAMES,
    LatencyStats,
    LevelResult,
    Pacer,
    ShiftTally,
    busy_seconds_from_proc_stat,
    cpu_seconds_from_stat,
    largest_passing,
    message_chunks,
    nearest_rank,
    parse_levels,
)


def test_percentiles_are_observed_values_and_p99_of_few_is_the_worst() -> None:
    latencies = [0.30, 0.10, 0.20, 1.90, 0.25]
    stats = LatencyStats.of(latencies)
    assert stats == LatencyStats(p50=0.25, p99=1.90, max=1.90)
    hundred = [i / 100 for i in range(1, 101)]
    assert nearest_rank(hundred, 0.99) == 0.99
    assert nearest_rank(hundred, 0.5) == 0.50
    assert LatencyStats.of([]) is None


def test_pacing_keeps_absolute_deadlines_after_a_late_message() -> None:
    pacer = Pacer(start=10.0, period=0.1)
    assert pacer.wait(10.0) == 0.0  # message 0 due at 10.0
    assert pacer.wait(10.05) == pytest.approx(0.05)  # message 1 due at 10.1
    # The sender stalls for 0.25 s: the late messages go at once, then the schedule resumes
    # where it was, rather than 0.1 s after the stall.
    assert pacer.wait(10.45) == 0.0  # due 10.2
    assert pacer.wait(10.45) == 0.0  # due 10.3
    assert pacer.wait(10.45) == 0.0  # due 10.4
    assert pacer.wait(10.45) == pytest.approx(0.05)  # due 10.5
    assert pacer.max_lag == pytest.approx(0.25)


def test_messages_are_whole_100_ms_and_a_short_tail_is_dropped() -> None:
    step = FRAME_BYTES * MESSAGE_FRAMES
    chunks = message_chunks(bytes(range(256)) * 100)  # 25,600 bytes = 8 messages + 0.4
    assert len(chunks) == 8
    assert {len(c) for c in chunks} == {step}
    assert b"".join(chunks) == (bytes(range(256)) * 100)[: 8 * step]


def test_cpu_time_is_read_from_proc_stat_lines() -> None:
    # Field 2 may hold spaces and parentheses; utime and stime are fields 14 and 15.
    stat = "4242 (python (voxauth) x) S 1 4242 4242 0 -1 4194560 10 0 0 0 350 150 0 0 20 0 7"
    assert cpu_seconds_from_stat(stat, 100) == pytest.approx(5.0)
    proc_stat = "cpu  100 10 50 900 40 5 5 0 0 0\ncpu0 50 5 25 450 20 3 2 0 0 0\n"
    assert busy_seconds_from_proc_stat(proc_stat, 100) == pytest.approx(1.7)


def test_a_shift_is_overdue_only_past_its_latest_due_time_plus_the_limit() -> None:
    tally = ShiftTally(last_event_at=1000.0)
    assert not tally.overdue(1046.9, max_interval=45.0, limit=2.0)
    assert tally.overdue(1047.1, max_interval=45.0, limit=2.0)
    tally.checkpoint("passed", at=1030.4, scheduled_at=1030.0)
    assert tally.latencies == [pytest.approx(0.4)]
    assert not tally.overdue(1060.0, max_interval=45.0, limit=2.0)
    tally.locked = True  # A locked shift has no more checkpoints to wait for.
    assert not tally.overdue(2000.0, max_interval=45.0, limit=2.0)


def level(shifts: int, worst: float, *, overdue: int = 0, errors: int = 0) -> LevelResult:
    return LevelResult(
        shifts=shifts,
        seconds=120.0,
        outcomes=Counter(passed=10),
        latency=LatencyStats(0.3, worst, worst),
        overdue=overdue,
        errors=["StartShift: RESOURCE_EXHAUSTED"] * errors,
        server_cores=0.5,
        client_cores=0.1,
        other_cores=0.0,
        max_send_lag=0.01,
    )


def test_the_largest_passing_level_needs_every_smaller_level_to_pass() -> None:
    assert level(10, 2.0).passes(2.0)
    assert not level(10, 2.01).passes(2.0)
    assert not level(10, 0.5, overdue=1).passes(2.0)
    assert not level(10, 0.5, errors=1).passes(2.0)
    no_checkpoints = replace(level(10, 0.5), latency=None)
    assert not no_checkpoints.passes(2.0)

    results = [level(40, 0.5), level(10, 0.4), level(20, 2.5), level(80, 0.6)]
    assert largest_passing(results, 2.0) == 10
    assert largest_passing([level(5, 3.0)], 2.0) is None


def test_levels_parse_as_an_increasing_list() -> None:
    assert parse_levels("40,10,20,10") == [10, 20, 40]
    assert parse_levels("2") == [2]
    for bad in ("0", "ten", "", "1,100000"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_levels(bad)
