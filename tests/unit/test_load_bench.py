"""`voxauth bench load`: its loop against a fake Verify stub, its statistics and its report.
(The benchmark itself runs against a server for minutes, not as a test.)"""

from __future__ import annotations

import asyncio

import pytest
from voxauth.v1 import voxauth_pb2 as pb

from server.tools.load_bench import BenchAgent, LevelReport, Outcome, format_level, run_level
from tests.fakes import BusyVerificationStub


def test_a_level_sends_exactly_the_requests_asked_and_counts_errors_by_code() -> None:
    stub = BusyVerificationStub()
    agents = [BenchAgent(f"a{i}", pb.Audio(), created=True) for i in range(4)]
    report = asyncio.run(run_level(stub, agents, 4, seconds=None, requests=30))  # type: ignore[arg-type]
    assert stub.calls == len(report.outcomes) == 30
    assert stub.agents == {"a0", "a1", "a2", "a3"}  # one agent per caller
    assert report.errors == {"RESOURCE_EXHAUSTED": 10}
    assert report.completed == 20
    p50 = report.percentile(0.5)
    assert p50 is not None and p50 >= 0.01


def test_a_timed_level_stops_by_itself() -> None:
    stub = BusyVerificationStub()
    agents = [BenchAgent("a", pb.Audio(), created=False)]
    report = asyncio.run(run_level(stub, agents, 2, seconds=0.2, requests=None))  # type: ignore[arg-type]
    assert 0.2 <= report.wall_seconds < 1.0
    assert 0 < stub.calls < 100


def test_report_line_has_throughput_percentiles_and_errors() -> None:
    outcomes = [Outcome(0.1 * (i + 1), "OK") for i in range(10)]
    outcomes.append(Outcome(0.001, "RESOURCE_EXHAUSTED"))
    report = LevelReport(16, 2.0, tuple(outcomes))
    assert report.throughput == pytest.approx(5.0)
    assert report.percentile(0.5) == pytest.approx(0.5)
    assert report.percentile(0.99) == pytest.approx(1.0)
    line = format_level(report)
    assert "RESOURCE_EXHAUSTED 1" in line
    assert "   1000" in line  # p99 in ms
    assert LevelReport(1, 1.0, (Outcome(0.1, "UNAVAILABLE"),)).percentile(0.5) is None
