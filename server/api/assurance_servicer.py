"""gRPC servicer of AssuranceService, for the MFA provider: protobuf <-> the AssuranceDesk."""

from __future__ import annotations

from grpc.aio import ServicerContext
from voxauth.v1 import assurances_pb2 as apb
from voxauth.v1 import assurances_pb2_grpc as apb_grpc

from server.api.convert import timestamp
from server.api.readiness import Readiness
from server.runtime.store_pool import StorePool


class AssuranceServicer(apb_grpc.AssuranceServiceServicer):
    def __init__(self, readiness: Readiness, store_pool: StorePool) -> None:
        self._readiness = readiness
        self._store_pool = store_pool

    async def GetJwks(
        self, request: apb.GetJwksRequest, context: ServicerContext[apb.GetJwksRequest, apb.Jwks]
    ) -> apb.Jwks:
        desk = self._readiness.require().assurances
        # The keyring's lock is held while a rotation writes the store: wait off the loop.
        return apb.Jwks(json=await self._store_pool.run(desk.jwks_json))

    async def GetAssurance(
        self,
        request: apb.GetAssuranceRequest,
        context: ServicerContext[apb.GetAssuranceRequest, apb.Assurance],
    ) -> apb.Assurance:
        desk = self._readiness.require().assurances
        record = await self._store_pool.run(lambda: desk.latest(request.shift_id))
        return apb.Assurance(
            token=record.token,
            token_id=record.token_id,
            issued_at=timestamp(record.issued_at),
            expires_at=timestamp(record.expires_at),
            shift_id=record.shift_id,
            agent_id=record.agent_id,
        )
