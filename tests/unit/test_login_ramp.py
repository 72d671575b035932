"""The capacity benchmark's softphones log in as real ones should: a login refused for load
is retried after a growing, jittered wait (never sooner than the server asked), with the same
request, a bounded number at a time; any other refusal, or the last attempt's, is final for
that login alone. Driven with fakes: no clock, no server."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from server.api.interceptors import retry_delay
from server.tools.login_ramp import (
    Attempted,
    Backoff,
    GaveUp,
    RampTally,
    pushback_seconds,
    ramp,
    with_retries,
)


class Refusal(grpc.RpcError):
    """What a grpc.aio call raises: a code, a message and trailing metadata."""

    def __init__(
        self,
        code: grpc.StatusCode,
        metadata: Sequence[tuple[str, str | bytes]] = (),
    ) -> None:
        self._code = code
        self._metadata = tuple(metadata)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "the server is busy (34 requests in progress); retry shortly"

    def trailing_metadata(self) -> Any:  # grpc.aio's Metadata: (key, value) pairs
        return self._metadata


def _retry_info(seconds: float) -> tuple[tuple[str, str | bytes], ...]:
    """The trailing metadata of server/api/interceptors.py's RESOURCE_EXHAUSTED with a wait."""
    status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message="busy")
    status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=retry_delay(seconds)))
    return tuple(rpc_status.to_status(status).trailing_metadata)


class Sleeps:
    """A fake clock: records each wait, waits for nothing."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        await asyncio.sleep(0)


def test_the_wait_grows_to_its_cap_and_stays_in_the_upper_half_of_its_bound() -> None:
    backoff = Backoff(first=0.5, factor=2.0, cap=8.0)
    bounds = [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    for retry, bound in enumerate(bounds):
        assert backoff.delay(retry, 0.0) == pytest.approx(bound / 2)
        assert backoff.delay(retry, 0.999) == pytest.approx(bound / 2 * 1.999)
    # Two softphones refused together and drawing differently retry apart.
    assert backoff.delay(3, 0.1) != backoff.delay(3, 0.9)


def test_the_server_s_pushback_is_a_floor_never_cut_short() -> None:
    backoff = Backoff(first=0.5, cap=8.0)
    assert backoff.delay(0, 0.5, pushback=3.0) == 3.0
    assert backoff.delay(5, 0.5, pushback=1.0) == pytest.approx(6.0)


@pytest.mark.parametrize(
    "bad", [dict(first=0.0), dict(factor=0.5), dict(first=2.0, cap=1.0), dict(attempts=0)]
)
def test_a_backoff_that_could_not_back_off_is_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Backoff(**bad)  # type: ignore[arg-type]


def test_pushback_is_read_from_retry_info_and_from_the_grpc_header() -> None:
    busy = grpc.StatusCode.RESOURCE_EXHAUSTED
    assert pushback_seconds(Refusal(busy, _retry_info(2))) == 2.0
    # The inference pool's hints are fractions of a second: nanos count, not seconds alone.
    assert pushback_seconds(Refusal(busy, _retry_info(0.5))) == 0.5
    assert pushback_seconds(Refusal(busy, _retry_info(4.125))) == 4.125
    assert pushback_seconds(Refusal(busy, [("grpc-retry-pushback-ms", "1500")])) == 1.5
    both = [*_retry_info(1), ("grpc-retry-pushback-ms", "4000")]
    assert pushback_seconds(Refusal(busy, both)) == 4.0
    # None asked for (the pending-utterance bound's refusal).
    assert pushback_seconds(Refusal(busy)) is None
    # gRPC's "do not retry" (negative) and garbage are ignored, not a crash.
    assert pushback_seconds(Refusal(busy, [("grpc-retry-pushback-ms", "-1")])) is None
    assert pushback_seconds(Refusal(busy, [("grpc-retry-pushback-ms", "soon")])) is None


def test_a_login_refused_for_load_is_retried_with_the_same_request_until_it_passes() -> None:
    asyncio.run(_a_login_refused_for_load_is_retried_with_the_same_request_until_it_passes())


async def _a_login_refused_for_load_is_retried_with_the_same_request_until_it_passes() -> None:
    sent: list[str] = []
    refusals = [
        Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED),
        Refusal(grpc.StatusCode.UNAVAILABLE),
        Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, _retry_info(5)),
    ]

    async def start_shift() -> str:
        sent.append("request-7")  # the caller's request id, built once
        if refusals:
            raise refusals.pop(0)
        return "shift-7"

    sleeps = Sleeps()
    result = await with_retries(start_shift, Backoff(first=1.0), sleep=sleeps, draw=lambda: 0.0)
    assert (result.value, result.attempts) == ("shift-7", 4)
    assert result.waited == pytest.approx(sum(sleeps.waits))
    assert sent == ["request-7"] * 4
    # 0.5, 1 (the bound doubling, the lower half), then the server's 5 s over the drawn 2.
    assert sleeps.waits == [0.5, 1.0, 5.0]


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    ],
)
def test_a_refusal_that_is_not_about_load_is_final_at_once(code: grpc.StatusCode) -> None:
    asyncio.run(_a_refusal_that_is_not_about_load_is_final_at_once(code))


async def _a_refusal_that_is_not_about_load_is_final_at_once(code: grpc.StatusCode) -> None:
    calls = 0

    async def start_shift() -> str:
        nonlocal calls
        calls += 1
        raise Refusal(code)

    sleeps = Sleeps()
    with pytest.raises(GaveUp) as gave_up:
        await with_retries(start_shift, Backoff(), sleep=sleeps, draw=lambda: 0.5)
    assert calls == 1 and sleeps.waits == []
    assert gave_up.value.attempts == 1 and gave_up.value.error.code() is code


def test_a_login_refused_on_every_attempt_gives_up_after_the_last() -> None:
    asyncio.run(_a_login_refused_on_every_attempt_gives_up_after_the_last())


async def _a_login_refused_on_every_attempt_gives_up_after_the_last() -> None:
    calls = 0

    async def start_shift() -> str:
        nonlocal calls
        calls += 1
        raise Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED)

    sleeps = Sleeps()
    with pytest.raises(GaveUp, match=r"RESOURCE_EXHAUSTED.*after 4 attempts") as gave_up:
        await with_retries(start_shift, Backoff(attempts=4), sleep=sleeps, draw=lambda: 0.5)
    assert calls == 4 and len(sleeps.waits) == 3  # no wait after the last
    assert gave_up.value.waited == pytest.approx(sum(sleeps.waits))


def test_logins_in_flight_stay_within_the_gate_and_a_backoff_holds_no_turn() -> None:
    asyncio.run(_logins_in_flight_stay_within_the_gate_and_a_backoff_holds_no_turn())


async def _logins_in_flight_stay_within_the_gate_and_a_backoff_holds_no_turn() -> None:
    gate = asyncio.Semaphore(3)
    in_flight = most = 0
    refused_once: set[int] = set()
    release = asyncio.Event()

    async def start_shift(index: int) -> int:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            if index % 2 and index not in refused_once:
                refused_once.add(index)
                raise Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED)
            await release.wait()
            return index
        finally:
            in_flight -= 1

    sleep = Sleeps()

    async def login(index: int) -> Attempted[int]:
        return await with_retries(
            lambda: start_shift(index), Backoff(), sleep=sleep, draw=lambda: 0.0, gate=gate
        )

    task = asyncio.ensure_future(ramp(list(range(10)), login))
    for _ in range(50):
        await asyncio.sleep(0)
    assert in_flight == 3 and most == 3  # a full gate, never more
    release.set()
    outcomes = await task
    assert most == 3
    assert sorted(o.value for o in outcomes if isinstance(o, Attempted)) == list(range(10))
    tally = RampTally.of(outcomes)
    assert (tally.logins, tally.succeeded, tally.retried, tally.retries) == (10, 10, 5, 5)
    assert tally.most_attempts == 2 and not tally.failures


def test_a_login_that_fails_is_counted_and_stops_no_other() -> None:
    asyncio.run(_a_login_that_fails_is_counted_and_stops_no_other())


async def _a_login_that_fails_is_counted_and_stops_no_other() -> None:
    async def login(index: int) -> Attempted[str]:
        if index == 2:
            raise GaveUp(Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED), attempts=12, waited=150.0)
        if index == 4:
            raise RuntimeError("login of bench-x not verified")
        return Attempted(f"shift-{index}", attempts=1 + index % 2, waited=0.5 * (index % 2))

    outcomes = await ramp(list(range(6)), login)
    assert [o.value for o in outcomes if isinstance(o, Attempted)] == [
        "shift-0",
        "shift-1",
        "shift-3",
        "shift-5",
    ]
    tally = RampTally.of(outcomes)
    assert (tally.logins, tally.succeeded) == (6, 4)
    # The one that gave up retried too: 11 retries of its own plus one each of 1, 3, 5.
    assert (tally.retried, tally.retries, tally.most_attempts) == (4, 14, 12)
    assert tally.waited == pytest.approx(151.5)
    assert len(tally.failures) == 2
    assert "after 12 attempts" in tally.failures[0] and "not verified" in tally.failures[1]
    merged = RampTally.merged([tally, RampTally.of([])])
    assert merged == tally
