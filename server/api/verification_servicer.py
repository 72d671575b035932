"""gRPC servicer of VerificationService: protobuf <-> the domain's VerificationService. A
check runs the speaker model, so it goes to the bounded InferencePool."""

from __future__ import annotations

from grpc.aio import ServicerContext
from voxauth.v1 import voxauth_pb2 as pb
from voxauth.v1 import voxauth_pb2_grpc as pb_grpc

from server.api.convert import audio_input, verify_response
from server.api.readiness import Readiness
from server.api.retries import RequestDigest, once
from server.errors import InvalidAudioError
from server.runtime.inference import InferencePool
from server.runtime.requests import Receipt


class VerificationServicer(pb_grpc.VerificationServiceServicer):
    def __init__(self, inference: InferencePool, readiness: Readiness) -> None:
        self._inference = inference
        self._readiness = readiness

    async def Verify(
        self,
        request: pb.VerifyRequest,
        context: ServicerContext[pb.VerifyRequest, pb.VerifyResponse],
    ) -> pb.VerifyResponse:
        services = self._readiness.require()
        if not request.HasField("audio"):
            raise InvalidAudioError("audio is required", field="audio")
        audio = audio_input(request.audio)

        # A retry must not count as a second attempt (throttling): its completion is
        # recorded right after the check.
        async def act(_: Receipt | None) -> tuple[pb.VerifyResponse, str]:
            result = await self._inference.run(
                lambda: services.verification.verify(request.agent_id, audio)
            )
            return verify_response(result), request.agent_id

        return await once(
            services.requests,
            "Verify",
            request.request_id,
            RequestDigest.of(request),
            pb.VerifyResponse,
            act,
        )
