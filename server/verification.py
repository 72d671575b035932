"""Verification: score a voice against the agent's voiceprint and decide by policy."""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from models.embedder import Embedding
from server.agents import validate_agent_id
from server.config import VerificationPolicy
from server.errors import ModelMismatchError, NotEnrolledError
from server.speech import SpeechAnalysis
from server.store import AuditEvent, Voiceprint, VoiceprintStore
from server.voice import AudioInput, VoiceAnalyser, VoiceSample

log = logging.getLogger(__name__)


class Decision(enum.Enum):
    ACCEPT = "ACCEPT"
    REJECT = "REJECT"
    INCONCLUSIVE = "INCONCLUSIVE"
    """Too little speech to decide: not a failure, the caller should ask for more speech."""


@dataclass(frozen=True)
class VerificationResult:
    decision: Decision
    score: float
    threshold: float
    model_id: str
    quality: SpeechAnalysis


def cosine_score(embedding: Embedding, voiceprint: Embedding) -> float:
    """Both are L2-normalised, so the dot product is the cosine similarity."""
    return float(np.clip(np.dot(embedding, voiceprint), -1.0, 1.0))


def decide(score: float, policy: VerificationPolicy) -> Decision:
    return Decision.ACCEPT if score >= policy.threshold else Decision.REJECT


class VerificationService:
    def __init__(
        self,
        store: VoiceprintStore,
        analyser: VoiceAnalyser,
        policy: VerificationPolicy,
        now: Callable[[], datetime],
    ) -> None:
        self._store = store
        self._analyser = analyser
        self._policy = policy
        self._now = now

    def verify(self, agent_id: str, audio: AudioInput) -> VerificationResult:
        """Blocking: runs the model. Cheap checks on the agent come before the audio work."""
        voiceprint = self.voiceprint_of(agent_id)
        sample = self._analyser.analyse(
            audio, min_net_speech_seconds=self._policy.min_net_speech_seconds
        )
        return self.judge(voiceprint, sample, action="verify")

    def voiceprint_of(self, agent_id: str) -> Voiceprint:
        """The agent's voiceprint, if it can be compared with this server's model."""
        agent = self._store.get_agent(validate_agent_id(agent_id))
        voiceprint = self._store.get_voiceprint(agent.agent_id)
        if voiceprint is None:
            raise NotEnrolledError(f"agent {agent.agent_id} has no voiceprint yet: enroll first")
        model_id = self._analyser.model_id
        if voiceprint.model_id != model_id:
            # Embeddings of different models are not comparable; a score would be meaningless.
            raise ModelMismatchError(
                f"the voiceprint of agent {agent.agent_id} was made by model "
                f"{voiceprint.model_id}, but this server runs {model_id}: re-enroll the agent"
            )
        return voiceprint

    def judge(
        self, voiceprint: Voiceprint, sample: VoiceSample, *, action: str
    ) -> VerificationResult:
        """Scores an analysed sample against the voiceprint, decides, and audits the decision
        under `action` ("verify", or a shift checkpoint)."""
        model_id = self._analyser.model_id
        if sample.embedding is None:
            result = VerificationResult(
                Decision.INCONCLUSIVE, 0.0, self._policy.threshold, model_id, sample.quality
            )
        else:
            score = cosine_score(sample.embedding, voiceprint.embedding)
            result = VerificationResult(
                decide(score, self._policy), score, self._policy.threshold, model_id, sample.quality
            )
        self._store.append_audit(
            AuditEvent(
                action,
                voiceprint.agent_id,
                result.decision.value,
                self._now(),
                {
                    "score": round(result.score, 4),
                    "threshold": result.threshold,
                    "net_speech_seconds": round(sample.quality.net_speech_seconds, 2),
                    "model_id": model_id,
                },
            )
        )
        log.info(
            "%s agent=%s decision=%s score=%.3f threshold=%.3f net_speech=%.1fs",
            action,
            voiceprint.agent_id,
            result.decision.value,
            result.score,
            result.threshold,
            sample.quality.net_speech_seconds,
        )
        return result
