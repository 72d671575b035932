"""Records the contract tests store: agents, utterances and voiceprints with embeddings that
are reproducible from a label."""

from __future__ import annotations

import zlib
from datetime import UTC, datetime, timedelta

import numpy as np

from models.embedder import Embedding
from server.records import AgentRecord, UtteranceRecord, Voiceprint

MODEL = "ecapa-voxceleb-test"
NOW = datetime(2025, 3, 1, 9, 30, 15, 123456, tzinfo=UTC)


def unit_vector(label: str) -> Embedding:
    vector = np.random.default_rng(zlib.crc32(label.encode())).standard_normal(192)
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def agent(agent_id: str) -> AgentRecord:
    return AgentRecord(
        agent_id=agent_id,
        display_name=f"Display {agent_id}",
        consent_reference=f"consent/{agent_id}/2025-03",
        created_at=NOW,
    )


def utterance(agent_id: str, n: int, *, telephone: bool = False) -> UtteranceRecord:
    label = f"{agent_id}-u{n}"
    return UtteranceRecord(
        utterance_id=label,
        agent_id=agent_id,
        model_id=MODEL,
        embedding=unit_vector(label),
        duration_seconds=5.0 + n,
        net_speech_seconds=4.0 + n,
        speech_level_dbfs=-24.5,
        clipped_fraction=0.001,
        received_at=NOW + timedelta(seconds=n),
        telephone_embedding=unit_vector(label + "-phone") if telephone else None,
    )


def voiceprint(
    agent_id: str, label: str, utterance_count: int = 3, *, model_id: str = MODEL
) -> Voiceprint:
    return Voiceprint(
        agent_id=agent_id,
        model_id=model_id,
        embedding=unit_vector(label),
        created_at=NOW + timedelta(minutes=5),
        utterance_count=utterance_count,
        net_speech_seconds=14.5,
        telephone_embedding=unit_vector(label + "-phone"),
    )


def assert_same_voiceprint(actual: Voiceprint | None, expected: Voiceprint) -> None:
    assert actual is not None
    assert actual.embedding.dtype == np.float32
    np.testing.assert_array_equal(actual.embedding, expected.embedding)
    assert actual.telephone_embedding is not None and expected.telephone_embedding is not None
    np.testing.assert_array_equal(actual.telephone_embedding, expected.telephone_embedding)
    assert (actual.agent_id, actual.model_id, actual.created_at) == (
        expected.agent_id,
        expected.model_id,
        expected.created_at,
    )
    assert (actual.utterance_count, actual.net_speech_seconds) == (
        expected.utterance_count,
        expected.net_speech_seconds,
    )
