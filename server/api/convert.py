"""Protobuf messages <-> domain values, for every servicer: nothing here decides anything."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp
from voxauth.v1 import shifts_pb2 as spb
from voxauth.v1 import voxauth_pb2 as pb

from enrollment.listing import AgentListing, EnrollmentState
from enrollment.service import EnrollmentProgress, UtteranceOutcome
from server.errors import InvalidAudioError, InvalidRequestError
from server.pipeline.analysis import AudioInput
from server.pipeline.channel import Channel
from server.pipeline.decode import AudioEncoding
from server.pipeline.presentation import PresentationAssessment, PresentationDecision
from server.pipeline.speech import QualityIssue, SpeechAnalysis
from server.scoring.calibration import Condition, DecidedBy
from server.shifts.change_watch import CheckpointTrigger
from server.shifts.events import ShiftEvent, ShiftEventKind
from server.shifts.service import LoginOutcome
from server.storage.interface import (
    AgentRecord,
    HeldVoiceprint,
    HoldReason,
    ShiftRecord,
    ShiftState,
    UtteranceRecord,
    Voiceprint,
)
from server.verification.decision import Decision
from server.verification.service import VerificationResult

_ENCODINGS = {
    pb.AUDIO_ENCODING_WAV: AudioEncoding.WAV,
    pb.AUDIO_ENCODING_FLAC: AudioEncoding.FLAC,
    pb.AUDIO_ENCODING_PCM16LE: AudioEncoding.PCM16LE,
    pb.AUDIO_ENCODING_MULAW: AudioEncoding.MULAW,
    pb.AUDIO_ENCODING_ALAW: AudioEncoding.ALAW,
    pb.AUDIO_ENCODING_MP3: AudioEncoding.MP3,
    pb.AUDIO_ENCODING_OGG: AudioEncoding.OGG,
    pb.AUDIO_ENCODING_OPUS: AudioEncoding.OPUS,
}
_ISSUES = {
    QualityIssue.TOO_LITTLE_SPEECH: pb.QUALITY_ISSUE_TOO_LITTLE_SPEECH,
    QualityIssue.TOO_QUIET: pb.QUALITY_ISSUE_TOO_QUIET,
    QualityIssue.CLIPPED: pb.QUALITY_ISSUE_CLIPPED,
}
_DECISIONS = {
    Decision.ACCEPT: pb.DECISION_ACCEPT,
    Decision.REJECT: pb.DECISION_REJECT,
    Decision.INCONCLUSIVE: pb.DECISION_INCONCLUSIVE,
}

_CHANNELS = {Channel.WIDEBAND: pb.CHANNEL_WIDEBAND, Channel.TELEPHONE: pb.CHANNEL_TELEPHONE}
_COMPARISONS = {
    Condition.WIDEBAND: pb.COMPARISON_WIDEBAND,
    Condition.WIDEBAND_TO_TELEPHONE: pb.COMPARISON_WIDEBAND_TO_TELEPHONE,
    Condition.TELEPHONE: pb.COMPARISON_TELEPHONE,
}

_DECIDED_BY = {
    DecidedBy.FMR_THRESHOLD: pb.DECIDED_BY_FMR_THRESHOLD,
    DecidedBy.LLR_FLOOR: pb.DECIDED_BY_LLR_FLOOR,
    DecidedBy.DURATION_FLOOR: pb.DECIDED_BY_DURATION_FLOOR,
    DecidedBy.LOCAL_FMR_THRESHOLD: pb.DECIDED_BY_LOCAL_FMR_THRESHOLD,
}

_STATES = {
    ShiftState.VERIFIED: spb.SHIFT_STATE_VERIFIED,
    ShiftState.UNVERIFIED: spb.SHIFT_STATE_UNVERIFIED,
    ShiftState.LOCKED: spb.SHIFT_STATE_LOCKED,
    ShiftState.ENDED: spb.SHIFT_STATE_ENDED,
    ShiftState.NOT_ENROLLED: spb.SHIFT_STATE_NOT_ENROLLED,
}
_HOLD_REASONS = {
    HoldReason.DUPLICATE: pb.HOLD_REASON_DUPLICATE,
    HoldReason.WATCHLIST: pb.HOLD_REASON_WATCHLIST,
    HoldReason.APPROVAL: pb.HOLD_REASON_APPROVAL,
}
_TRIGGERS = {
    CheckpointTrigger.SCHEDULED: spb.CHECKPOINT_TRIGGER_SCHEDULED,
    CheckpointTrigger.CHANGE_WATCH: spb.CHECKPOINT_TRIGGER_CHANGE_WATCH,
    CheckpointTrigger.FOLLOW_UP: spb.CHECKPOINT_TRIGGER_FOLLOW_UP,
}
_KINDS = {
    ShiftEventKind.STREAM_ATTACHED: spb.SHIFT_EVENT_KIND_STREAM_ATTACHED,
    ShiftEventKind.CHECKPOINT_PASSED: spb.SHIFT_EVENT_KIND_CHECKPOINT_PASSED,
    ShiftEventKind.CHECKPOINT_FAILED: spb.SHIFT_EVENT_KIND_CHECKPOINT_FAILED,
    ShiftEventKind.INSUFFICIENT_SPEECH: spb.SHIFT_EVENT_KIND_INSUFFICIENT_SPEECH,
    ShiftEventKind.SHIFT_LOCKED: spb.SHIFT_EVENT_KIND_SHIFT_LOCKED,
    ShiftEventKind.SHIFT_VERIFIED: spb.SHIFT_EVENT_KIND_SHIFT_VERIFIED,
    ShiftEventKind.SHIFT_ENDED: spb.SHIFT_EVENT_KIND_SHIFT_ENDED,
    ShiftEventKind.PRESENTATION_ATTACK: spb.SHIFT_EVENT_KIND_PRESENTATION_ATTACK,
    ShiftEventKind.ENROLLMENT_COMPLETED: spb.SHIFT_EVENT_KIND_ENROLLMENT_COMPLETED,
    ShiftEventKind.ENROLLMENT_HELD: spb.SHIFT_EVENT_KIND_ENROLLMENT_HELD,
    ShiftEventKind.WATCHLIST_MATCH: spb.SHIFT_EVENT_KIND_WATCHLIST_MATCH,
    ShiftEventKind.SECOND_VOICE: spb.SHIFT_EVENT_KIND_SECOND_VOICE,
}


_PRESENTATION_DECISIONS = {
    PresentationDecision.NOT_ASSESSED: pb.PRESENTATION_DECISION_NOT_ASSESSED,
    PresentationDecision.BONA_FIDE: pb.PRESENTATION_DECISION_BONA_FIDE,
    PresentationDecision.ATTACK: pb.PRESENTATION_DECISION_ATTACK,
    PresentationDecision.REPLAY: pb.PRESENTATION_DECISION_REPLAY,
}


def presentation_message(assessment: PresentationAssessment) -> pb.PresentationAttack:
    return pb.PresentationAttack(
        score=assessment.score,
        threshold=assessment.threshold,
        decision=_PRESENTATION_DECISIONS[assessment.decision],
        enforced=assessment.enforced,
    )


def timestamp(at: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(at)
    return stamp


# --- audio and verification ---------------------------------------------------------------


def audio_input(audio: pb.Audio) -> AudioInput:
    encoding = audio_encoding(audio.encoding)
    return AudioInput(data=audio.data, encoding=encoding, sample_rate_hz=audio.sample_rate_hz)


def audio_encoding(encoding: pb.AudioEncoding.ValueType) -> AudioEncoding:
    if encoding not in _ENCODINGS:
        raise InvalidAudioError(
            "audio encoding is not set or not supported; use WAV, FLAC, MP3, OGG, PCM16LE, "
            "MULAW or ALAW",
            field="audio.encoding",
        )
    return _ENCODINGS[encoding]


def verify_response(result: VerificationResult) -> pb.VerifyResponse:
    response = pb.VerifyResponse(
        decision=_DECISIONS[result.decision],
        score=result.score,
        threshold=result.threshold,
        model_id=result.model_id,
        quality=_quality(result.quality),
        target_false_match_rate=result.target_fmr,
        channel=_CHANNELS[result.channel],
        min_net_speech_seconds=result.min_net_speech_seconds,
    )
    scoring = result.scoring
    if scoring is not None:
        response.llr = scoring.llr
        response.llr_threshold = scoring.llr_threshold
        response.expected_false_non_match_rate = scoring.expected_false_non_match_rate
        response.comparison = _COMPARISONS[scoring.condition]
        response.normalized_score = scoring.normalized
        response.normalized_threshold = scoring.normalized_threshold
        response.decided_by = _DECIDED_BY[scoring.decided_by]
    if result.presentation is not None:
        response.presentation_attack.CopyFrom(presentation_message(result.presentation))
    response.watchlist_alert = result.watchlist is not None
    return response


def _quality(quality: SpeechAnalysis) -> pb.AudioQuality:
    return pb.AudioQuality(
        duration_seconds=quality.duration_seconds,
        net_speech_seconds=quality.net_speech_seconds,
        speech_level_dbfs=quality.speech_level_dbfs,
        clipped_fraction=quality.clipped_fraction,
        issues=[_ISSUES[i] for i in quality.issues],
    )


# --- enrollment ---------------------------------------------------------------------------


def agent_message(agent: AgentRecord, *, enrolled: bool, passive: bool = False) -> pb.Agent:
    return pb.Agent(
        agent_id=agent.agent_id,
        display_name=agent.display_name,
        consent_reference=agent.consent_reference,
        created_at=timestamp(agent.created_at),
        enrolled=enrolled,
        passive_enrollment=passive,
    )


def held_voiceprint_message(held: HeldVoiceprint) -> pb.HeldVoiceprint:
    return pb.HeldVoiceprint(
        reason=_HOLD_REASONS[held.reason],
        matching_agent_id=held.matched_agent_id,
        watchlist_entry_id=held.matched_entry_id,
        normalized_score=held.similarity,
        held_at=timestamp(held.held_at),
        voiceprint=voiceprint_info(held.voiceprint),
    )


def utterance_message(record: UtteranceRecord, *, accepted: bool, reason: str = "") -> pb.Utterance:
    return pb.Utterance(
        utterance_id=record.utterance_id,
        accepted=accepted,
        rejection_reason=reason,
        quality=pb.AudioQuality(
            duration_seconds=record.duration_seconds,
            net_speech_seconds=record.net_speech_seconds,
            speech_level_dbfs=record.speech_level_dbfs,
            clipped_fraction=record.clipped_fraction,
        ),
        received_at=timestamp(record.received_at),
    )


def utterance_outcome_message(outcome: UtteranceOutcome) -> pb.Utterance:
    message = pb.Utterance(
        utterance_id=outcome.record.utterance_id if outcome.record else "",
        accepted=outcome.record is not None,
        rejection_reason=outcome.rejection_reason,
        quality=_quality(outcome.quality),
        received_at=timestamp(outcome.received_at),
    )
    if outcome.presentation is not None:
        message.presentation_attack.CopyFrom(presentation_message(outcome.presentation))
    return message


def voiceprint_info(voiceprint: Voiceprint) -> pb.VoiceprintInfo:
    return pb.VoiceprintInfo(
        model_id=voiceprint.model_id,
        created_at=timestamp(voiceprint.created_at),
        utterance_count=voiceprint.utterance_count,
        net_speech_seconds=voiceprint.net_speech_seconds,
        telephone_companion=voiceprint.telephone_embedding is not None,
    )


def enrollment_status(progress: EnrollmentProgress) -> pb.EnrollmentStatus:
    status = pb.EnrollmentStatus(
        agent=agent_message(
            progress.agent,
            enrolled=progress.voiceprint is not None,
            passive=progress.passive_since is not None,
        ),
        net_speech_seconds=progress.net_speech_seconds,
        required_net_speech_seconds=progress.required_net_speech_seconds,
        ready_to_finalize=progress.ready_to_finalize,
        pending_utterances=[utterance_message(u, accepted=True) for u in progress.pending],
    )
    if progress.voiceprint is not None:
        status.voiceprint.CopyFrom(voiceprint_info(progress.voiceprint))
    if progress.held is not None:
        status.held_voiceprint.CopyFrom(held_voiceprint_message(progress.held))
    return status


# --- shifts -------------------------------------------------------------------------------


def login_response(outcome: LoginOutcome) -> spb.LoginCheckResponse:
    response = spb.LoginCheckResponse(
        shift=shift_message(outcome.shift),
        assurance=outcome.assurance.token if outcome.assurance else "",
    )
    if outcome.verification is not None:
        response.verification.CopyFrom(verify_response(outcome.verification))
    return response


def shift_message(record: ShiftRecord) -> spb.Shift:
    message = spb.Shift(
        shift_id=record.shift_id,
        agent_id=record.agent_id,
        device_id=record.device_id,
        state=_STATES[record.state],
        started_at=timestamp(record.started_at),
        updated_at=timestamp(record.updated_at),
        consecutive_failures=record.consecutive_failures,
        checkpoints_passed=record.checkpoints_passed,
        checkpoints_failed=record.checkpoints_failed,
        checkpoints_insufficient_speech=record.checkpoints_insufficient,
    )
    if record.ended_at is not None:
        message.ended_at.CopyFrom(timestamp(record.ended_at))
    return message


def shift_event_message(event: ShiftEvent) -> spb.ShiftEvent:
    message = spb.ShiftEvent(
        kind=_KINDS[event.kind],
        shift_id=event.shift.shift_id,
        at=timestamp(event.at),
        score=event.score,
        threshold=event.threshold,
        net_speech_seconds=event.net_speech_seconds,
        shift=shift_message(event.shift),
        event_id=event.event_id,
    )
    if event.decided_by is not None:
        message.decided_by = _DECIDED_BY[event.decided_by]
    if event.trigger is not None:
        message.trigger = _TRIGGERS[event.trigger]
        message.change_similarity = event.change_similarity
    if event.presentation is not None:
        message.presentation_attack.CopyFrom(presentation_message(event.presentation))
    for field, value in (
        ("scheduled_at", event.scheduled_at),
        ("audio_start", event.audio_start),
        ("audio_end", event.audio_end),
    ):
        if value is not None:
            getattr(message, field).CopyFrom(timestamp(value))
    return message


_ENROLLMENT_STATES = {
    EnrollmentState.NOT_STARTED: pb.ENROLLMENT_STATE_NOT_STARTED,
    EnrollmentState.COLLECTING: pb.ENROLLMENT_STATE_COLLECTING,
    EnrollmentState.READY_TO_FINALIZE: pb.ENROLLMENT_STATE_READY_TO_FINALIZE,
    EnrollmentState.ENROLLED: pb.ENROLLMENT_STATE_ENROLLED,
}
_ENROLLMENT_STATES_IN = {number: state for state, number in _ENROLLMENT_STATES.items()}


def enrollment_states(states: Iterable[pb.EnrollmentState.ValueType]) -> set[EnrollmentState]:
    """A ListAgents filter's states; UNSPECIFIED or an unknown number is refused."""
    found = set()
    for number in states:
        if number not in _ENROLLMENT_STATES_IN:
            raise InvalidRequestError(
                f"states holds {number}, which is not an enrollment state", field="states"
            )
        found.add(_ENROLLMENT_STATES_IN[number])
    return found


def agent_summary(listing: AgentListing) -> pb.AgentSummary:
    overview = listing.overview
    voiceprint = overview.voiceprint
    summary = pb.AgentSummary(
        agent=agent_message(overview.agent, enrolled=voiceprint is not None),
        enrollment_state=_ENROLLMENT_STATES[listing.state],
        net_speech_seconds=overview.pending_net_speech_seconds,
        required_net_speech_seconds=listing.required_net_speech_seconds,
        pending_utterance_count=overview.pending_utterances,
    )
    if voiceprint is not None:
        summary.voiceprint.CopyFrom(voiceprint_info(voiceprint))
        summary.voiceprint_last_used_at.CopyFrom(
            timestamp(voiceprint.last_used_at or voiceprint.created_at)
        )
    if listing.voiceprint_expires_at is not None:
        summary.voiceprint_expires_at.CopyFrom(timestamp(listing.voiceprint_expires_at))
    return summary
