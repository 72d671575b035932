"""Verification: score a voice against the agent's voiceprint and decide by policy."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from server.audit_actions import AuditAction
from server.config import VerificationPolicy
from server.errors import ModelMismatchError, NotEnrolledError
from server.pipeline.analysis import AudioInput, VoiceAnalyser, VoiceSample
from server.pipeline.channel import Channel
from server.pipeline.presentation import PresentationAssessment, PresentationDecision
from server.pipeline.speech import QualityIssue, SpeechAnalysis
from server.runtime.log_format import logged_agent
from server.scoring.calibration import Condition
from server.scoring.gallery import GalleryMatch, Probe
from server.scoring.scorer import LocalThreshold, Score, Scorer
from server.scoring.watchlist import WatchlistScreen
from server.storage.interface import AuditEvent, Voiceprint, VoiceprintStore
from server.validation import validate_agent_id
from server.verification.decision import Decision
from server.verification.replay import ReplayGuard, ReplayMatch
from server.verification.throttling import VerificationThrottle

log = logging.getLogger(__name__)

# Retention counts in years: noting a voiceprint's use once an hour is precise enough and
# spares most checks a write.
_LAST_USE_RESOLUTION = timedelta(hours=1)
# The checks screened against the watchlist: someone presenting themselves. Checkpoints are
# the same caller throughout the shift, screened at its login.
_SCREENED_CHECKS = frozenset({AuditAction.VERIFY, AuditAction.SHIFT_LOGIN})


@dataclass(frozen=True)
class VerificationResult:
    decision: Decision
    score: float
    """Cosine of the test and the voiceprint it was compared with; 0 when INCONCLUSIVE."""
    threshold: float
    """The cosine this check needed (the policy's threshold for this voiceprint, this test and
    its length): ACCEPT exactly when score >= threshold. 0 when INCONCLUSIVE."""
    model_id: str
    quality: SpeechAnalysis
    channel: Channel
    target_fmr: float
    """The false-match rate the threshold was set for."""
    scoring: Score | None
    """AS-norm score, calibrated LLR and their thresholds; None when INCONCLUSIVE."""
    presentation: PresentationAssessment | None = None
    """The presentation-attack check; None when the server runs no PAD. A check it refuses is
    a REJECT whatever the voice scored."""

    watchlist: GalleryMatch | None = None
    """The watchlist entry the voice matched (an alert, audited): screened at Verify and at
    shift logins; None when it matched none or was not screened."""

    min_net_speech_seconds: float = 0.0
    """The net speech a decision on this check's channel needs (the telephone channel's own
    minimum for telephone checks): with less, INCONCLUSIVE with TOO_LITTLE_SPEECH."""

    @property
    def refused_as_attack(self) -> bool:
        return self.presentation is not None and self.presentation.refuses


class VerificationService:
    def __init__(
        self,
        store: VoiceprintStore,
        analyser: VoiceAnalyser,
        policy: VerificationPolicy,
        scorer: Scorer,
        now: Callable[[], datetime],
        throttle: VerificationThrottle,
        replay: ReplayGuard | None = None,
        watchlist: WatchlistScreen | None = None,
    ) -> None:
        self._replay = replay
        self._watchlist = watchlist
        self._store = store
        self._analyser = analyser
        self._policy = policy
        self._scorer = scorer
        self._now = now
        self._throttle = throttle

    def verify(
        self, agent_id: str, audio: AudioInput, *, action: AuditAction = AuditAction.VERIFY
    ) -> VerificationResult:
        """Blocking: runs the model. Cheap checks on the agent and the throttle come before the
        audio work. `action` names the decision in the audit log (a plain Verify, or a shift's
        login). Raises ThrottledError or VerificationDisabledError after too many failures."""
        voiceprint = self.voiceprint_of(agent_id)
        agent_id = voiceprint.agent_id
        self._throttle.check(agent_id, self._now())
        try:
            sample = self._analyse(audio)
            result = self.judge(voiceprint, sample, action=action)
        except BaseException:
            self._throttle.abandon(agent_id)
            raise
        self._throttle.record(agent_id, result.decision, self._now())
        return result

    def screen(
        self, agent_id: str, audio: AudioInput, *, action: AuditAction
    ) -> GalleryMatch | None:
        """Blocking: runs the model. The watchlist screen alone, for a login of an agent with
        no voiceprint yet (a passive enrollment's shift): the watchlist entry the voice
        matches (audited as an alert), or None. Raises InvalidAudioError for bad audio."""
        sample = self._analyse(audio)
        if self._watchlist is None or sample.embedding is None:
            return None
        probe = Probe(sample.embedding, sample.quality.net_speech_seconds, sample.channel)
        return self._watchlist.screen(agent_id, probe, self._analyser.model_id, action)

    def _analyse(self, audio: AudioInput) -> VoiceSample:
        return self._analyser.analyse(
            audio,
            min_net_speech_seconds=self._policy.min_net_speech_for(telephone=False),
            min_telephone_net_speech_seconds=self._policy.min_net_speech_for(telephone=True),
        )

    def min_net_speech_seconds(self, channel: Channel) -> float:
        """The net speech a check on `channel` needs for a decision
        (VerificationPolicy.min_net_speech_for)."""
        return self._policy.min_net_speech_for(telephone=channel is Channel.TELEPHONE)

    def scoring_thresholds(self) -> list[LocalThreshold]:
        """Blocking (may read the voiceprints): per condition, the shipped and the local
        false-match threshold and how many comparisons stand behind the local one."""
        return list(self._scorer.local_thresholds().values())

    def longest_calibrated(self) -> dict[Condition, tuple[float, float]]:
        """Per condition, the longest test and voiceprint (net speech, seconds) the
        calibration measured."""
        return {c: self._scorer.longest_calibrated(c) for c in Condition}

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
        self,
        voiceprint: Voiceprint,
        sample: VoiceSample,
        *,
        action: AuditAction,
        context: Mapping[str, object] | None = None,
    ) -> VerificationResult:
        """Scores an analysed sample against the voiceprint, decides, and audits the decision
        under `action` ("verify", or a shift checkpoint), with `context` (e.g. the shift and
        what triggered its checkpoint) in the record. Not throttled: a checkpoint is no
        attempt of a claimant."""
        result, audit = self.decide(voiceprint, sample, action=action, context=context)
        for event in audit:
            self._store.append_audit(event)
        return result

    def decide(
        self,
        voiceprint: Voiceprint,
        sample: VoiceSample,
        *,
        action: AuditAction,
        context: Mapping[str, object] | None = None,
    ) -> tuple[VerificationResult, tuple[AuditEvent, ...]]:
        """As `judge`, but returns the decision's audit records instead of appending them: for
        a decision that takes effect only if a later write does (a shift checkpoint, whose
        save a lost lease refuses), stored in that write's unit of work, so that no record
        claims a decision that never took effect."""
        model_id = self._analyser.model_id
        scoring = (
            None
            if sample.embedding is None
            else self._scorer.score(
                voiceprint, sample.embedding, sample.quality.net_speech_seconds, sample.channel
            )
        )
        presentation = sample.presentation
        replayed: ReplayMatch | None = None
        if self._replay is not None and sample.embedding is not None:
            replayed = self._replay.match(
                voiceprint.agent_id, model_id, sample.embedding, self._now()
            )
            if replayed is not None:
                presentation = (
                    presentation
                    or PresentationAssessment(
                        0.0, 0.0, PresentationDecision.NOT_ASSESSED, self._replay.enforced
                    )
                ).as_replay()
        if scoring is None:
            decision = Decision.INCONCLUSIVE
        elif presentation is not None and presentation.refuses:
            # REJECT, not INCONCLUSIVE: an INCONCLUSIVE costs nothing, so an attacker could
            # retry a spoof without end; a REJECT counts toward throttling and shift locks.
            decision = Decision.REJECT
        else:
            decision = Decision.ACCEPT if scoring.accepted else Decision.REJECT
        watched = None
        if (
            self._watchlist is not None
            and sample.embedding is not None
            and action in _SCREENED_CHECKS
        ):
            # Audited as an alert; the decision stays the voiceprint's: what to do about
            # the person is the fraud team's call, told by the alert.
            watched = self._watchlist.screen(
                voiceprint.agent_id,
                Probe(sample.embedding, sample.quality.net_speech_seconds, sample.channel),
                model_id,
                action,
            )
        result = VerificationResult(
            decision=decision,
            score=scoring.cosine if scoring else 0.0,
            threshold=scoring.threshold if scoring else 0.0,
            model_id=model_id,
            quality=sample.quality,
            channel=sample.channel,
            target_fmr=self._scorer.target_fmr,
            scoring=scoring,
            presentation=presentation,
            watchlist=watched,
            min_net_speech_seconds=self.min_net_speech_seconds(sample.channel),
        )
        details: dict[str, object] = {
            **(context or {}),
            "score": round(result.score, 4),
            "threshold": round(result.threshold, 4),
            "net_speech_seconds": round(sample.quality.net_speech_seconds, 2),
            "model_id": model_id,
            "channel": sample.channel.value,
            "target_fmr": result.target_fmr,
        }
        if QualityIssue.TOO_LITTLE_SPEECH in sample.quality.issues:
            # Which minimum refused it: telephone checks have their own.
            details["min_net_speech_seconds"] = result.min_net_speech_seconds
        if scoring is not None:
            details |= {
                "condition": scoring.condition.value,
                "normalized_score": round(scoring.normalized, 3),
                "llr": round(scoring.llr, 3),
                "llr_threshold": round(scoring.llr_threshold, 3),
                "decided_by": scoring.decided_by.value,
            }
        if presentation is not None:
            details |= presentation.audit_details()
        if replayed is not None:
            details |= {
                "replay_of": replayed.origin.value,
                "replay_similarity": round(replayed.similarity, 4),
            }
        now = self._now()
        audit = [AuditEvent(action, voiceprint.agent_id, result.decision.value, now, details)]
        if presentation is not None and presentation.decision.suspected:
            # Its own record, so that a SIEM can select suspected spoofs by action.
            audit.append(
                AuditEvent(
                    AuditAction.PRESENTATION_ATTACK,
                    voiceprint.agent_id,
                    presentation.decision.value,
                    now,
                    {"check": action.value, "channel": sample.channel.value}
                    | presentation.audit_details()
                    | ({"replay_of": replayed.origin.value} if replayed is not None else {}),
                )
            )
        if self._replay is not None and sample.embedding is not None:
            self._replay.remember(voiceprint.agent_id, model_id, sample.embedding, now)
        last_used_at = voiceprint.last_used_at
        if scoring is not None and (
            last_used_at is None or now - last_used_at >= _LAST_USE_RESOLUTION
        ):
            self._store.mark_voiceprint_used(voiceprint.agent_id, now)
        log.info(
            "%s agent=%s decision=%s channel=%s condition=%s score=%.3f threshold=%.3f llr=%.2f "
            "net_speech=%.1fs pad=%s",
            action,
            logged_agent(voiceprint.agent_id),
            result.decision.value,
            sample.channel.value,
            scoring.condition.value if scoring else "-",
            result.score,
            result.threshold,
            scoring.llr if scoring else 0.0,
            sample.quality.net_speech_seconds,
            presentation.decision.value if presentation else "-",
        )
        return result, tuple(audit)
