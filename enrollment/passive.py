"""Passive enrollment: an agent HR created with consent and marked for it is enrolled from the
speech of its first shifts, with nothing extra to do.

Each stretch of speech the shift's stream carries (passive_stretch_net_speech_seconds of net
speech) is one enrollment utterance: it passes the same quality gates and the countermeasure
as an utterance HR adds, and one that repeats a stretch already collected is a recording
played into the call, refused and audited as a replay. Once the consistent stretches hold
passive_net_speech_seconds of net speech, from at least passive_min_stretches separate
stretches, the voiceprint is built as FinalizeEnrollment builds it: consistency between the
stretches, then the 1:N search and the watchlist (a match holds it for HR's review), then the
approval policy. Audio stays in memory (the shift's buffer); only embeddings are kept, sealed
as pending utterances are, and erased with the agent.
"""

from __future__ import annotations

from dataclasses import dataclass

from enrollment.service import EnrollmentService, FinalizeOutcome, UtteranceOutcome
from models.embedder import Waveform
from server.config import EnrollmentPolicy
from server.errors import EnrollmentIncompleteError
from server.pipeline.analysis import VoiceAnalyser
from server.storage.interface import VoiceprintStore


@dataclass(frozen=True)
class PassiveStep:
    """What one stretch of a shift's speech did to the agent's passive enrollment."""

    utterance: UtteranceOutcome
    collected_seconds: float
    """Net speech of the pending stretches after this one."""
    finalized: FinalizeOutcome | None = None
    """Set when the stretch completed the enrollment (the voiceprint active, or held)."""


class PassiveEnrollment:
    def __init__(
        self,
        store: VoiceprintStore,
        enrollment: EnrollmentService,
        analyser: VoiceAnalyser,
        policy: EnrollmentPolicy,
    ) -> None:
        self._store = store
        self._enrollment = enrollment
        self._analyser = analyser
        self.policy = policy

    def collecting(self, agent_id: str) -> bool:
        """Whether the agent's shifts collect its speech: marked for passive enrollment, with
        no voiceprint yet and none waiting for review. Blocking (store reads)."""
        return (
            self._store.passive_enrollment(agent_id) is not None
            and self._store.get_voiceprint(agent_id) is None
            and self._store.held_voiceprint(agent_id) is None
        )

    def collect(
        self,
        agent_id: str,
        shift_id: str,
        speech: Waveform,
        stretch: Waveform | None,
        source_rate_hz: int,
    ) -> PassiveStep | None:
        """Blocking (the models): one stretch of the shift's speech, `speech` as the detector
        cut it out of `stretch`, the audio as it arrived (None: the speech itself). None, and
        nothing collected, once the agent is no longer collecting (HR enrolled it meanwhile,
        or a voiceprint waits for review): a shift must not replace a voiceprint."""
        if not self.collecting(agent_id):
            return None
        agent = self._store.get_agent(agent_id)
        sample = self._analyser.analyse_speech(
            speech, source_rate_hz=source_rate_hz, stretch=stretch
        )
        outcome = self._enrollment.add_sample(agent, sample, shift_id=shift_id)
        progress = self._enrollment.progress(agent_id)
        step = PassiveStep(outcome, progress.net_speech_seconds)
        if (
            outcome.record is None
            or progress.net_speech_seconds < self.policy.passive_net_speech_seconds
            or len(progress.pending) < self.policy.passive_min_stretches
        ):
            return step
        try:
            finalized = self._enrollment.finalize(agent_id, passive=True)
        except EnrollmentIncompleteError:
            # Stretches that disagree were discarded (audited); collecting goes on.
            remaining = self._enrollment.progress(agent_id).net_speech_seconds
            return PassiveStep(outcome, remaining)
        return PassiveStep(outcome, finalized.voiceprint.net_speech_seconds, finalized)
