"""gRPC servicers: translate protobuf messages to domain calls and back, nothing more.

Blocking work goes through the bounded InferencePool; domain errors propagate to the
ErrorMappingInterceptor, which picks the status code.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from google.protobuf.timestamp_pb2 import Timestamp
from voxauth.v1 import voxauth_pb2 as pb
from voxauth.v1 import voxauth_pb2_grpc as pb_grpc

from enrollment.service import EnrollmentProgress, EnrollmentService, UtteranceOutcome
from server.config import AudioLimits
from server.errors import InvalidAudioError, ServiceNotReadyError
from server.pipeline.analysis import AudioInput
from server.pipeline.channel import Channel
from server.pipeline.decode import AudioEncoding
from server.pipeline.speech import QualityIssue, SpeechAnalysis
from server.runtime.inference import InferencePool
from server.scoring.calibration import Condition
from server.security.assurance_desk import AssuranceDesk
from server.shifts.service import ShiftService
from server.storage.interface import AgentRecord, Store, UtteranceRecord, Voiceprint
from server.verification.service import Decision, VerificationResult, VerificationService
from server.verification.throttling import VerificationThrottle

T = TypeVar("T")

_ENCODINGS = {
    pb.AUDIO_ENCODING_WAV: AudioEncoding.WAV,
    pb.AUDIO_ENCODING_FLAC: AudioEncoding.FLAC,
    pb.AUDIO_ENCODING_PCM16LE: AudioEncoding.PCM16LE,
    pb.AUDIO_ENCODING_MULAW: AudioEncoding.MULAW,
    pb.AUDIO_ENCODING_ALAW: AudioEncoding.ALAW,
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


@dataclass(frozen=True)
class Services:
    enrollment: EnrollmentService
    verification: VerificationService
    shifts: ShiftService
    assurances: AssuranceDesk
    throttle: VerificationThrottle
    store: Store


class Readiness:
    """Holds the domain services once the model is loaded; empty while starting or stopping."""

    def __init__(self) -> None:
        self._services: Services | None = None

    def serve(self, services: Services) -> None:
        self._services = services

    def withdraw(self) -> None:
        self._services = None

    def require(self) -> Services:
        if self._services is None:
            raise ServiceNotReadyError("the server is starting or stopping; retry shortly")
        return self._services


class _Base:
    def __init__(self, pool: InferencePool, readiness: Readiness) -> None:
        self._pool = pool
        self._readiness = readiness

    def _services(self) -> Services:
        return self._readiness.require()

    async def _run(self, work: Callable[[], T]) -> T:
        return await self._pool.run(work)


class EnrollmentServicer(_Base, pb_grpc.EnrollmentServiceServicer):
    def __init__(self, limits: AudioLimits, pool: InferencePool, readiness: Readiness) -> None:
        super().__init__(pool, readiness)
        self._limits = limits

    async def CreateAgent(self, request: pb.CreateAgentRequest, context: Any) -> pb.Agent:
        enrollment = self._services().enrollment
        agent = await self._run(
            lambda: enrollment.create_agent(
                request.agent_id, request.display_name, request.consent_reference
            )
        )
        return _agent(agent, enrolled=False)

    async def AddEnrollmentAudio(
        self, request: pb.AddEnrollmentAudioRequest, context: Any
    ) -> pb.AddEnrollmentAudioResponse:
        self._services()
        if not request.HasField("audio"):
            raise InvalidAudioError("audio is required", field="audio")
        return await self._add(request.agent_id, audio_input(request.audio))

    async def StreamEnrollmentAudio(
        self, request_iterator: AsyncIterator[pb.EnrollmentAudioChunk], context: Any
    ) -> pb.AddEnrollmentAudioResponse:
        first: pb.EnrollmentAudioChunk | None = None
        parts: list[bytes] = []
        size = 0
        async for chunk in request_iterator:
            first = first or chunk
            size += len(chunk.data)
            # Checked as chunks arrive, so an endless stream is cut off, not buffered.
            if size > self._limits.max_encoded_bytes:
                raise InvalidAudioError(
                    f"streamed audio exceeds {self._limits.max_encoded_bytes} bytes, more than "
                    f"{self._limits.max_seconds:.0f} s of audio in any supported format",
                    field="audio.data",
                )
            parts.append(chunk.data)
        if first is None:
            raise InvalidAudioError("the stream carried no audio", field="audio.data")
        audio = pb.Audio(
            encoding=first.encoding, sample_rate_hz=first.sample_rate_hz, data=b"".join(parts)
        )
        return await self._add(first.agent_id, audio_input(audio))

    async def _add(self, agent_id: str, audio: AudioInput) -> pb.AddEnrollmentAudioResponse:
        enrollment = self._services().enrollment
        outcome = await self._run(lambda: enrollment.add_utterance(agent_id, audio))
        progress = await self._run(lambda: enrollment.progress(agent_id))
        return pb.AddEnrollmentAudioResponse(
            utterance=_utterance_outcome(outcome), status=_status(progress)
        )

    async def GetEnrollmentStatus(
        self, request: pb.GetEnrollmentStatusRequest, context: Any
    ) -> pb.EnrollmentStatus:
        enrollment = self._services().enrollment
        progress = await self._run(lambda: enrollment.progress(request.agent_id))
        return _status(progress)

    async def FinalizeEnrollment(
        self, request: pb.FinalizeEnrollmentRequest, context: Any
    ) -> pb.FinalizeEnrollmentResponse:
        enrollment = self._services().enrollment
        outcome = await self._run(lambda: enrollment.finalize(request.agent_id))
        return pb.FinalizeEnrollmentResponse(
            voiceprint=_voiceprint(outcome.voiceprint),
            replaced_previous=outcome.replaced_previous,
            rejected=[
                _utterance(r.utterance, accepted=False, reason=r.reason) for r in outcome.rejected
            ],
        )

    async def DeleteAgent(
        self, request: pb.DeleteAgentRequest, context: Any
    ) -> pb.DeleteAgentResponse:
        enrollment = self._services().enrollment
        await self._run(lambda: enrollment.delete(request.agent_id))
        return pb.DeleteAgentResponse()


class VerificationServicer(_Base, pb_grpc.VerificationServiceServicer):
    async def Verify(self, request: pb.VerifyRequest, context: Any) -> pb.VerifyResponse:
        verification = self._services().verification
        if not request.HasField("audio"):
            raise InvalidAudioError("audio is required", field="audio")
        audio = audio_input(request.audio)
        result = await self._run(lambda: verification.verify(request.agent_id, audio))
        return verify_response(result)


def verify_response(result: VerificationResult) -> pb.VerifyResponse:
    response = pb.VerifyResponse(
        decision=_DECISIONS[result.decision],
        score=result.score,
        threshold=result.threshold,
        model_id=result.model_id,
        quality=_quality(result.quality),
        target_false_match_rate=result.target_fmr,
        channel=_CHANNELS[result.channel],
    )
    scoring = result.scoring
    if scoring is not None:
        response.llr = scoring.llr
        response.llr_threshold = scoring.llr_threshold
        response.expected_false_non_match_rate = scoring.expected_false_non_match_rate
        response.comparison = _COMPARISONS[scoring.condition]
        response.normalized_score = scoring.normalized
        response.normalized_threshold = scoring.normalized_threshold
    return response


def audio_input(audio: pb.Audio) -> AudioInput:
    if audio.encoding not in _ENCODINGS:
        raise InvalidAudioError(
            "audio encoding is not set or not supported; use WAV, FLAC, PCM16LE, MULAW or ALAW",
            field="audio.encoding",
        )
    return AudioInput(
        data=audio.data, encoding=_ENCODINGS[audio.encoding], sample_rate_hz=audio.sample_rate_hz
    )


def timestamp(at: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(at)
    return stamp


def _agent(agent: AgentRecord, *, enrolled: bool) -> pb.Agent:
    return pb.Agent(
        agent_id=agent.agent_id,
        display_name=agent.display_name,
        consent_reference=agent.consent_reference,
        created_at=timestamp(agent.created_at),
        enrolled=enrolled,
    )


def _quality(quality: SpeechAnalysis) -> pb.AudioQuality:
    return pb.AudioQuality(
        duration_seconds=quality.duration_seconds,
        net_speech_seconds=quality.net_speech_seconds,
        speech_level_dbfs=quality.speech_level_dbfs,
        clipped_fraction=quality.clipped_fraction,
        issues=[_ISSUES[i] for i in quality.issues],
    )


def _utterance(record: UtteranceRecord, *, accepted: bool, reason: str = "") -> pb.Utterance:
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


def _utterance_outcome(outcome: UtteranceOutcome) -> pb.Utterance:
    return pb.Utterance(
        utterance_id=outcome.record.utterance_id if outcome.record else "",
        accepted=outcome.record is not None,
        rejection_reason=outcome.rejection_reason,
        quality=_quality(outcome.quality),
        received_at=timestamp(outcome.received_at),
    )


def _voiceprint(voiceprint: Voiceprint) -> pb.VoiceprintInfo:
    return pb.VoiceprintInfo(
        model_id=voiceprint.model_id,
        created_at=timestamp(voiceprint.created_at),
        utterance_count=voiceprint.utterance_count,
        net_speech_seconds=voiceprint.net_speech_seconds,
        telephone_companion=voiceprint.telephone_embedding is not None,
    )


def _status(progress: EnrollmentProgress) -> pb.EnrollmentStatus:
    status = pb.EnrollmentStatus(
        agent=_agent(progress.agent, enrolled=progress.voiceprint is not None),
        net_speech_seconds=progress.net_speech_seconds,
        required_net_speech_seconds=progress.required_net_speech_seconds,
        ready_to_finalize=progress.ready_to_finalize,
        pending_utterances=[_utterance(u, accepted=True) for u in progress.pending],
    )
    if progress.voiceprint is not None:
        status.voiceprint.CopyFrom(_voiceprint(progress.voiceprint))
    return status
