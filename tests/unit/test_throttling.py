"""Throttling of verification attempts (NIST SP 800-63B-4): the timeline on a test clock, what
counts as a failure, disabling and re-enabling, persistence and concurrent attempts (what a
client sees over gRPC is in tests/e2e/test_throttling_e2e.py)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from server.audit_actions import AuditAction
from server.config import ServerConfig, ThrottlePolicy
from server.errors import (
    AgentNotFoundError,
    ConfigurationError,
    InvalidAudioError,
    ThrottledError,
    VerificationDisabledError,
)
from server.pipeline.analysis import AudioInput, VoiceSample
from server.pipeline.speech import SpeechAnalysis
from server.security.crypto import VoiceprintCipher
from server.storage.interface import AgentRecord, ThrottleState, Voiceprint
from server.storage.secure_store import SecureStore
from server.storage.sqlite import open_store
from server.verification.decision import Decision
from server.verification.service import VerificationService
from server.verification.throttling import VerificationThrottle, delay_after
from tests.clock import ManualClock
from tests.fakes import (
    AGENT_AUDIO,
    AGENT_VOICE,
    IMPOSTOR_AUDIO,
    IMPOSTOR_VOICE,
    MODEL_ID,
    TOO_SHORT_AUDIO,
    fake_verification,
)
from tests.support import (
    KEY,
)

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
AGENT = "agent-7"
POLICY = ThrottlePolicy()
CIPHER = VoiceprintCipher(KEY)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "voxauth.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[SecureStore]:
    opened = open_store(db_path, CIPHER)
    opened.create_agent(AgentRecord(AGENT, "Agent Seven", "HR-7", T0))
    yield opened
    opened.close()


@pytest.fixture
def throttle(store: SecureStore) -> VerificationThrottle:
    return VerificationThrottle(store, POLICY)


def attempt(throttle: VerificationThrottle, seconds: float, decision: Decision) -> None:
    """One admitted attempt, decided at once; raises if the throttle refuses it."""
    throttle.check(AGENT, at(seconds))
    throttle.record(AGENT, decision, at(seconds))


def fail(throttle: VerificationThrottle, seconds: float) -> None:
    attempt(throttle, seconds, Decision.REJECT)


def refused_for(throttle: VerificationThrottle, seconds: float) -> float:
    """The wait the throttle asks of an attempt at `seconds` (it must refuse it)."""
    with pytest.raises(ThrottledError) as refused:
        throttle.check(AGENT, at(seconds))
    return refused.value.retry_after_seconds


def test_five_failures_are_free_then_waits_double_from_30_s(
    throttle: VerificationThrottle,
) -> None:
    for n in range(5):
        fail(throttle, n)
    # The wait counts from the 5th failure, at t = 4 s.
    assert refused_for(throttle, 4) == 30
    assert refused_for(throttle, 20) == 14
    assert refused_for(throttle, 33.5) == 1
    t = 34.0
    for wait in (60, 120, 240, 480):
        fail(throttle, t)
        assert refused_for(throttle, t) == wait
        assert refused_for(throttle, t + wait - 1) == 1
        t += wait


def test_the_refusal_says_how_long_to_wait(throttle: VerificationThrottle) -> None:
    for _ in range(5):
        fail(throttle, 0)
    with pytest.raises(ThrottledError) as refused:
        throttle.check(AGENT, at(0))
    assert (
        refused.value.message == f"too many failed verifications for agent {AGENT}: retry in 30 s"
    )


def test_the_delay_is_capped_at_a_day() -> None:
    assert [delay_after(n, POLICY).total_seconds() for n in (0, 4, 5, 6, 7, 16)] == [
        0,
        0,
        30,
        60,
        120,
        30 * 2**11,
    ]
    assert delay_after(17, POLICY) == timedelta(days=1)
    assert delay_after(10**9, POLICY) == timedelta(days=1)


def test_accept_resets_the_count(throttle: VerificationThrottle) -> None:
    for n in range(5):
        fail(throttle, n)
    attempt(throttle, 34, Decision.ACCEPT)
    for n in range(5):
        fail(throttle, 35 + n)
    assert refused_for(throttle, 39) == 30


def test_inconclusive_counts_neither_way(throttle: VerificationThrottle) -> None:
    for n in range(4):
        fail(throttle, n)
    attempt(throttle, 4, Decision.INCONCLUSIVE)
    attempt(throttle, 5, Decision.INCONCLUSIVE)
    fail(throttle, 6)  # the 5th failure: still free
    assert refused_for(throttle, 6) == 30
    # Once throttled, an inconclusive attempt leaves the count at 5 (the next wait is 30 s, not
    # 60 s) but has used its slot: the wait runs from it.
    attempt(throttle, 36, Decision.INCONCLUSIVE)
    assert refused_for(throttle, 40) == 26


def test_fifty_failures_disable_until_an_admin_re_enables(
    store: SecureStore, throttle: VerificationThrottle
) -> None:
    t = 0.0
    for n in range(50):
        t += delay_after(n, POLICY).total_seconds()
        fail(throttle, t)
    disabled_at = at(t)
    for later in (t, t + 86_400 * 365):
        with pytest.raises(VerificationDisabledError) as refused:
            throttle.check(AGENT, at(later))
        assert "administrator must re-enable" in refused.value.message
    [event] = [e for e in store.audit_events(AGENT) if e.action == "throttle.disable"]
    assert (event.outcome, event.at, event.details) == (
        "DISABLED",
        disabled_at,
        {"consecutive_failures": 50},
    )

    previous = throttle.re_enable(AGENT, reason="ticket 4711", by="admin", now=at(t + 1))
    assert previous == ThrottleState(50, disabled_at, disabled_at)
    [event] = [e for e in store.audit_events(AGENT) if e.action == "throttle.re_enable"]
    assert (event.outcome, event.at, event.details) == (
        "ok",
        at(t + 1),
        {"reason": "ticket 4711", "by": "admin", "consecutive_failures": 50, "was_disabled": True},
    )
    # A fresh start: five free failures again.
    for n in range(5):
        fail(throttle, t + 1 + n)
    assert refused_for(throttle, t + 5) == 30


def test_an_accept_in_flight_does_not_lift_a_disable(throttle: VerificationThrottle) -> None:
    t = 0.0
    for n in range(49):
        t += delay_after(n, POLICY).total_seconds()
        fail(throttle, t)
    t += delay_after(49, POLICY).total_seconds()
    throttle.check(AGENT, at(t))
    throttle.record(AGENT, Decision.REJECT, at(t))  # the 50th failure
    throttle.record(AGENT, Decision.ACCEPT, at(t))  # an attempt admitted before it settles
    with pytest.raises(VerificationDisabledError):
        throttle.check(AGENT, at(t + 86_400))


def test_re_enabling_an_unknown_agent(throttle: VerificationThrottle) -> None:
    with pytest.raises(AgentNotFoundError):
        throttle.re_enable("nobody", reason="r", by="admin", now=at(0))


def test_counts_survive_a_restart(db_path: Path, store: SecureStore) -> None:
    throttle = VerificationThrottle(store, POLICY)
    for n in range(5):
        fail(throttle, n)
    store.close()
    reopened = open_store(db_path, CIPHER)
    try:
        assert refused_for(VerificationThrottle(reopened, POLICY), 10) == 24
    finally:
        reopened.close()


def test_an_attempt_counts_as_failed_until_it_is_decided(throttle: VerificationThrottle) -> None:
    for n in range(4):
        fail(throttle, n)
    throttle.check(AGENT, at(10))  # the 5th attempt, still running
    # A concurrent 6th would be beyond the free failures: it waits for the 5th.
    assert refused_for(throttle, 10) == 30
    throttle.record(AGENT, Decision.INCONCLUSIVE, at(11))
    fail(throttle, 12)


def test_concurrent_attempts_after_the_limit_let_one_through(
    throttle: VerificationThrottle,
) -> None:
    for n in range(5):
        fail(throttle, n)
    callers = 8
    start = threading.Barrier(callers)

    def try_once(_: int) -> bool:
        start.wait()
        try:
            throttle.check(AGENT, at(60))
        except ThrottledError:
            return False
        return True

    with ThreadPoolExecutor(callers) as pool:
        admitted = sum(pool.map(try_once, range(callers)))
    assert admitted == 1


def test_erasing_the_agent_erases_its_count(
    store: SecureStore, throttle: VerificationThrottle
) -> None:
    for n in range(5):
        fail(throttle, n)
    store.delete_agent(AGENT)
    with pytest.raises(AgentNotFoundError):
        throttle.check(AGENT, at(5))
    store.create_agent(AgentRecord(AGENT, "New Seven", "HR-8", at(6)))
    fail(throttle, 7)


def test_policy_from_the_environment() -> None:
    config = ServerConfig.from_environment(
        {
            "VOXAUTH_THROTTLE_FREE_FAILURES": "3",
            "VOXAUTH_THROTTLE_DELAY_SECONDS": "10",
            "VOXAUTH_THROTTLE_MAX_DELAY_SECONDS": "600",
            "VOXAUTH_THROTTLE_DISABLE_AFTER": "20",
        }
    )
    assert config.throttle == ThrottlePolicy(3, 10.0, 600.0, 20)
    assert ServerConfig.from_environment({}).throttle == ThrottlePolicy(5, 30.0, 86_400.0, 50)


@pytest.mark.parametrize(
    "env",
    [
        {"VOXAUTH_THROTTLE_DISABLE_AFTER": "5"},
        {"VOXAUTH_THROTTLE_DELAY_SECONDS": "0"},
        {"VOXAUTH_THROTTLE_DELAY_SECONDS": "100", "VOXAUTH_THROTTLE_MAX_DELAY_SECONDS": "50"},
        {"VOXAUTH_THROTTLE_FREE_FAILURES": "many"},
    ],
)
def test_inconsistent_policy_is_refused(env: dict[str, str]) -> None:
    with pytest.raises(ConfigurationError, match="VOXAUTH_THROTTLE_"):
        ServerConfig.from_environment(env)


# --- through VerificationService ----------------------------------------------------------


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(start=T0)


@pytest.fixture
def service(store: SecureStore, tmp_path: Path, clock: ManualClock) -> VerificationService:
    store.replace_voiceprint(Voiceprint(AGENT, MODEL_ID, AGENT_VOICE, T0, 3, 20.0), [])
    return fake_verification(store, tmp_path / "scoring", clock.now)


def test_verify_and_login_checks_count_and_the_sixth_waits(
    service: VerificationService, clock: ManualClock
) -> None:
    verify, login = AuditAction.VERIFY, AuditAction.SHIFT_LOGIN
    for action in (verify, login, verify, login, verify):
        result = service.verify(AGENT, IMPOSTOR_AUDIO, action=action)
        assert result.decision is Decision.REJECT
    with pytest.raises(ThrottledError):
        service.verify(AGENT, AGENT_AUDIO, action=login)
    clock.advance(timedelta(seconds=30))
    assert service.verify(AGENT, AGENT_AUDIO).decision is Decision.ACCEPT
    # The ACCEPT reset the count.
    for _ in range(5):
        assert service.verify(AGENT, IMPOSTOR_AUDIO).decision is Decision.REJECT


def test_too_little_speech_and_bad_audio_do_not_count(service: VerificationService) -> None:
    for _ in range(4):
        service.verify(AGENT, IMPOSTOR_AUDIO)
    for _ in range(3):
        assert service.verify(AGENT, TOO_SHORT_AUDIO).decision is Decision.INCONCLUSIVE
        with pytest.raises(InvalidAudioError):
            service.verify(AGENT, AudioInput(b"", AGENT_AUDIO.encoding, 16_000))
    service.verify(AGENT, IMPOSTOR_AUDIO)
    with pytest.raises(ThrottledError):
        service.verify(AGENT, IMPOSTOR_AUDIO)


def test_shift_checkpoints_do_not_count(service: VerificationService) -> None:
    voiceprint = service.voiceprint_of(AGENT)
    quality = SpeechAnalysis(8.0, 8.0, -20.0, 0.0, (), np.zeros(8 * 16_000, np.float32))
    for _ in range(20):
        failed = service.judge(
            voiceprint, VoiceSample(quality, IMPOSTOR_VOICE), action=AuditAction.SHIFT_CHECKPOINT
        )
        assert failed.decision is Decision.REJECT
    for _ in range(5):
        service.verify(AGENT, IMPOSTOR_AUDIO)
    with pytest.raises(ThrottledError):
        service.verify(AGENT, IMPOSTOR_AUDIO)


def test_a_disabled_agent_is_refused_before_any_audio_work(
    store: SecureStore, service: VerificationService
) -> None:
    store.update_throttle_state(AGENT, lambda _: ThrottleState(50, T0, T0))
    with pytest.raises(VerificationDisabledError):
        # Audio that would fail to decode: the refusal comes first.
        service.verify(AGENT, AudioInput(b"", AGENT_AUDIO.encoding, 16_000))
