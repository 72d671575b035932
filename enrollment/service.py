"""The enrollment use cases of the HR workflow: create an agent, collect utterances, build or
rebuild the voiceprint, erase the agent. Every step is audited (never with audio or embeddings).
"""

from __future__ import annotations

import dataclasses
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
from server.errors import EnrollmentIncompleteError, NothingHeldError
from server.pipeline.analysis import ReceivedAudio, VoiceAnalyser, VoiceSample
from server.pipeline.presentation import PresentationAssessment, PresentationDecision
from server.pipeline.speech import QualityIssue, SpeechAnalysis
from server.records import (
    AgentRecord,
    AuditEvent,
    HeldVoiceprint,
    HoldReason,
    RecordingOrigin,
    ReplayFingerprint,
    UtteranceRecord,
    Voiceprint,
)
from server.runtime.log_format import logged_agent
from server.scoring.gallery import GalleryMatch, GallerySearch, Probe
from server.scoring.watchlist import WatchlistScreen, alert_event
from server.storage.interface import UnitOfWork, VoiceprintStore
from server.validation import validate_agent_id, validate_text

log = logging.getLogger(__name__)

T = TypeVar("T")

Completion = Callable[[UnitOfWork, T], None]
"""Runs in a use case's unit of work with its outcome: what it writes commits with it."""

# The enrollment fingerprints kept per agent (the newest): two full enrollments' worth at the
# limit of pending utterances.
_ENROLLMENT_FINGERPRINTS = 64
# Finalize builds, searches and stores in separate steps; utterances added between them make
# it build again, at most this often.
_FINALIZE_ATTEMPTS = 3


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
    held: HeldVoiceprint | None = None
    """A voiceprint built but waiting for HR's review (ReviewVoiceprint)."""
    passive_since: datetime | None = None
    """When passive enrollment from the agent's shifts was asked for; None if it was not or
    has completed."""

    @property
    def ready_to_finalize(self) -> bool:
        return self.net_speech_seconds >= self.required_net_speech_seconds


@dataclass(frozen=True)
class FinalizeOutcome:
    voiceprint: Voiceprint
    replaced_previous: bool
    rejected: list[RejectedUtterance]
    held: HeldVoiceprint | None = None
    """Set when the voiceprint was held for HR's review instead of becoming active: it
    matched another agent or a watchlist entry, or policy asks for approval."""


@dataclass(frozen=True)
class ReviewOutcome:
    held: HeldVoiceprint
    approved: bool
    replaced_previous: bool


class EnrollmentService:
    def __init__(
        self,
        store: VoiceprintStore,
        analyser: VoiceAnalyser,
        policy: EnrollmentPolicy,
        now: Callable[[], datetime],
        gallery: GallerySearch | None = None,
        watchlist: WatchlistScreen | None = None,
    ) -> None:
        """`gallery`: the 1:N search every new voiceprint goes through (None: none, as in
        unit tests without the scoring files); `watchlist`: the watchlist screen."""
        self._store = store
        self._analyser = analyser
        self._policy = policy
        self._now = now
        self._gallery = gallery
        self._watchlist = watchlist
        # Looking for a copy among the pending utterances and adding the new one are one step:
        # two copies sent at once must not both find none.
        self._adding = threading.Lock()

    def create_agent(
        self,
        agent_id: str,
        display_name: str,
        consent_reference: str,
        record_completion: Completion[AgentRecord] | None = None,
        *,
        passive: bool = False,
    ) -> AgentRecord:
        """`record_completion`, as in every use case that takes it, runs in the unit of work
        with the outcome, so what it writes (a request id's completion) commits with it.
        `passive`: the agent is enrolled from its first shifts' speech (enrollment/passive.py)
        instead of (or besides) utterances HR adds."""
        agent = AgentRecord(
            agent_id=validate_agent_id(agent_id),
            display_name=validate_text(display_name, "display_name", 256),
            # Biometric data may only be collected under a recorded consent (GDPR art. 9).
            consent_reference=validate_text(consent_reference, "consent_reference", 256),
            created_at=self._now(),
        )
        created = self._event(AuditAction.AGENT_CREATE, agent.agent_id, "ok", passive=passive)
        with self._store.unit_of_work(f"create agent {agent.agent_id!r}") as unit:
            unit.create_agent(agent)
            unit.append_audit(created)
            if passive:
                unit.set_passive_enrollment(agent.agent_id, agent.created_at)
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
        return self.add_sample(agent, sample)

    def add_sample(
        self, agent: AgentRecord, sample: VoiceSample, *, shift_id: str = ""
    ) -> UtteranceOutcome:
        """Blocking. Keeps an analysed sample as a pending utterance if it passes the quality
        gates, the countermeasure and the copy check. `shift_id`: the sample is a stretch of
        that shift's stream (passive enrollment), so a copy of a pending utterance is a
        recording played into the call, audited as a replay."""
        received_at = self._now()
        quality = sample.quality
        if (
            quality.net_speech_seconds < self._policy.min_utterance_net_speech_seconds
            and QualityIssue.TOO_LITTLE_SPEECH not in quality.issues
        ):
            # Speech the detector cut out is analysed without the minimum (analyse_speech).
            quality = dataclasses.replace(
                quality, issues=(*quality.issues, QualityIssue.TOO_LITTLE_SPEECH)
            )
            sample = VoiceSample(quality, None, sample.channel, sample.presentation)
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
        origin = {"shift_id": shift_id} if shift_id else {}
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
                **origin,
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
                    **origin,
                )
                with self._store.unit_of_work(f"refuse an utterance of {agent.agent_id!r}") as unit:
                    if shift_id:
                        unit.append_audit(
                            self._event(
                                AuditAction.PRESENTATION_ATTACK,
                                agent.agent_id,
                                PresentationDecision.REPLAY.value,
                                check=AuditAction.ENROLLMENT_PASSIVE.value,
                                replay_of="pending_utterance",
                                replay_similarity=round(duplicate.similarity, 4),
                                **origin,
                            )
                        )
                    unit.append_audit(rejected)
                _log(rejected)
                return UtteranceOutcome(
                    quality,
                    received_at,
                    None,
                    reason,
                    _as_replay(presentation) if shift_id else presentation,
                )
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
                **origin,
            )
            with self._store.unit_of_work(f"add utterance for agent {agent.agent_id!r}") as unit:
                unit.add_utterance(record, self._policy.max_pending_utterances)
                unit.append_audit(added)
        _log(added)
        return UtteranceOutcome(quality, received_at, record, presentation=presentation)

    def progress(self, agent_id: str) -> EnrollmentProgress:
        agent = self._store.get_agent(validate_agent_id(agent_id))
        pending = self._store.pending_utterances(agent.agent_id)
        passive_since = self._store.passive_enrollment(agent.agent_id)
        return EnrollmentProgress(
            agent=agent,
            pending=pending,
            net_speech_seconds=sum(u.net_speech_seconds for u in pending),
            required_net_speech_seconds=self._policy.passive_net_speech_seconds
            if passive_since is not None
            else self._policy.required_net_speech_seconds,
            voiceprint=self._store.get_voiceprint(agent.agent_id),
            held=self._store.held_voiceprint(agent.agent_id),
            passive_since=passive_since,
        )

    def finalize(
        self,
        agent_id: str,
        record_completion: Completion[FinalizeOutcome] | None = None,
        *,
        passive: bool = False,
    ) -> FinalizeOutcome:
        """Builds the voiceprint from the pending utterances and swaps it in atomically: the
        utterances it consumes or rejects, the voiceprint and the audit records commit
        together. The new voiceprint is searched for among the other agents' and on the
        watchlist first; a match (or, for a `passive` enrollment, a policy asking for
        approval) holds it for HR's review instead (FinalizeOutcome.held), and a previous
        voiceprint stays active meanwhile."""
        agent_id = validate_agent_id(agent_id)
        reviewed: _Review | None = None
        # The search reads the store and scores, so it runs between units of work: a first
        # unit builds the voiceprint (and discards outliers), the search judges it, and a
        # second unit stores it if the pending utterances are still the ones it was built of.
        for _ in range(_FINALIZE_ATTEMPTS):
            with self._store.unit_of_work(f"finalize the enrollment of agent {agent_id!r}") as unit:
                result = self._finalize(unit, agent_id, reviewed, passive=passive)
                for event in result.events:
                    unit.append_audit(event)
                if record_completion is not None and isinstance(result.outcome, FinalizeOutcome):
                    record_completion(unit, result.outcome)
            for event in result.events:
                _log(event)
            if isinstance(result.outcome, _Unreviewed):
                reviewed = self._review(result.outcome, passive=passive)
                continue
            if isinstance(result.outcome, EnrollmentIncompleteError):
                # Raised once the unit has committed: the rejected utterances stay discarded.
                raise result.outcome
            return result.outcome
        raise EnrollmentIncompleteError(
            "the pending utterances kept changing while the enrollment was finalized; "
            "finalize again"
        )

    def review(
        self,
        agent_id: str,
        *,
        approve: bool,
        reason: str,
        record_completion: Completion[ReviewOutcome] | None = None,
    ) -> ReviewOutcome:
        """HR's decision on a held voiceprint: approved, it becomes the agent's voiceprint
        (replacing any); rejected, it is erased (a passive enrollment then collects anew).
        Raises NothingHeldError when the agent has none held."""
        agent_id = validate_agent_id(agent_id)
        reason = validate_text(reason, "reason", 512)
        with self._store.unit_of_work(f"review the voiceprint of agent {agent_id!r}") as unit:
            unit.get_agent(agent_id)
            held = unit.release_held_voiceprint(agent_id)
            if held is None:
                raise NothingHeldError(f"agent {agent_id} has no voiceprint waiting for review")
            replaced = False
            if approve:
                voiceprint = dataclasses.replace(held.voiceprint, created_at=self._now())
                replaced = unit.replace_voiceprint(voiceprint, [])
                unit.end_passive_enrollment(agent_id)
                held = dataclasses.replace(held, voiceprint=voiceprint)
            event = self._event(
                AuditAction.VOICEPRINT_APPROVE if approve else AuditAction.VOICEPRINT_REJECT,
                agent_id,
                "ok",
                held_for=held.reason.value,
                matched_agent=held.matched_agent_id,
                matched_entry=held.matched_entry_id,
                review_reason=reason,
                replaced_previous=replaced,
            )
            unit.append_audit(event)
            outcome = ReviewOutcome(held, approve, replaced)
            if record_completion is not None:
                record_completion(unit, outcome)
        _log(event)
        return outcome

    def _review(self, built: _Unreviewed, *, passive: bool) -> _Review:
        """Whether the new voiceprint must wait for HR: a watchlist match, another agent's
        voice, or a passive enrollment under a policy that asks for approval. Blocking."""
        voiceprint = built.voiceprint
        probe = Probe(voiceprint.embedding, voiceprint.net_speech_seconds)
        now = self._now()
        if self._watchlist is not None:
            watched = self._watchlist.match(probe, voiceprint.model_id)
            if watched is not None:
                held = HeldVoiceprint(
                    voiceprint,
                    HoldReason.WATCHLIST,
                    now,
                    matched_entry_id=watched.reference_id,
                    similarity=watched.normalized,
                )
                alert = alert_event(
                    voiceprint.agent_id, watched, AuditAction.ENROLLMENT_FINALIZE, now
                )
                return _Review(built, held, watched, alert)
        if self._gallery is not None:
            others = [
                v
                for v in self._store.voiceprints(voiceprint.model_id)
                if v.agent_id != voiceprint.agent_id
            ]
            match = self._gallery.search(probe, others, self._policy.duplicate_false_alarm)
            if match is not None:
                held = HeldVoiceprint(
                    voiceprint,
                    HoldReason.DUPLICATE,
                    now,
                    matched_agent_id=match.reference_id,
                    similarity=match.normalized,
                )
                return _Review(built, held, match)
        if passive and self._policy.passive_requires_approval:
            return _Review(built, HeldVoiceprint(voiceprint, HoldReason.APPROVAL, now))
        return _Review(built, None)

    def _finalize(
        self, unit: UnitOfWork, agent_id: str, reviewed: _Review | None, *, passive: bool
    ) -> _Finalized:
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
        required = (
            self._policy.passive_net_speech_seconds
            if passive
            else self._policy.required_net_speech_seconds
        )
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
        if passive and len(consistency.accepted) < self._policy.passive_min_stretches:
            events.append(
                self._event(
                    AuditAction.ENROLLMENT_FINALIZE,
                    agent.agent_id,
                    "incomplete",
                    net_speech_seconds=collected,
                    stretches=len(consistency.accepted),
                )
            )
            return _Finalized(
                EnrollmentIncompleteError(
                    f"{len(consistency.accepted)} consistent stretch(es) of speech collected, "
                    f"{self._policy.passive_min_stretches} needed"
                ),
                events,
            )
        accepted_ids = tuple(u.utterance_id for u in consistency.accepted)
        if reviewed is None or reviewed.built.utterance_ids != accepted_ids:
            voiceprint = Voiceprint(
                agent_id=agent.agent_id,
                model_id=model_id,
                embedding=mean_embedding(consistency.accepted),
                created_at=self._now(),
                utterance_count=len(consistency.accepted),
                net_speech_seconds=collected,
                telephone_embedding=companion_embedding(consistency.accepted),
            )
            # Built, not stored: judged by the 1:N search before a second unit stores it.
            earlier = [] if reviewed is None else reviewed.built.rejected
            return _Finalized(_Unreviewed(voiceprint, accepted_ids, earlier + rejected), events)
        voiceprint = reviewed.built.voiceprint
        held = reviewed.held
        if held is None:
            replaced = unit.replace_voiceprint(voiceprint, list(accepted_ids))
            unit.end_passive_enrollment(agent.agent_id)
        else:
            replaced = False
            unit.hold_voiceprint(held, list(accepted_ids))
            if reviewed.alert is not None:
                events.append(reviewed.alert)
            events.append(self._hold_event(held, reviewed.match))
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
                "ok" if held is None else "held",
                replaced_previous=replaced,
                utterance_count=voiceprint.utterance_count,
                net_speech_seconds=round(collected, 2),
                model_id=model_id,
                passive=passive,
            )
        )
        # The utterances the first step discarded belong to this outcome too.
        outcome = FinalizeOutcome(voiceprint, replaced, reviewed.built.rejected + rejected, held)
        return _Finalized(outcome, events)

    def _hold_event(self, held: HeldVoiceprint, match: GalleryMatch | None) -> AuditEvent:
        details: dict[str, object] = {"reason": held.reason.value}
        if held.matched_agent_id:
            details["matching_agent"] = held.matched_agent_id
        if held.matched_entry_id:
            details["watchlist_entry"] = held.matched_entry_id
        if match is not None:
            details |= {
                "normalized_score": round(match.normalized, 3),
                "threshold": round(match.threshold, 3),
                "gallery_size": match.gallery_size,
            }
        return self._event(AuditAction.ENROLLMENT_HOLD, held.voiceprint.agent_id, "held", **details)

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
class _Unreviewed:
    """A voiceprint built from these utterances, not yet searched for (not stored)."""

    voiceprint: Voiceprint
    utterance_ids: tuple[str, ...]
    rejected: list[RejectedUtterance]
    """Discarded (and audited) by the step that built it."""


@dataclass(frozen=True)
class _Review:
    built: _Unreviewed
    held: HeldVoiceprint | None
    match: GalleryMatch | None = None
    alert: AuditEvent | None = None
    """The watchlist alert to audit with the hold."""


@dataclass(frozen=True)
class _Finalized:
    """What a finalize attempt comes to: its outcome (or the error to raise once its unit has
    committed, or the voiceprint to search for first) and the audit records it commits
    with."""

    outcome: FinalizeOutcome | EnrollmentIncompleteError | _Unreviewed
    events: list[AuditEvent]


def _as_replay(presentation: PresentationAssessment | None) -> PresentationAssessment:
    """The assessment of a stretch that repeats a pending one: a replay, refused."""
    return (
        presentation or PresentationAssessment(0.0, 0.0, PresentationDecision.NOT_ASSESSED, True)
    ).as_replay()


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
