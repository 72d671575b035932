"""Replay: a recording of the agent played again — an enrollment utterance, an earlier login
or checkpoint captured from the call. Every check's embedding is compared with the agent's
replay fingerprints (the embeddings of its enrollment utterances and recent checks, sealed in
the store like voiceprints, erased with the agent); a match is a replay.

The fingerprint is the embedding the check computes anyway: it says nothing recoverable about
the audio, and a copy of a recording (re-encoded, G.711-coded, gain-changed, a little noise)
embeds almost exactly as the recording does, while another utterance of the same speaker does
not (enrollment/duplicates.py measured both at the threshold used here, 0.93).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np

from models.embedder import Embedding
from server.config import PresentationAttackPolicy
from server.storage.interface import RecordingOrigin, ReplayFingerprint, VoiceprintStore


@dataclass(frozen=True)
class ReplayMatch:
    origin: RecordingOrigin
    recorded_at: datetime
    similarity: float


class ReplayGuard:
    def __init__(self, store: VoiceprintStore, policy: PresentationAttackPolicy) -> None:
        self._store = store
        self._policy = policy

    @property
    def enforced(self) -> bool:
        return self._policy.enforced

    def match(
        self, agent_id: str, model_id: str, embedding: Embedding, at: datetime
    ) -> ReplayMatch | None:
        """The agent's recording that `embedding`, checked at `at`, repeats (the most
        similar), or None. A telephone-band check of a wideband enrollment recording compares
        with its telephone companion."""
        best: ReplayMatch | None = None
        oldest_check = at - timedelta(seconds=self._policy.replay_window_seconds)
        for fingerprint in self._store.fingerprints(agent_id):
            if fingerprint.model_id != model_id:
                continue  # Another model's embeddings live in another space.
            if (
                fingerprint.origin is RecordingOrigin.CHECK
                and fingerprint.recorded_at < oldest_check
            ):
                continue  # Past the window: pruned at the next check.
            similarity = _similarity(embedding, fingerprint)
            if similarity >= self._policy.replay_similarity and (
                best is None or similarity > best.similarity
            ):
                best = ReplayMatch(fingerprint.origin, fingerprint.recorded_at, similarity)
        return best

    def remember(self, agent_id: str, model_id: str, embedding: Embedding, at: datetime) -> None:
        """Keeps the check's fingerprint for the replay window (and at most the configured
        number per agent)."""
        self._store.add_fingerprint(
            ReplayFingerprint(agent_id, model_id, RecordingOrigin.CHECK, at, embedding),
            keep_after=at - timedelta(seconds=self._policy.replay_window_seconds),
            keep=self._policy.max_recent_checks,
        )


def _similarity(embedding: Embedding, fingerprint: ReplayFingerprint) -> float:
    score = float(np.dot(embedding, fingerprint.embedding))
    if fingerprint.telephone_embedding is not None:
        score = max(score, float(np.dot(embedding, fingerprint.telephone_embedding)))
    return score
