"""The audio budget: claims beyond it are refused at once, and every byte comes back however the
request ends, including a cancelled call whose audio a worker is still analysing."""

from __future__ import annotations

import threading
from concurrent.futures import CancelledError, ThreadPoolExecutor

import pytest

from server.errors import AudioBudgetExceededError
from server.runtime.audio_budget import AudioBudget

MIB = 2**20


def test_a_claim_beyond_the_budget_is_refused_and_claims_nothing() -> None:
    budget = AudioBudget(10 * MIB)
    with budget.reserve() as first, budget.reserve() as second:
        first.claim(6 * MIB)
        with pytest.raises(AudioBudgetExceededError) as refused:
            second.claim(5 * MIB)
        assert "6 MiB of 10 MiB" in refused.value.message
        assert refused.value.retry_after_seconds is not None
        assert budget.held_bytes == 6 * MIB
        second.claim(4 * MIB)
        assert budget.held_bytes == 10 * MIB
    assert budget.held_bytes == 0


def test_a_failed_request_returns_its_bytes() -> None:
    budget = AudioBudget(10 * MIB)
    with pytest.raises(ValueError), budget.reserve() as reservation:
        reservation.claim(3 * MIB)
        raise ValueError("bad audio")
    assert budget.held_bytes == 0


def test_closing_twice_returns_the_bytes_once() -> None:
    budget = AudioBudget(10 * MIB)
    other = budget.reserve()
    other.claim(2 * MIB)
    reservation = budget.reserve()
    reservation.claim(3 * MIB)
    reservation.close()
    reservation.close()
    assert budget.held_bytes == 2 * MIB


def test_a_worker_still_analysing_a_cancelled_call_keeps_its_audio_claimed() -> None:
    budget = AudioBudget(10 * MIB)
    started, finish = threading.Event(), threading.Event()

    def analyse() -> str:
        started.set()
        finish.wait(10)
        return "analysed"

    reservation = budget.reserve()
    reservation.claim(4 * MIB)
    with ThreadPoolExecutor(1) as worker:
        result = worker.submit(reservation.held_by(analyse))
        started.wait(10)
        reservation.close()  # the call is cancelled: the worker cannot be stopped
        assert budget.held_bytes == 4 * MIB
        finish.set()
        assert result.result(10) == "analysed"
    assert budget.held_bytes == 0


def test_work_that_would_start_after_its_call_ended_is_not_done() -> None:
    budget = AudioBudget(10 * MIB)
    reservation = budget.reserve()
    reservation.claim(MIB)
    analysed = []
    work = reservation.held_by(lambda: analysed.append(True))
    reservation.close()
    assert budget.held_bytes == 0
    with pytest.raises(CancelledError):
        work()
    assert not analysed
