"""Throttling of verification attempts (NIST SP 800-63B-4): the timeline on a test clock, what
counts as a failure, disabling and re-enabling, persistence, concurrent attempts, and what a
client sees over gRPC."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from voxauth.v1 import voxauth_pb2 as pb

from server.config import ThrottlePolicy
from server.errors import (
    ThrottledError,
)
from server.security.crypto import VoiceprintCipher
from server.storage.interface import AgentRecord, Voiceprint
from server.storage.secure_store import SecureStore
from server.storage.sqlite import open_store
from server.verification.service import Decision, VerificationService
from server.verification.throttling import VerificationThrottle
from tests.fake_voice import (
    AGENT_VOICE,
    MODEL_ID,
    MovableNow,
    fake_verification,
)
from tests.support import (
    KEY,
    OTHER_1,
    SPEAKER_A,
    RunningServer,
    first_half,
    second_half,
    split,
    wav_audio,
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






























# --- through VerificationService ----------------------------------------------------------


@pytest.fixture
def clock() -> MovableNow:
    return MovableNow(T0)


@pytest.fixture
def service(store: SecureStore, tmp_path: Path, clock: MovableNow) -> VerificationService:
    store.replace_voiceprint(Voiceprint(AGENT, MODEL_ID, AGENT_VOICE, T0, 3, 20.0), [])
    return fake_verification(store, tmp_path / "scoring", clock)










# --- over gRPC ------------------------------------------------------------------------------


def test_a_throttled_verify_gets_resource_exhausted_with_retry_info(
    voxauth: RunningServer,
) -> None:
    voxauth.enroll(AGENT, split(first_half(SPEAKER_A), 2))
    impostor = wav_audio(second_half(OTHER_1))
    for _ in range(5):
        assert voxauth.verify(AGENT, impostor).decision == pb.DECISION_REJECT
    with pytest.raises(grpc.RpcError) as refused:
        voxauth.verify(AGENT, wav_audio(second_half(SPEAKER_A)))
    error = refused.value
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "retry in 30 s" in error.details()
    status = rpc_status.from_call(error)
    assert status is not None
    [detail] = status.details
    retry = error_details_pb2.RetryInfo()
    assert detail.Unpack(retry)
    assert retry.retry_delay.seconds == 30
