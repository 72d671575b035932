"""Duplicate enrollment audio: a copy of a pending utterance is refused with the reason, compared
by the embeddings enrollment keeps (the real model's figures are in tests/e2e)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from enrollment.duplicates import DUPLICATE_SIMILARITY, Fingerprint, find_duplicate, similarity
from enrollment.service import EnrollmentService
from server.config import AudioLimits, EnrollmentPolicy
from server.pipeline.analysis import VoiceAnalyser
from server.pipeline.speech import QualityThresholds
from server.security.crypto import VoiceprintCipher
from server.storage.interface import AgentRecord, Store, UtteranceRecord
from server.storage.sqlite import open_store
from tests.fakes import AGENT_AUDIO, AGENT_VOICE, IMPOSTOR_AUDIO, AllSpeech, FakeEmbedder
from tests.support import KEY

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def unit(*direction: float) -> np.ndarray:
    vector = np.array(direction, dtype=np.float32)
    return vector / np.linalg.norm(vector)


def pending(
    uid: str, embedding: np.ndarray, telephone: np.ndarray | None = None
) -> UtteranceRecord:
    return UtteranceRecord(
        utterance_id=uid,
        agent_id="a1",
        model_id="m",
        embedding=embedding,
        duration_seconds=5.0,
        net_speech_seconds=5.0,
        speech_level_dbfs=-25.0,
        clipped_fraction=0.0,
        received_at=NOW,
        telephone_embedding=telephone,
    )


def test_the_closest_copy_is_found_and_other_utterances_are_not() -> None:
    near, nearer = unit(1, 0.3, 0), unit(1, 0.1, 0)
    other = unit(0, 1, 0)
    found = find_duplicate(
        Fingerprint(unit(1, 0, 0), None),
        [pending("near", near), pending("nearer", nearer), pending("other", other)],
        threshold=0.9,
    )
    assert found is not None
    assert found.of.utterance_id == "nearer"
    assert found.similarity == pytest.approx(float(np.dot(unit(1, 0, 0), nearer)))
    assert find_duplicate(Fingerprint(unit(1, 0, 0), None), [pending("o", other)], 0.9) is None


def test_a_telephone_copy_matches_by_the_companions() -> None:
    # A G.711 copy embeds far from the wideband original, close to its companion.
    original = pending("wide", unit(1, 0, 0), telephone=unit(0, 1, 0))
    copy = Fingerprint(unit(0.5, 0.5, 1), telephone_embedding=unit(0, 1, 0.05))
    assert similarity(copy, Fingerprint(original.embedding, original.telephone_embedding)) > 0.99
    # Without a stored companion (an utterance kept before companions existed), only the
    # embeddings compare.
    older = pending("old", unit(1, 0, 0))
    assert find_duplicate(copy, [older], DUPLICATE_SIMILARITY) is None


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = open_store(tmp_path / "voxauth.db", VoiceprintCipher(KEY))
    opened.create_agent(AgentRecord("a1", "Agent", "HR-1", NOW))
    yield opened
    opened.close()


def enrollment(store: Store) -> EnrollmentService:
    # The fake model gives every sample of the agent's voice the same embedding: to it, two of
    # them are the same recording.
    analyser = VoiceAnalyser(FakeEmbedder(), AllSpeech(), QualityThresholds(), AudioLimits())
    return EnrollmentService(store, analyser, EnrollmentPolicy(), lambda: NOW)


def test_a_copy_of_a_pending_utterance_is_refused_and_not_counted(
    store: Store,
) -> None:
    service = enrollment(store)
    first = service.add_utterance("a1", AGENT_AUDIO)
    assert first.record is not None
    again = service.add_utterance("a1", AGENT_AUDIO)
    assert again.record is None
    assert f"same recording as pending utterance {first.record.utterance_id}" in (
        again.rejection_reason
    )
    assert "record a new utterance" in again.rejection_reason
    assert service.progress("a1").net_speech_seconds == pytest.approx(4.0)
    refusal = store.audit_events("a1")[-1]
    assert refusal.outcome == "rejected"
    assert refusal.details["duplicate_of"] == first.record.utterance_id
    # Another voice is no copy.
    assert service.add_utterance("a1", IMPOSTOR_AUDIO).record is not None


def test_pending_utterances_of_another_model_are_not_compared(
    store: Store,
) -> None:
    store.add_utterance(pending("old-model", AGENT_VOICE), max_pending=32)
    assert enrollment(store).add_utterance("a1", AGENT_AUDIO).record is not None
