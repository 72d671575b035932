"""Each audited action commits with its audit record: when writing the record fails (a crash
between the two, as the database sees it), the action is not done either."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from enrollment.service import EnrollmentService
from models.embedder import Embedding, Waveform
from server.config import AudioLimits, EnrollmentPolicy, RetentionPolicy, ThrottlePolicy
from server.errors import AgentNotFoundError, VerificationDisabledError
from server.pipeline.analysis import VoiceAnalyser
from server.pipeline.speech import QualityThresholds
from server.records import AgentRecord, Voiceprint
from server.security.audit import AuditKey, verify_log
from server.security.crypto import VoiceprintCipher
from server.storage.secure_store import SecureStore
from server.verification.decision import Decision
from server.verification.retention import expire_unused_voiceprints
from server.verification.throttling import VerificationThrottle
from tests.fake_storage import CrashError, FailingBackend, failing_sqlite_store
from tests.fakes import AGENT_AUDIO, AGENT_VOICE, MODEL_ID, AllSpeech, FakeEmbedder

KEY = bytes(range(32))
AUDIT_KEY = AuditKey(KEY)
NOW = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
AGENT = "agent-7"


@pytest.fixture
def opened(tmp_path: Path) -> Iterator[tuple[SecureStore, FailingBackend]]:
    store, failing = failing_sqlite_store(tmp_path / "voxauth.db", VoiceprintCipher(KEY), AUDIT_KEY)
    yield store, failing
    store.close()


class TakesEmbedder(FakeEmbedder):
    """The fake agent's voice, a little different on each call, as real takes of one voice
    are: without it a second take would be refused as a copy of the first. Consecutive calls
    differ by cosine 0.85 or less for up to four calls (two takes and their telephone
    companions), well above the consistency threshold and below the duplicate one."""

    def __init__(self) -> None:
        super().__init__()
        self._calls = 0

    def embed(self, waveform: Waveform) -> Embedding:
        voice = super().embed(waveform)
        self._calls += 1
        angle = 1.3 * self._calls
        take = voice + 0.5 * np.array([0, np.cos(angle), np.sin(angle), 0], dtype=np.float32)
        return np.asarray(take / np.linalg.norm(take), dtype=np.float32)


@pytest.fixture
def enrollment(opened: tuple[SecureStore, FailingBackend]) -> EnrollmentService:
    store, _ = opened
    analyser = VoiceAnalyser(TakesEmbedder(), AllSpeech(), QualityThresholds(), AudioLimits())
    policy = replace(EnrollmentPolicy(), required_net_speech_seconds=5.0)
    return EnrollmentService(store, analyser, policy, lambda: NOW)


def assert_chain_intact(store: SecureStore) -> None:
    assert verify_log(store, [AUDIT_KEY]).intact


def test_finalize_stores_no_voiceprint_without_its_record(
    opened: tuple[SecureStore, FailingBackend], enrollment: EnrollmentService
) -> None:
    store, failing = opened
    enrollment.create_agent(AGENT, "Ann Example", "HR-2026-7")
    for _ in range(2):
        enrollment.add_utterance(AGENT, AGENT_AUDIO)

    failing.fail_on = "insert_audit_row"
    with pytest.raises(CrashError):
        enrollment.finalize(AGENT)
    failing.fail_on = None

    assert store.get_voiceprint(AGENT) is None
    assert len(store.pending_utterances(AGENT)) == 2
    assert [e.action for e in store.audit_events(AGENT)] == [
        "agent.create",
        *["enrollment.add"] * 2,
    ]
    outcome = enrollment.finalize(AGENT)
    assert store.get_voiceprint(AGENT) is not None and outcome.voiceprint.utterance_count == 2
    assert store.audit_events(AGENT)[-1].action == "enrollment.finalize"
    assert_chain_intact(store)


def test_no_agent_is_created_or_erased_without_its_record(
    opened: tuple[SecureStore, FailingBackend], enrollment: EnrollmentService
) -> None:
    store, failing = opened
    failing.fail_on = "insert_audit_row"
    with pytest.raises(CrashError):
        enrollment.create_agent(AGENT, "Ann Example", "HR-2026-7")
    failing.fail_on = None
    with pytest.raises(AgentNotFoundError):
        store.get_agent(AGENT)

    enrollment.create_agent(AGENT, "Ann Example", "HR-2026-7")
    failing.fail_on = "insert_audit_row"
    with pytest.raises(CrashError):
        enrollment.delete(AGENT)
    failing.fail_on = None
    assert store.get_agent(AGENT).display_name == "Ann Example"
    assert [e.action for e in store.audit_events(AGENT)] == ["agent.create"]
    assert_chain_intact(store)


def test_verification_is_not_disabled_or_re_enabled_without_its_record(
    opened: tuple[SecureStore, FailingBackend],
) -> None:
    store, failing = opened
    store.create_agent(AgentRecord(AGENT, "Ann", "HR-1", NOW))
    throttle = VerificationThrottle(
        store, replace(ThrottlePolicy(), free_failures=1, disable_after_failures=2)
    )
    throttle.check(AGENT, NOW)
    throttle.record(AGENT, Decision.REJECT, NOW)

    # The second failure disables, after the delay the first one set.
    later = NOW + timedelta(minutes=1)
    throttle.check(AGENT, later)
    failing.fail_on = "insert_audit_row"
    with pytest.raises(CrashError):
        throttle.record(AGENT, Decision.REJECT, later)
    failing.fail_on = None
    # The failure stays counted from its admission, but nothing disabled the agent.
    assert store.update_throttle_state(AGENT, lambda state: state).disabled_at is None

    throttle.record(AGENT, Decision.REJECT, later)
    with pytest.raises(VerificationDisabledError):
        throttle.check(AGENT, later)
    failing.fail_on = "insert_audit_row"
    with pytest.raises(CrashError):
        throttle.re_enable(AGENT, reason="helpdesk call 17", by="admin", now=later)
    failing.fail_on = None
    with pytest.raises(VerificationDisabledError):
        throttle.check(AGENT, later)
    assert [e.action for e in store.audit_events(AGENT)] == ["throttle.disable"]
    assert_chain_intact(store)


def test_no_voiceprint_expires_without_its_record(
    opened: tuple[SecureStore, FailingBackend],
) -> None:
    store, failing = opened
    store.create_agent(AgentRecord(AGENT, "Ann", "HR-1", NOW))
    store.replace_voiceprint(Voiceprint(AGENT, MODEL_ID, AGENT_VOICE, NOW, 2, 8.0), [])
    long_after = NOW + timedelta(days=RetentionPolicy().voiceprint_ttl_days + 1)

    failing.fail_on = "insert_audit_row"
    with pytest.raises(CrashError):
        expire_unused_voiceprints(store, RetentionPolicy(), long_after)
    failing.fail_on = None

    assert store.get_voiceprint(AGENT) is not None
    assert expire_unused_voiceprints(store, RetentionPolicy(), long_after) == [AGENT]
    assert [e.action for e in store.audit_events(AGENT)] == ["voiceprint.expire"]
