"""gRPC servicer of EnrollmentService: protobuf <-> the domain's EnrollmentService.

Calls that run the speaker model go to the bounded InferencePool; calls that only read or write
the store go to the StorePool, so a queue of model work never holds them up. Domain errors
propagate to the ErrorMappingInterceptor, which picks the status code.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from grpc.aio import ServicerContext
from voxauth.v1 import voxauth_pb2 as pb
from voxauth.v1 import voxauth_pb2_grpc as pb_grpc

from enrollment.service import EnrollmentService
from server.api.convert import (
    agent_message,
    audio_input,
    enrollment_status,
    utterance_message,
    utterance_outcome_message,
    voiceprint_info,
)
from server.api.readiness import Readiness
from server.api.streams import idle_limited
from server.config import AudioLimits, StreamLimits
from server.errors import InvalidAudioError
from server.pipeline.analysis import AudioInput
from server.runtime.clock import Clock
from server.runtime.inference import InferencePool
from server.runtime.store_pool import StorePool

AudioResponse = pb.AddEnrollmentAudioResponse


class EnrollmentServicer(pb_grpc.EnrollmentServiceServicer):
    def __init__(
        self,
        limits: AudioLimits,
        inference: InferencePool,
        store_pool: StorePool,
        readiness: Readiness,
        streams: StreamLimits,
        clock: Clock,
    ) -> None:
        self._limits = limits
        self._streams = streams
        self._clock = clock
        self._inference = inference
        self._store_pool = store_pool
        self._readiness = readiness

    def _enrollment(self) -> EnrollmentService:
        return self._readiness.require().enrollment

    async def CreateAgent(
        self,
        request: pb.CreateAgentRequest,
        context: ServicerContext[pb.CreateAgentRequest, pb.Agent],
    ) -> pb.Agent:
        enrollment = self._enrollment()
        agent = await self._store_pool.run(
            lambda: enrollment.create_agent(
                request.agent_id, request.display_name, request.consent_reference
            )
        )
        return agent_message(agent, enrolled=False)

    async def AddEnrollmentAudio(
        self,
        request: pb.AddEnrollmentAudioRequest,
        context: ServicerContext[pb.AddEnrollmentAudioRequest, AudioResponse],
    ) -> AudioResponse:
        self._enrollment()
        if not request.HasField("audio"):
            raise InvalidAudioError("audio is required", field="audio")
        return await self._add(request.agent_id, audio_input(request.audio))

    async def StreamEnrollmentAudio(
        self,
        request_iterator: AsyncIterator[pb.EnrollmentAudioChunk],
        context: ServicerContext[pb.EnrollmentAudioChunk, AudioResponse],
    ) -> AudioResponse:
        first: pb.EnrollmentAudioChunk | None = None
        parts: list[bytes] = []
        size = 0
        async for chunk in self._idle_limited(request_iterator):
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

    def _idle_limited(
        self, chunks: AsyncIterator[pb.EnrollmentAudioChunk]
    ) -> AsyncIterator[pb.EnrollmentAudioChunk]:
        idle = self._streams.enrollment_idle_seconds
        return idle_limited(
            chunks,
            idle,
            self._clock,
            closing=f"no audio chunk for {idle:g} s: the server closed this idle upload; "
            "send the recording again",
        )

    async def _add(self, agent_id: str, audio: AudioInput) -> AudioResponse:
        enrollment = self._enrollment()
        outcome = await self._inference.run(lambda: enrollment.add_utterance(agent_id, audio))
        progress = await self._store_pool.run(lambda: enrollment.progress(agent_id))
        return AudioResponse(
            utterance=utterance_outcome_message(outcome), status=enrollment_status(progress)
        )

    async def GetEnrollmentStatus(
        self,
        request: pb.GetEnrollmentStatusRequest,
        context: ServicerContext[pb.GetEnrollmentStatusRequest, pb.EnrollmentStatus],
    ) -> pb.EnrollmentStatus:
        enrollment = self._enrollment()
        progress = await self._store_pool.run(lambda: enrollment.progress(request.agent_id))
        return enrollment_status(progress)

    async def FinalizeEnrollment(
        self,
        request: pb.FinalizeEnrollmentRequest,
        context: ServicerContext[pb.FinalizeEnrollmentRequest, pb.FinalizeEnrollmentResponse],
    ) -> pb.FinalizeEnrollmentResponse:
        enrollment = self._enrollment()
        # Averaging stored embeddings, no model: store work.
        outcome = await self._store_pool.run(lambda: enrollment.finalize(request.agent_id))
        return pb.FinalizeEnrollmentResponse(
            voiceprint=voiceprint_info(outcome.voiceprint),
            replaced_previous=outcome.replaced_previous,
            rejected=[
                utterance_message(r.utterance, accepted=False, reason=r.reason)
                for r in outcome.rejected
            ],
        )

    async def DeleteAgent(
        self,
        request: pb.DeleteAgentRequest,
        context: ServicerContext[pb.DeleteAgentRequest, pb.DeleteAgentResponse],
    ) -> pb.DeleteAgentResponse:
        enrollment = self._enrollment()
        await self._store_pool.run(lambda: enrollment.delete(request.agent_id))
        return pb.DeleteAgentResponse()
