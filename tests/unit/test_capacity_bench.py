"""The pure parts of `voxauth bench capacity`: /proc parsing, message sizes, the split over
client processes, the per-stream arithmetic, the checkpoints the schedule leads to expect in a
window, and what makes a level keep up. (The benchmark itself runs for minutes; it is a
command, not a test. Its logins' retries and pacing: tests/unit/test_login_ramp.py.)"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from server.api.metrics import Metrics
from server.config import ShiftPolicy
from server.runtime.telemetry import LookOutcome
from server.tools.capacity_bench import (
    BACKLOG_LIMIT_SECONDS,
    CheckpointSeen,
    CheckpointSummary,
    LagLog,
    LevelResult,
    Settings,
    ShiftWork,
    _print_steady_state,
    expected_scheduled,
    format_checkpoints,
    format_level,
    format_ramp,
    format_shift_work,
    marginal,
    message_chunks,
    parse_levels,
    read_shift_work,
    rss_bytes_from_status,
    server_environment,
    shifts_by_cpu,
    split_evenly,
    steady_state_cores,
    window_shift_work,
)
from server.tools.login_ramp import RampTally
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


_POLICY = ShiftPolicy()  # the default: 600 +/- 480 s, at least 120 s apart


def test_no_random_checkpoint_is_expected_in_a_shift_s_first_two_minutes() -> None:
    assert expected_scheduled([1000.0] * 500, 1000.0, 1120.0, _POLICY) == 0.0
    assert expected_scheduled([], 0.0, 60.0, _POLICY) == 0.0


def test_before_a_second_checkpoint_can_fall_the_first_is_uniform_over_its_spread() -> None:
    # 500 shifts logged in at 0, a 96 s window from 130 s (a second checkpoint needs 240 s):
    # a tenth of the first's 960 s spread.
    assert expected_scheduled([0.0] * 500, 130.0, 226.0, _POLICY) == pytest.approx(50.0)
    # Later, second checkpoints add to the window: 300-396 s holds more than a tenth.
    assert expected_scheduled([0.0] * 500, 300.0, 396.0, _POLICY) > 50.0


def test_the_expectation_matches_a_simulation_of_the_schedule() -> None:
    rng = random.Random(7)
    logins = [rng.uniform(0.0, 200.0) for _ in range(40)]
    start, end = 900.0, 1500.0
    trials, seen = 2000, 0
    for _ in range(trials):
        for login in logins:
            at = login
            while True:
                at += rng.uniform(120.0, 1080.0)
                if at > end:
                    break
                seen += at >= start
    simulated = seen / trials
    assert expected_scheduled(logins, start, end, _POLICY) == pytest.approx(simulated, rel=0.03)
    # Long after the logins the rate tends to the steady one, shifts / 600 s.
    late = expected_scheduled([0.0] * 100, 3600.0, 4200.0, _POLICY)
    assert late == pytest.approx(100 * 600 / 600, rel=0.05)


def test_a_schedule_the_expectation_cannot_describe_is_refused() -> None:
    gapped = replace(_POLICY, min_checkpoint_gap_seconds=200.0)  # clips draws below 200 s
    with pytest.raises(ValueError, match="minimum gap"):
        expected_scheduled([0.0], 0.0, 60.0, gapped)
    with pytest.raises(ValueError, match="too old"):
        expected_scheduled([0.0], 0.0, 100_000.0, _POLICY)


def _summary(seen: list[CheckpointSeen]) -> CheckpointSummary:
    return CheckpointSummary.of(seen, expected=4.2, steady=50.0)


def test_checkpoints_are_counted_by_trigger_with_their_latency() -> None:
    summary = _summary(
        [
            CheckpointSeen("scheduled", 0.3),
            CheckpointSeen("scheduled", 17.5),
            CheckpointSeen("scheduled", 0.5),
            CheckpointSeen("change watch", 0.2),
        ]
    )
    assert summary.seen == Counter({"scheduled": 3, "change watch": 1})
    assert (summary.latency_p50, summary.latency_max) == (0.3, 17.5)
    line = format_checkpoints(summary, 60.0)
    assert "3 scheduled in the window (0.05/s" in line
    assert "expects 4.2" in line and "steady state 50.0, 0.83/s" in line
    assert "1 change watch" in line and "max 17.50 s" in line
    empty = _summary([])
    assert empty.latency_max is None and "none decided" in format_checkpoints(empty, 60.0)


def _level(
    final_lag: float, errors: list[str], messages: int = 90_000, scheduled: int = 3
) -> LevelResult:
    return LevelResult(
        shifts=100,
        seconds=90.0,
        server_cores=0.2,
        client_cores=0.3,
        other_cores=0.1,
        rss_bytes=300 << 20,
        messages=messages,
        expected_messages=90_000,
        lag_p50=0.0,
        lag_p99=0.01,
        lag_max=0.2,
        final_lag_max=final_lag,
        outcomes=Counter(passed=3),
        checkpoints=_summary([CheckpointSeen("scheduled", 0.4)] * scheduled),
        ramp=RampTally(
            logins=100,
            succeeded=100,
            retried=7,
            retries=9,
            most_attempts=3,
            waited=6.5,
            failures=[],
        ),
        ramp_seconds=42.0,
        errors=errors,
        load_average=1.5,
    )


def test_a_level_keeps_up_only_with_every_message_sent_no_backlog_and_no_error() -> None:
    assert _level(0.05, []).keeps_up
    assert not _level(BACKLOG_LIMIT_SECONDS + 0.5, []).keeps_up
    assert not _level(0.05, ["stream: the server ended the stream"]).keeps_up
    # A third of the streams silent (a client gone) is behind even with no lag on the rest.
    assert not _level(0.0, [], messages=61_740).keeps_up
    assert not _level(0.0, ["login: RESOURCE_EXHAUSTED: busy (after 12 attempts)"]).keeps_up
    row = format_level(_level(0.05, []), 0.0019, baseline_rss=100 << 20)
    assert "0.200%" in row  # 20% of a core over 100 streams
    assert "0.300%" in row  # the clients' 30% over 100 streams
    assert "2.00" in row  # (300 - 100) MB over 100 shifts
    assert row.endswith("ok")
    assert format_level(_level(0.0, [], messages=61_740), 0.0, 0).endswith("BEHIND")


def test_the_ramp_line_says_how_many_logins_were_retried_and_how_often() -> None:
    line = format_ramp(_level(0.0, []).ramp, 42.0, 6)
    assert "100 logins in 42 s, at most 6 in flight: 100 passed" in line
    assert "7 retried (9 retries, at most 3 attempts, 6 s of backoff" in line
    assert line.endswith("0 failed")


def test_the_steady_state_adds_the_checkpoints_the_window_lacked() -> None:
    # 3 of the 50 steady-state checkpoints in 90 s: 47 more at 0.4 s each over 90 s.
    level = _level(0.0, [], scheduled=3)
    assert steady_state_cores(level, 0.4, 90.0) == pytest.approx(0.2 + 47 * 0.4 / 90)
    # A window that saw the steady rate already needs nothing added.
    assert steady_state_cores(_level(0.0, [], scheduled=50), 0.4, 90.0) == pytest.approx(0.2)


# --- the server's own counts of the change watch's looks ------------------------------------


def _counted(compared: int, skipped: int, deferred: int) -> Metrics:
    """A server's metrics after these looks and deferred checkpoint attempts."""
    metrics = Metrics()
    for outcome, times in [(LookOutcome.COMPARED, compared), (LookOutcome.SKIPPED_BUSY, skipped)]:
        for _ in range(times):
            metrics.change_watch_looked(outcome)
    metrics.change_watch_looked(LookOutcome.TOO_LITTLE_SPEECH)
    for _ in range(deferred):
        metrics.checkpoint_deferred_busy()
    return metrics


@pytest.fixture
def metrics_page() -> Iterator[tuple[str, list[Metrics]]]:
    """A /metrics page on loopback serving the last of the metrics in the list."""
    served: list[Metrics] = [Metrics()]

    class Page(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = served[-1].exposition()
            self.send_response(200 if self.path == "/metrics" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/metrics", served
    finally:
        server.shutdown()
        server.server_close()


def test_the_window_s_looks_come_from_the_server_s_metrics(
    metrics_page: tuple[str, list[Metrics]],
) -> None:
    url, served = metrics_page
    served.append(_counted(compared=10, skipped=2, deferred=1))
    before = asyncio.run(read_shift_work(url))
    served.append(_counted(compared=250, skipped=9, deferred=4))
    after = asyncio.run(read_shift_work(url))
    assert isinstance(before, ShiftWork) and isinstance(after, ShiftWork)
    assert after.looks["compared"] == 250 and after.checkpoints_deferred_busy == 4
    window = window_shift_work(before, after)
    assert isinstance(window, ShiftWork)
    assert window.looks == Counter(compared=240, skipped_busy=7, too_little_speech=0, failed=0)
    assert window.checkpoints_deferred_busy == 3
    line = format_shift_work(window)
    assert "247 looks due in the window (240 compared, 0 too little speech, 0 failed)" in line
    assert "change-watch looks skipped (busy): 7" in line
    assert line.endswith("checkpoint attempts deferred (busy): 3")


def test_a_server_whose_counters_cannot_be_read_is_reported_not_a_failed_level(
    metrics_page: tuple[str, list[Metrics]],
) -> None:
    url, _ = metrics_page
    # No such page (nor counters on it), and no server at all: the reason, not an exception.
    missing = asyncio.run(read_shift_work(url.replace("/metrics", "/nothing")))
    assert isinstance(missing, str) and "404" in missing
    with pytest.raises(ValueError, match="voxauth_change_watch_looks_total"):
        ShiftWork.parse("# an older server\nvoxauth_ready 1\n")
    gone = asyncio.run(read_shift_work("http://127.0.0.1:1/metrics"))
    assert isinstance(gone, str)
    assert window_shift_work(gone, ShiftWork(Counter(), 0.0)) == gone
    assert format_shift_work(gone).startswith("       change watch: not read")
    assert _level(0.0, []).keeps_up  # not read by default, and the level still keeps up


def test_the_bench_server_serves_its_metrics_on_loopback() -> None:
    environment = server_environment(18443)
    assert environment["VOXAUTH_HTTP_LISTEN"] == "127.0.0.1:18443"
    assert environment["VOXAUTH_REPLAY_DETECTION"] == "0"


def test_the_capacity_figure_says_how_many_looks_the_busy_pool_skipped(
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = Settings([100], 90.0, 4, 5, 2.0, 6, 0.4)
    level = replace(_level(0.0, []), shift_work=ShiftWork(Counter(skipped_busy=12), 0.0))
    _print_steady_state(settings, [level], ShiftPolicy())
    assert "looks (change-watch looks skipped, busy: 12) and the 3 checkpoints" in (
        capsys.readouterr().out
    )
