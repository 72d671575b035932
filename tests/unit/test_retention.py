"""Voiceprint retention: the time of last use, kept by every check that scores against a
voiceprint, and the expiry of voiceprints unused for longer than the policy allows."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from server.audit_actions import AuditAction
from server.config import RetentionPolicy, ServerConfig
from server.errors import ConfigurationError, NotEnrolledError
from server.pipeline.analysis import VoiceSample
from server.pipeline.speech import SpeechAnalysis
from server.security.crypto import VoiceprintCipher, associated_data
from server.storage.interface import AgentRecord, UtteranceRecord, Voiceprint
from server.storage.secure_store import SecureStore
from server.storage.sqlite import open_store
from server.storage.sqlite.schema import MIGRATIONS
from server.verification.decision import Decision
from server.verification.retention import expire_unused_voiceprints
from server.verification.service import VerificationService
from tests.clock import ManualClock
from tests.fakes import (
    AGENT_AUDIO,
    AGENT_VOICE,
    IMPOSTOR_AUDIO,
    MODEL_ID,
    TOO_SHORT_AUDIO,
    fake_verification,
)
from tests.support import KEY

T0 = datetime(2023, 1, 10, 8, 0, tzinfo=UTC)
YEAR = timedelta(days=365)
CIPHER = VoiceprintCipher(KEY)
POLICY = RetentionPolicy()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SecureStore]:
    opened = open_store(tmp_path / "voxauth.db", CIPHER)
    yield opened
    opened.close()


def enroll(store: SecureStore, agent_id: str, at: datetime) -> None:
    store.create_agent(AgentRecord(agent_id, f"Agent {agent_id}", "HR-1", at))
    store.replace_voiceprint(Voiceprint(agent_id, MODEL_ID, AGENT_VOICE, at, 3, 20.0), [])


def last_used(store: SecureStore, agent_id: str) -> datetime | None:
    voiceprint = store.get_voiceprint(agent_id)
    assert voiceprint is not None
    return voiceprint.last_used_at


def test_enrollment_is_the_first_use(store: SecureStore) -> None:
    enroll(store, "a1", T0)
    assert last_used(store, "a1") == T0


def test_expiry_erases_unused_voiceprints_only_and_audits_each(
    store: SecureStore,
) -> None:
    enroll(store, "idle", T0)
    enroll(store, "active", T0)
    store.mark_voiceprint_used("active", T0 + 2 * YEAR)
    enroll(store, "recent", T0 + YEAR)
    store.add_utterance(
        UtteranceRecord("u1", "idle", MODEL_ID, AGENT_VOICE, 3.0, 3.0, -20.0, 0.0, T0), 5
    )
    now = T0 + 3 * YEAR + timedelta(days=1)

    assert expire_unused_voiceprints(store, POLICY, now) == ["idle"]

    assert store.get_voiceprint("idle") is None
    # The agent stays, with its pending enrollment: it can enroll again.
    assert store.get_agent("idle").display_name == "Agent idle"
    assert [u.utterance_id for u in store.pending_utterances("idle")] == ["u1"]
    assert store.get_voiceprint("active") is not None
    assert store.get_voiceprint("recent") is not None
    [event] = [e for e in store.audit_events() if e.action == "voiceprint.expire"]
    assert (event.agent_id, event.outcome, event.at) == ("idle", "ok", now)
    assert expire_unused_voiceprints(store, POLICY, now) == []


def test_the_ttl_is_configurable(store: SecureStore) -> None:
    enroll(store, "a1", T0)
    short = RetentionPolicy(voiceprint_ttl_days=30)
    assert expire_unused_voiceprints(store, short, T0 + timedelta(days=29)) == []
    assert expire_unused_voiceprints(store, short, T0 + timedelta(days=31)) == ["a1"]


def test_ttl_from_the_environment() -> None:
    assert ServerConfig.from_environment({}).retention.voiceprint_ttl_days == 1095
    config = ServerConfig.from_environment({"VOXAUTH_VOICEPRINT_TTL_DAYS": "90"})
    assert config.retention.voiceprint_ttl_days == 90
    for bad in ("0", "-1", "soon"):
        with pytest.raises(ConfigurationError, match="VOXAUTH_VOICEPRINT_TTL_DAYS"):
            ServerConfig.from_environment({"VOXAUTH_VOICEPRINT_TTL_DAYS": bad})


def test_the_time_of_use_never_moves_back(store: SecureStore) -> None:
    enroll(store, "a1", T0)
    store.mark_voiceprint_used("a1", T0 + YEAR)
    store.mark_voiceprint_used("a1", T0 + timedelta(days=1))
    assert last_used(store, "a1") == T0 + YEAR


@pytest.fixture
def service(store: SecureStore, tmp_path: Path) -> tuple[VerificationService, ManualClock]:
    clock = ManualClock(start=T0)
    enroll(store, "a1", T0)
    return fake_verification(store, tmp_path / "scoring", clock.now), clock


def test_verifications_and_checkpoints_keep_the_voiceprint(
    store: SecureStore, service: tuple[VerificationService, ManualClock]
) -> None:
    verification, clock = service
    clock.advance(2 * YEAR)
    assert verification.verify("a1", IMPOSTOR_AUDIO).decision is Decision.REJECT
    assert last_used(store, "a1") == clock.now()

    clock.advance(2 * YEAR)
    voiceprint = verification.voiceprint_of("a1")
    quality = SpeechAnalysis(8.0, 8.0, -20.0, 0.0, (), np.zeros(8 * 16_000, np.float32))
    sample = VoiceSample(quality, AGENT_VOICE)
    verification.judge(voiceprint, sample, action=AuditAction.SHIFT_CHECKPOINT)
    assert last_used(store, "a1") == clock.now()

    # Used a year ago: a 3-year TTL keeps it.
    assert expire_unused_voiceprints(store, POLICY, T0 + 5 * YEAR) == []
    assert expire_unused_voiceprints(store, POLICY, T0 + 7 * YEAR + timedelta(days=1)) == ["a1"]
    with pytest.raises(NotEnrolledError):
        verification.verify("a1", AGENT_AUDIO)


def test_uses_are_recorded_at_most_hourly_and_only_when_scored(
    store: SecureStore, service: tuple[VerificationService, ManualClock]
) -> None:
    verification, clock = service
    clock.advance(YEAR)
    verification.verify("a1", AGENT_AUDIO)
    clock.advance(timedelta(minutes=59))
    verification.verify("a1", AGENT_AUDIO)
    assert last_used(store, "a1") == T0 + YEAR
    clock.advance(timedelta(minutes=2))
    assert verification.verify("a1", TOO_SHORT_AUDIO).decision is Decision.INCONCLUSIVE
    assert last_used(store, "a1") == T0 + YEAR
    verification.verify("a1", AGENT_AUDIO)
    assert last_used(store, "a1") == clock.now()


def test_an_upgraded_store_counts_from_the_latest_audited_check(tmp_path: Path) -> None:
    """Voiceprints stored before last use was recorded must not look unused since enrollment."""
    path = tmp_path / "old.db"
    [mine] = [n for n, step in enumerate(MIGRATIONS) if "verification_throttle" in step[0]]
    micros = 1_000_000

    def at(moment: datetime) -> int:
        return int(moment.timestamp()) * micros

    with closing(sqlite3.connect(path)) as conn, conn:
        for step in MIGRATIONS[:mine]:
            for statement in step:
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {mine}")
        for agent_id in ("verified", "idle"):
            blob = CIPHER.encrypt_embedding(
                AGENT_VOICE,
                associated=associated_data(
                    agent_id=agent_id, record_kind="voiceprint", model_id=MODEL_ID
                ),
            )
            conn.execute("INSERT INTO agents VALUES (?, ?, ?, ?)", (agent_id, "A", "HR-1", at(T0)))
            conn.execute(
                "INSERT INTO voiceprints (agent_id, model_id, embedding, created_at, "
                "utterance_count, net_speech_seconds) VALUES (?, ?, ?, ?, 3, 20.0)",
                (agent_id, MODEL_ID, blob, at(T0)),
            )
        audit = (
            "INSERT INTO audit (at, action, agent_id, outcome, details) VALUES (?, ?, ?, ?, '{}')"
        )
        conn.execute(audit, (at(T0 + 2 * YEAR), "shift.login", "verified", "REJECT"))
        conn.execute(audit, (at(T0 + 3 * YEAR), "verify", "verified", "INCONCLUSIVE"))
        conn.execute(audit, (at(T0 + 2 * YEAR), "agent.create", "idle", "ok"))

    upgraded = open_store(path, CIPHER)
    try:
        assert last_used(upgraded, "verified") == T0 + 2 * YEAR
        assert last_used(upgraded, "idle") == T0
    finally:
        upgraded.close()
