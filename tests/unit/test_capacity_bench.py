"""The pure parts of `voxauth bench capacity`: /proc parsing, message sizes, the split over
client processes, the per-stream arithmetic and the combination of limits. (The benchmark
itself runs for minutes; it is a command, not a test.)"""

from __future__ import annotations

import argparse
import os
from collections import Counter
from pathlib import Path

import pytest

from server.tools.capacity_bench import (
    BACKLOG_LIMIT_SECONDS,
    Capacity,
    LagLog,
    LevelResult,
    format_level,
    marginal,
    message_chunks,
    parse_levels,
    rss_bytes_from_status,
    shifts_by_cpu,
    split_evenly,
)
from server.tools.shift_bench import FRAME_BYTES, cpu_seconds_from_stat

_STATUS = "Name:\tpython\nVmPeak:\t  900000 kB\nVmRSS:\t  123456 kB\nThreads:\t12\n"


def test_rss_is_read_from_the_vmrss_line_in_bytes() -> None:
    assert rss_bytes_from_status(_STATUS) == 123456 * 1024
    # This process's own status parses to a plausible size.
    own = rss_bytes_from_status(Path(f"/proc/{os.getpid()}/status").read_text())
    assert 1 << 20 < own < 1 << 40


def test_a_status_without_rss_or_in_another_unit_is_refused() -> None:
    with pytest.raises(ValueError, match="no VmRSS"):
        rss_bytes_from_status("Name:\tkthreadd\nState:\tS (sleeping)\n")
    with pytest.raises(ValueError, match="unit"):
        rss_bytes_from_status("VmRSS:\t 12 MB\n")


def test_own_cpu_time_from_proc_stat_grows_with_work() -> None:
    ticks = os.sysconf("SC_CLK_TCK")
    path = Path(f"/proc/{os.getpid()}/stat")
    before = cpu_seconds_from_stat(path.read_text(), ticks)
    sum(i * i for i in range(2_000_000))
    assert cpu_seconds_from_stat(path.read_text(), ticks) > before


def test_messages_are_whole_and_of_the_chosen_size() -> None:
    pcm = bytes(FRAME_BYTES * 12 + 7)
    hundred = message_chunks(pcm, 5)
    assert [len(m) for m in hundred] == [FRAME_BYTES * 5] * 2  # the 2-frame tail dropped
    assert len(message_chunks(pcm, 1)) == 12


def test_shifts_are_split_over_clients_without_loss() -> None:
    assert split_evenly(10, 4) == [3, 3, 2, 2]
    assert split_evenly(3, 4) == [1, 1, 1, 0]
    assert sum(split_evenly(1000, 7)) == 1000


def test_marginal_cost_per_added_stream() -> None:
    # From an idle server at 1% of a core to 25% at 100 streams: 0.24% each.
    assert marginal(None, (100, 0.25), 0.01) == pytest.approx(0.0024)
    assert marginal((100, 0.25), (250, 0.40), 0.01) == pytest.approx(0.001)
    with pytest.raises(ValueError):
        marginal((250, 0.4), (250, 0.5), 0.0)


def test_limits_combine_as_shares_of_the_replica() -> None:
    # Each part alone would allow 2000 shifts: together they take half the replica each.
    capacity = Capacity({"ingestion": 2000.0, "checkpoints": 2000.0})
    assert capacity.shifts == pytest.approx(1000.0)
    # The combination is never above the tightest part; the tightest part binds.
    three = Capacity({"ingestion": 1500.0, "checkpoints": 2820.0, "change watch": 2500.0})
    assert three.shifts == pytest.approx(1 / (1 / 1500 + 1 / 2820 + 1 / 2500))
    assert three.shifts < 1500.0
    assert three.binding == "ingestion"


def test_shifts_by_cpu() -> None:
    assert shifts_by_cpu(2.0, 0.001) == pytest.approx(2000.0)
    with pytest.raises(ValueError):
        shifts_by_cpu(2.0, 0.0)


def test_levels_are_parsed_sorted_and_bounded() -> None:
    assert parse_levels("500,100,250,100") == [100, 250, 500]
    for bad in ("", "0", "ten", "100000"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_levels(bad)


def test_lag_log_keeps_the_latest_after_a_reset() -> None:
    log = LagLog()
    log.add(0.0)
    log.add(0.4)
    log.reset()
    assert log.lags == []
    assert log.last == 0.4


def _level(final_lag: float, errors: list[str]) -> LevelResult:
    return LevelResult(
        shifts=100,
        seconds=90.0,
        server_cores=0.2,
        client_cores=0.3,
        other_cores=0.1,
        rss_bytes=300 << 20,
        messages=90_000,
        expected_messages=90_000,
        lag_p50=0.0,
        lag_p99=0.01,
        lag_max=0.2,
        final_lag_max=final_lag,
        outcomes=Counter(passed=3),
        latency_max=0.4,
        errors=errors,
        load_average=1.5,
    )


def test_a_level_keeps_up_only_without_backlog_or_errors() -> None:
    assert _level(0.05, []).keeps_up
    assert not _level(BACKLOG_LIMIT_SECONDS + 0.5, []).keeps_up
    assert not _level(0.05, ["stream: the server ended the stream"]).keeps_up
    row = format_level(_level(0.05, []), 0.0019, baseline_rss=100 << 20)
    assert "0.200%" in row  # 20% of a core over 100 streams
    assert "2.00" in row  # (300 - 100) MB over 100 shifts
    assert row.endswith("ok")
