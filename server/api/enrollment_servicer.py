"""gRPC servicer of EnrollmentService: protobuf <-> the domain's EnrollmentService.

Calls that run the speaker model go to the bounded InferencePool; calls that only read or write
the store go to the StorePool, so a queue of model work never holds them up. Domain errors
propagate to the ErrorMappingInterceptor, which picks the status code.

The audio of every call is claimed from the server's AudioBudget before it is held: a stream's
pieces are decoded as they arrive (server/pipeline/decode.py, AudioStream), so a stream holds
its decoded samples (or, for WAV and FLAC, its file) and nothing else, and a call the budget
cannot hold ends RESOURCE_EXHAUSTED at once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from grpc.aio import ServicerContext
from voxauth.v1 import voxauth_pb2 as pb
from voxauth.v1 import voxauth_pb2_grpc as pb_grpc

from enrollment.listing import DEFAULT_PAGE_SIZE, AgentFilter
from enrollment.service import EnrollmentService, FinalizeOutcome, ReviewOutcome
from server.api.convert import (
    agent_message,
    agent_summary,
    audio_encoding,
    enrollment_states,
    enrollment_status,
    held_voiceprint_message,
    utterance_message,
    utterance_outcome_message,
    voiceprint_info,
)
from server.api.page_tokens import PageTokens
from server.api.readiness import Readiness
from server.api.retries import RequestDigest, in_unit, once
from server.api.streams import idle_limited
from server.config import AudioLimits, StreamLimits
from server.errors import InvalidAudioError
from server.pipeline.decode import AudioStream
from server.records import AgentRecord
from server.runtime.audio_budget import AudioBudget, AudioReservation
from server.runtime.clock import Clock
from server.runtime.inference import InferencePool
from server.runtime.requests import Receipt
from server.runtime.store_pool import StorePool
from server.security.identity import caller_identity

AudioResponse = pb.AddEnrollmentAudioResponse


class EnrollmentServicer(pb_grpc.EnrollmentServiceServicer):
    def __init__(
        self,
        limits: AudioLimits,
        inference: InferencePool,
        store_pool: StorePool,
        readiness: Readiness,
        budget: AudioBudget,
        streams: StreamLimits,
        clock: Clock,
        page_token_key: bytes | None = None,
    ) -> None:
        self._limits = limits
        self._streams = streams
        self._clock = clock
        self._inference = inference
        self._store_pool = store_pool
        self._readiness = readiness
        self._budget = budget
        self._page_tokens = PageTokens(page_token_key)

    def _enrollment(self) -> EnrollmentService:
        return self._readiness.require().enrollment

    async def CreateAgent(
        self,
        request: pb.CreateAgentRequest,
        context: ServicerContext[pb.CreateAgentRequest, pb.Agent],
    ) -> pb.Agent:
        services = self._readiness.require()

        def message(agent: AgentRecord) -> pb.Agent:
            return agent_message(agent, enrolled=False, passive=request.passive_enrollment)

        async def act(receipt: Receipt | None) -> tuple[pb.Agent, str]:
            agent = await self._store_pool.run(
                lambda: services.enrollment.create_agent(
                    request.agent_id,
                    request.display_name,
                    request.consent_reference,
                    in_unit(receipt, message, lambda agent: agent.agent_id),
                    passive=request.passive_enrollment,
                )
            )
            return message(agent), agent.agent_id

        return await once(
            services.requests,
            "CreateAgent",
            request.request_id,
            RequestDigest.of(request),
            pb.Agent,
            act,
        )

    async def AddEnrollmentAudio(
        self,
        request: pb.AddEnrollmentAudioRequest,
        context: ServicerContext[pb.AddEnrollmentAudioRequest, AudioResponse],
    ) -> AudioResponse:
        self._enrollment()
        if not request.HasField("audio"):
            raise InvalidAudioError("audio is required", field="audio")
        with self._budget.reserve() as reservation:
            # The message, and the copy of its bytes that decoding reads, live to the end of
            # the call.
            reservation.claim(2 * request.audio.ByteSize())
            stream = self._stream(request.audio.encoding, request.audio.sample_rate_hz, reservation)
            stream.feed(request.audio.data, held_elsewhere=True)
            return await self._add_once(
                request.agent_id, stream, reservation, request.request_id, RequestDigest.of(request)
            )

    async def StreamEnrollmentAudio(
        self,
        request_iterator: AsyncIterator[pb.EnrollmentAudioChunk],
        context: ServicerContext[pb.EnrollmentAudioChunk, AudioResponse],
    ) -> AudioResponse:
        with self._budget.reserve() as reservation:
            agent_id = request_id = ""
            stream: AudioStream | None = None
            digest = RequestDigest()
            async for chunk in self._idle_limited(request_iterator):
                digest.add(chunk)
                if stream is None:
                    agent_id, request_id = chunk.agent_id, chunk.request_id
                    stream = self._stream(chunk.encoding, chunk.sample_rate_hz, reservation)
                # Checked and decoded piece by piece, so an endless stream is cut off at the
                # length limit, and one the budget cannot hold at once, not buffered first.
                stream.feed(chunk.data)
            if stream is None:
                raise InvalidAudioError("the stream carried no audio", field="audio.data")
            return await self._add_once(agent_id, stream, reservation, request_id, digest.digest())

    def _stream(
        self,
        encoding: pb.AudioEncoding.ValueType,
        sample_rate_hz: int,
        reservation: AudioReservation,
    ) -> AudioStream:
        return AudioStream(
            audio_encoding(encoding),
            sample_rate_hz,
            max_seconds=self._limits.max_seconds,
            max_encoded_bytes=self._limits.max_encoded_bytes,
            reservation=reservation,
        )

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

    async def _add_once(
        self,
        agent_id: str,
        audio: AudioStream,
        reservation: AudioReservation,
        request_id: str,
        digest: bytes,
    ) -> AudioResponse:
        services = self._readiness.require()
        enrollment = services.enrollment

        # Its completion is recorded just after the utterance's unit of work (the response
        # holds the progress, read after it).
        async def act(receipt: Receipt | None) -> tuple[AudioResponse, str]:
            outcome = await self._inference.run(
                reservation.held_by(lambda: enrollment.add_utterance(agent_id, audio))
            )
            progress = await self._store_pool.run(lambda: enrollment.progress(agent_id))
            response = AudioResponse(
                utterance=utterance_outcome_message(outcome), status=enrollment_status(progress)
            )
            return response, progress.agent.agent_id

        return await once(
            services.requests,
            "AddEnrollmentAudio",
            request_id,
            digest,
            AudioResponse,
            act,
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
        services = self._readiness.require()

        async def act(receipt: Receipt | None) -> tuple[pb.FinalizeEnrollmentResponse, str]:
            # Averaging stored embeddings, no model: store work.
            outcome = await self._store_pool.run(
                lambda: services.enrollment.finalize(
                    request.agent_id,
                    in_unit(receipt, _finalized, lambda outcome: outcome.voiceprint.agent_id),
                )
            )
            return _finalized(outcome), outcome.voiceprint.agent_id

        return await once(
            services.requests,
            "FinalizeEnrollment",
            request.request_id,
            RequestDigest.of(request),
            pb.FinalizeEnrollmentResponse,
            act,
        )

    async def ReviewVoiceprint(
        self,
        request: pb.ReviewVoiceprintRequest,
        context: ServicerContext[pb.ReviewVoiceprintRequest, pb.ReviewVoiceprintResponse],
    ) -> pb.ReviewVoiceprintResponse:
        services = self._readiness.require()
        by = caller_identity().name

        async def act(receipt: Receipt | None) -> tuple[pb.ReviewVoiceprintResponse, str]:
            outcome = await self._store_pool.run(
                lambda: services.enrollment.review(
                    request.agent_id,
                    approve=request.approve,
                    reason=f"{request.reason} (by {by})" if request.reason else "",
                    record_completion=in_unit(
                        receipt, _reviewed, lambda outcome: outcome.held.voiceprint.agent_id
                    ),
                )
            )
            return _reviewed(outcome), outcome.held.voiceprint.agent_id

        return await once(
            services.requests,
            "ReviewVoiceprint",
            request.request_id,
            RequestDigest.of(request),
            pb.ReviewVoiceprintResponse,
            act,
        )

    async def DeleteAgent(
        self,
        request: pb.DeleteAgentRequest,
        context: ServicerContext[pb.DeleteAgentRequest, pb.DeleteAgentResponse],
    ) -> pb.DeleteAgentResponse:
        services = self._readiness.require()

        async def act(receipt: Receipt | None) -> tuple[pb.DeleteAgentResponse, str]:
            # The response names nobody: it is kept in clear, and outlives the agent.
            await self._store_pool.run(
                lambda: services.enrollment.delete(
                    request.agent_id, in_unit(receipt, lambda _: pb.DeleteAgentResponse(), _nobody)
                )
            )
            return pb.DeleteAgentResponse(), ""

        return await once(
            services.requests,
            "DeleteAgent",
            request.request_id,
            RequestDigest.of(request),
            pb.DeleteAgentResponse,
            act,
        )

    async def ListAgents(
        self,
        request: pb.ListAgentsRequest,
        context: ServicerContext[pb.ListAgentsRequest, pb.ListAgentsResponse],
    ) -> pb.ListAgentsResponse:
        services = self._readiness.require()
        states = enrollment_states(request.states)
        wanted = AgentFilter.of(
            states,
            request.voiceprint_older_than_days,
            request.voiceprint_expires_within_days,
            request.agent_id_prefix,
        )
        # The filters as the token is bound to them: a token is good for the listing it
        # came from only.
        scope = repr(
            (
                sorted(state.name for state in states),
                request.voiceprint_older_than_days,
                request.voiceprint_expires_within_days,
                request.agent_id_prefix,
            )
        )
        caller, now = caller_identity().name, self._clock.now()
        after = (
            self._page_tokens.open(request.page_token, caller=caller, scope=scope, now=now)
            if request.page_token
            else None
        )
        size = request.page_size or DEFAULT_PAGE_SIZE
        page = await self._store_pool.run(
            lambda: services.agents.page(wanted, after=after, size=size, now=now)
        )
        return pb.ListAgentsResponse(
            agents=[agent_summary(listing) for listing in page.agents],
            next_page_token=""
            if page.last_agent_id is None
            else self._page_tokens.issue(page.last_agent_id, caller=caller, scope=scope, now=now),
        )


def _finalized(outcome: FinalizeOutcome) -> pb.FinalizeEnrollmentResponse:
    response = pb.FinalizeEnrollmentResponse(
        voiceprint=voiceprint_info(outcome.voiceprint),
        replaced_previous=outcome.replaced_previous,
        rejected=[
            utterance_message(r.utterance, accepted=False, reason=r.reason)
            for r in outcome.rejected
        ],
    )
    if outcome.held is not None:
        response.held.CopyFrom(held_voiceprint_message(outcome.held))
    return response


def _reviewed(outcome: ReviewOutcome) -> pb.ReviewVoiceprintResponse:
    return pb.ReviewVoiceprintResponse(
        voiceprint=voiceprint_info(outcome.held.voiceprint),
        approved=outcome.approved,
        replaced_previous=outcome.replaced_previous,
    )


def _nobody(_: object) -> str:
    return ""
