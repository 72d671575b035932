"""The enrollment use cases of the HR workflow: create an agent, collect utterances, build or
rebuild the voiceprint, erase the agent. Every step is audited (never with audio or embeddings).
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

from enrollment.duplicates import DUPLICATE_SIMILARITY, Fingerprint, find_duplicate
from enrollment.voiceprint import (
    RejectedUtterance,
    check_consistency,
    companion_embedding,
    mean_embedding,
)
from server.audit_actions import AuditAction
from server.config import EnrollmentPolicy
from server.errors import EnrollmentIncompleteError
from server.pipeline.analysis import ReceivedAudio, VoiceAnalyser
from server.pipeline.presentation import PresentationAssessment
from server.pipeline.speech import QualityIssue, SpeechAnalysis
from server.records import (
    AgentRecord,
    AuditEvent,
    RecordingOrigin,
    ReplayFingerprint,
    UtteranceRecord,
    Voiceprint,
)
from server.runtime.log_format import logged_agent
from server.storage.interface import UnitOfWork, VoiceprintStore
from server.validation import validate_agent_id, validate_text

log = logging.getLogger(__name__)

T = TypeVar("T")

Completion = Callable[[UnitOfWork, T], None]
"""Runs in a use case's unit of work with its outcome: what it writes commits with it."""

# The enrollment fingerprints kept per agent (the newest): two full enrollments' worth at the
# limit of pending utterances.
_ENROLLMENT_FINGERPRINTS = 64


@dataclass(frozen=True)
class UtteranceOutcome:
    """What happened to one submitted utterance."""

    quality: SpeechAnalysis
    received_at: datetime
    record: UtteranceRecord | None
    """The kept utterance; None when it failed the quality gates."""
    rejection_reason: str = ""
    presentation: PresentationAssessment | None = None
    """The presentation-attack check; None when the server runs no PAD or the utterance
    failed the quality gates first."""


@dataclass(frozen=True)
class EnrollmentProgress:
    agent: AgentRecord
    pending: list[UtteranceRecord]
    net_speech_seconds: float
    required_net_speech_seconds: float
    voiceprint: Voiceprint | None

    @property
    def ready_to_finalize(self) -> bool:
        return self.net_speech_seconds >= self.required_net_speech_seconds


@dataclass(frozen=True)
class FinalizeOutcome:
    voiceprint: Voiceprint
    replaced_previous: bool
    rejected: list[RejectedUtterance]


class EnrollmentService:
    def __init__(
        self,
        store: VoiceprintStore,
        analyser: VoiceAnalyser,
        policy: EnrollmentPolicy,
        now: Callable[[], datetime],
    ) -> None:
        self._store = store
        self._analyser = analyser
        self._policy = policy
        self._now = now
        # Looking for a copy among the pending utterances and adding the new one are one step:
        # two copies sent at once must not both find none.
        self._adding = threading.Lock()

    def create_agent(
        self,
        agent_id: str,
        display_name: str,
        consent_reference: str,
        record_completion: Completion[AgentRecord] | None = None,
    ) -> AgentRecord:
        """`record_completion`, as in every use case that takes it, runs in the unit of work
        with the outcome, so what it writes (a request id's completion) commits with it."""
        agent = AgentRecord(
            agent_id=validate_agent_id(agent_id),
            display_name=validate_text(display_name, "display_name", 256),
            # Biometric data may only be collected under a recorded consent (GDPR art. 9).
            consent_reference=validate_text(consent_reference, "consent_reference", 256),
            created_at=self._now(),
        )
        created = self._event(AuditAction.AGENT_CREATE, agent.agent_id, "ok")
        with self._store.unit_of_work(f"create agent {agent.agent_id!r}") as unit:
            unit.create_agent(agent)
            unit.append_audit(created)
            if record_completion is not None:
                record_completion(unit, agent)
        _log(created)
        return agent

    def add_utterance(self, agent_id: str, audio: ReceivedAudio) -> UtteranceOutcome:
        """Blocking: runs the model. The audio is analysed and dropped; only the embedding and
        the quality figures are kept."""
        agent = self._store.get_agent(validate_agent_id(agent_id))
        sample = self._analyser.analyse(
            audio, min_net_speech_seconds=self._policy.min_utterance_net_speech_seconds
        )
        received_at = self._now()
        quality = sample.quality
        # Quiet or clipped audio would still embed, but into a poorer voiceprint: refuse it so
        # HR can re-record while the agent is there.
        if sample.embedding is None or quality.issues:
            reason = _quality_rejection(quality, self._policy.min_utterance_net_speech_seconds)
            rejected = self._event(
                AuditAction.ENROLLMENT_ADD, agent.agent_id, "rejected", reason=reason
            )
            self._store.append_audit(rejected)
            _log(rejected)
            return UtteranceOutcome(quality, received_at, None, reason, sample.presentation)
        presentation = sample.presentation
        if presentation is not None and presentation.decision.suspected:
            reason = (
                f"taken for a presentation attack (synthetic, converted or replayed speech): "
                f"countermeasure score {presentation.score:.2f}, below the "
                f"{presentation.threshold:.2f} a live voice on the {sample.channel.value} channel "
                "needs; record the agent speaking live"
            )
            suspected = self._event(
                AuditAction.PRESENTATION_ATTACK,
                agent.agent_id,
                presentation.decision.value,
                check=AuditAction.ENROLLMENT_ADD.value,
                channel=sample.channel.value,
                **presentation.audit_details(),
            )
            if presentation.enforced:
                rejected = self._event(
                    AuditAction.ENROLLMENT_ADD, agent.agent_id, "rejected", reason=reason
                )
                with self._store.unit_of_work(f"refuse an utterance of {agent.agent_id!r}") as unit:
                    unit.append_audit(suspected)
                    unit.append_audit(rejected)
                _log(rejected)
                return UtteranceOutcome(quality, received_at, None, reason, presentation)
            self._store.append_audit(suspected)
        model_id = self._analyser.model_id
        telephone = self._analyser.telephone_embedding(quality.speech)
        # One add at a time, so two copies sent at once cannot both pass the duplicate check.
        with self._adding:
            pending = [
                u for u in self._store.pending_utterances(agent.agent_id) if u.model_id == model_id
            ]
            duplicate = find_duplicate(
                Fingerprint(sample.embedding, telephone), pending, DUPLICATE_SIMILARITY
            )
            if duplicate is not None:
                copied = duplicate.of.utterance_id
                reason = (
                    f"the same recording as pending utterance {copied} (similarity "
                    f"{duplicate.similarity:.3f}, at least {DUPLICATE_SIMILARITY:.2f} is a copy): "
                    "a recording counts once; record a new utterance"
                )
                rejected = self._event(
                    AuditAction.ENROLLMENT_ADD,
                    agent.agent_id,
                    "rejected",
                    reason=reason,
                    duplicate_of=copied,
                )
                self._store.append_audit(rejected)
                _log(rejected)
                return UtteranceOutcome(quality, received_at, None, reason, presentation)
            record = UtteranceRecord(
                utterance_id=uuid.uuid4().hex,
                agent_id=agent.agent_id,
                model_id=model_id,
                embedding=sample.embedding,
                duration_seconds=quality.duration_seconds,
                net_speech_seconds=quality.net_speech_seconds,
                speech_level_dbfs=quality.speech_level_dbfs,
                clipped_fraction=quality.clipped_fraction,
                received_at=received_at,
                telephone_embedding=telephone,
            )
            added = self._event(
                AuditAction.ENROLLMENT_ADD,
                agent.agent_id,
                "ok",
                utterance_id=record.utterance_id,
                net_speech_seconds=round(quality.net_speech_seconds, 2),
            )
            with self._store.unit_of_work(f"add utterance for agent {agent.agent_id!r}") as unit:
                unit.add_utterance(record, self._policy.max_pending_utterances)
                unit.append_audit(added)
        _log(added)
        return UtteranceOutcome(quality, received_at, record, presentation=presentation)

    def progress(self, agent_id: str) -> EnrollmentProgress:
        agent = self._store.get_agent(validate_agent_id(agent_id))
        pending = self._store.pending_utterances(agent.agent_id)
        return EnrollmentProgress(
            agent=agent,
            pending=pending,
            net_speech_seconds=sum(u.net_speech_seconds for u in pending),
            required_net_speech_seconds=self._policy.required_net_speech_seconds,
            voiceprint=self._store.get_voiceprint(agent.agent_id),
        )

    def finalize(
        self, agent_id: str, record_completion: Completion[FinalizeOutcome] | None = None
    ) -> FinalizeOutcome:
        """Builds the voiceprint from the pending utterances and swaps it in atomically: the
        utterances it consumes or rejects, the voiceprint and the audit records commit
        together."""
        agent_id = validate_agent_id(agent_id)
        with self._store.unit_of_work(f"finalize the enrollment of agent {agent_id!r}") as unit:
            result = self._finalize(unit, agent_id)
            for event in result.events:
                unit.append_audit(event)
            if record_completion is not None and isinstance(result.outcome, FinalizeOutcome):
                record_completion(unit, result.outcome)
        for event in result.events:
            _log(event)
        if isinstance(result.outcome, EnrollmentIncompleteError):
            # Raised once the unit has committed: the rejected utterances stay discarded.
            raise result.outcome
        return result.outcome

    def _finalize(self, unit: UnitOfWork, agent_id: str) -> _Finalized:
        agent = unit.get_agent(agent_id)
        pending = unit.pending_utterances(agent.agent_id)
        model_id = self._analyser.model_id
        # Embeddings of another model live in another space: they cannot join this voiceprint.
        stale = [
            RejectedUtterance(u, f"made by model {u.model_id}, not the current {model_id}")
            for u in pending
            if u.model_id != model_id
        ]
        current = [u for u in pending if u.model_id == model_id]
        consistency = check_consistency(current, self._policy.consistency_threshold)
        rejected = stale + consistency.rejected
        events: list[AuditEvent] = []
        if rejected:
            unit.remove_utterances(agent.agent_id, [r.utterance.utterance_id for r in rejected])
            events += [
                self._event(
                    AuditAction.ENROLLMENT_REJECT_UTTERANCE,
                    agent.agent_id,
                    "rejected",
                    utterance_id=r.utterance.utterance_id,
                    reason=r.reason,
                )
                for r in rejected
            ]
        collected = sum(u.net_speech_seconds for u in consistency.accepted)
        required = self._policy.required_net_speech_seconds
        if consistency.undecided:
            events.append(self._event(AuditAction.ENROLLMENT_FINALIZE, agent.agent_id, "undecided"))
            return _Finalized(
                EnrollmentIncompleteError(
                    "the two pending utterances do not sound like the same person; add another "
                    "utterance of the agent so the odd one out can be identified"
                ),
                events,
            )
        if not consistency.accepted or collected < required:
            events.append(
                self._event(
                    AuditAction.ENROLLMENT_FINALIZE,
                    agent.agent_id,
                    "incomplete",
                    net_speech_seconds=collected,
                )
            )
            return _Finalized(
                EnrollmentIncompleteError(
                    f"{collected:.1f} s of consistent net speech collected, {required:.1f} s "
                    "needed"
                    + (f"; {len(rejected)} utterance(s) rejected: " if rejected else "")
                    + "; ".join(r.reason for r in rejected)
                ),
                events,
            )
        voiceprint = Voiceprint(
            agent_id=agent.agent_id,
            model_id=model_id,
            embedding=mean_embedding(consistency.accepted),
            created_at=self._now(),
            utterance_count=len(consistency.accepted),
            net_speech_seconds=collected,
            telephone_embedding=companion_embedding(consistency.accepted),
        )
        replaced = unit.replace_voiceprint(
            voiceprint, [u.utterance_id for u in consistency.accepted]
        )
        # The utterances go, their fingerprints stay: a check that plays one back is a replay.
        for utterance in consistency.accepted:
            unit.add_fingerprint(
                ReplayFingerprint(
                    agent.agent_id,
                    utterance.model_id,
                    RecordingOrigin.ENROLLMENT,
                    utterance.received_at,
                    utterance.embedding,
                    utterance.telephone_embedding,
                ),
                keep_after=datetime.min.replace(tzinfo=UTC),
                keep=_ENROLLMENT_FINGERPRINTS,
            )
        events.append(
            self._event(
                AuditAction.ENROLLMENT_FINALIZE,
                agent.agent_id,
                "ok",
                replaced_previous=replaced,
                utterance_count=voiceprint.utterance_count,
                net_speech_seconds=round(collected, 2),
                model_id=model_id,
            )
        )
        return _Finalized(FinalizeOutcome(voiceprint, replaced, rejected), events)

    def delete(self, agent_id: str, record_completion: Completion[None] | None = None) -> None:
        agent_id = validate_agent_id(agent_id)
        erased = self._event(AuditAction.AGENT_DELETE, agent_id, "ok")
        with self._store.unit_of_work(f"delete agent {agent_id!r}") as unit:
            unit.delete_agent(agent_id)
            # After the erasure: with the agent gone, the store records this one in clear.
            unit.append_audit(erased)
            if record_completion is not None:
                record_completion(unit, None)
        _log(erased)

    def _event(
        self, action: AuditAction, agent_id: str, outcome: str, **details: object
    ) -> AuditEvent:
        return AuditEvent(action, agent_id, outcome, self._now(), dict(details))


@dataclass(frozen=True)
class _Finalized:
    """What a finalize attempt comes to: its outcome (or the error to raise once its unit has
    committed) and the audit records it commits with."""

    outcome: FinalizeOutcome | EnrollmentIncompleteError
    events: list[AuditEvent]


def _log(event: AuditEvent) -> None:
    """Logs an audited step once it has committed."""
    extra = "".join(f" {name}={value}" for name, value in event.details.items())
    agent = logged_agent(event.agent_id)
    log.info("%s agent=%s outcome=%s%s", event.action, agent, event.outcome, extra)


def _quality_rejection(quality: SpeechAnalysis, min_net_speech: float) -> str:
    reasons = []
    for issue in quality.issues:
        if issue is QualityIssue.TOO_LITTLE_SPEECH:
            reasons.append(
                f"too little speech ({quality.net_speech_seconds:.1f} s; at least "
                f"{min_net_speech:.1f} s per utterance)"
            )
        elif issue is QualityIssue.TOO_QUIET:
            reasons.append(f"too quiet (speech at {quality.speech_level_dbfs:.0f} dBFS)")
        elif issue is QualityIssue.CLIPPED:
            reasons.append(f"clipped ({quality.clipped_fraction:.1%} of samples at full scale)")
    return "; ".join(reasons) or "unusable audio"
