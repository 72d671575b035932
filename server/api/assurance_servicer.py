"""gRPC servicer of AssuranceService, for the MFA provider: protobuf <-> the AssuranceDesk."""

from __future__ import annotations

from grpc.aio import ServicerContext
from voxauth.v1 import assurances_pb2 as apb
from voxauth.v1 import assurances_pb2_grpc as apb_grpc

from server.api.convert import timestamp
from server.api.readiness import Readiness
from server.runtime.store_pool import StorePool
from server.security.assurance_desk import Introspection
from server.security.assurances import InactiveReason

_INACTIVE_REASON: dict[InactiveReason, apb.InactiveReason.ValueType] = {
    InactiveReason.MALFORMED: apb.INACTIVE_REASON_MALFORMED,
    InactiveReason.SIGNATURE_INVALID: apb.INACTIVE_REASON_SIGNATURE_INVALID,
    InactiveReason.NOT_YET_VALID: apb.INACTIVE_REASON_NOT_YET_VALID,
    InactiveReason.EXPIRED: apb.INACTIVE_REASON_EXPIRED,
    InactiveReason.REVOKED_SHIFT_ENDED: apb.INACTIVE_REASON_REVOKED_SHIFT_ENDED,
    InactiveReason.REVOKED_SHIFT_LOCKED: apb.INACTIVE_REASON_REVOKED_SHIFT_LOCKED,
    InactiveReason.SHIFT_ERASED: apb.INACTIVE_REASON_SHIFT_ERASED,
}


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

    async def IntrospectAssurance(
        self,
        request: apb.IntrospectAssuranceRequest,
        context: ServicerContext[apb.IntrospectAssuranceRequest, apb.AssuranceIntrospection],
    ) -> apb.AssuranceIntrospection:
        desk = self._readiness.require().assurances
        return _introspection(await self._store_pool.run(lambda: desk.introspect(request.token)))


def _introspection(found: Introspection) -> apb.AssuranceIntrospection:
    if found.claims is not None:
        claims = found.claims
        return apb.AssuranceIntrospection(
            active=True,
            agent_id=claims.agent_id,
            shift_id=claims.shift_id,
            audience=claims.audience,
            token_id=claims.token_id,
            issued_at=timestamp(claims.issued_at),
            expires_at=timestamp(claims.expires_at),
        )
    assert found.inactive_reason is not None
    answer = apb.AssuranceIntrospection(
        active=False, inactive_reason=_INACTIVE_REASON[found.inactive_reason]
    )
    if found.revocation is not None:
        answer.revoked_at.CopyFrom(timestamp(found.revocation.revoked_at))
    return answer
