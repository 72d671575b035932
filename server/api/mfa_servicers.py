"""gRPC servicers for the MFA provider (AssuranceService) and for administrators
(AdminService): protobuf <-> domain calls, nothing more."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from importlib.metadata import version
from typing import Any

from voxauth.v1 import admin_pb2, admin_pb2_grpc, assurances_pb2, assurances_pb2_grpc
from voxauth.v1 import shifts_pb2 as spb

from server.api.access import caller_identity
from server.api.servicers import Readiness, timestamp
from server.api.shift_servicer import shift_message
from server.config import ServerConfig
from server.runtime.clock import Clock
from server.security.audit import cef_lines, jsonl_lines, read_chain
from server.validation import validate_agent_id, validate_text


class AssuranceServicer(assurances_pb2_grpc.AssuranceServiceServicer):
    def __init__(self, readiness: Readiness) -> None:
        self._readiness = readiness

    async def GetJwks(
        self, request: assurances_pb2.GetJwksRequest, context: Any
    ) -> assurances_pb2.Jwks:
        desk = self._readiness.require().assurances
        return assurances_pb2.Jwks(json=await asyncio.to_thread(desk.jwks_json))

    async def GetAssurance(
        self, request: assurances_pb2.GetAssuranceRequest, context: Any
    ) -> assurances_pb2.Assurance:
        desk = self._readiness.require().assurances
        record = await asyncio.to_thread(desk.latest, request.shift_id)
        return assurances_pb2.Assurance(
            token=record.token,
            token_id=record.token_id,
            issued_at=timestamp(record.issued_at),
            expires_at=timestamp(record.expires_at),
            shift_id=record.shift_id,
            agent_id=record.agent_id,
        )


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, readiness: Readiness, config: ServerConfig, clock: Clock) -> None:
        self._readiness = readiness
        self._config = config
        self._clock = clock

    async def EnableVerification(
        self, request: admin_pb2.EnableVerificationRequest, context: Any
    ) -> admin_pb2.EnableVerificationResponse:
        reason = validate_text(request.reason, "reason", 512)
        agent_id = validate_agent_id(request.agent_id)
        throttle = self._readiness.require().throttle
        by, now = caller_identity().name, self._clock.now()
        await asyncio.to_thread(throttle.re_enable, agent_id, reason=reason, by=by, now=now)
        return admin_pb2.EnableVerificationResponse()

    async def ExportAudit(
        self, request: admin_pb2.ExportAuditRequest, context: Any
    ) -> AsyncIterator[admin_pb2.AuditRecordText]:
        store = self._readiness.require().store
        records = read_chain(store)
        if request.format == admin_pb2.AUDIT_FORMAT_CEF:
            lines = cef_lines(records, version("voxauth"))
        else:
            lines = jsonl_lines(records)
        # A page at a time off the event loop: the log can be long, memory stays bounded.
        while page := await asyncio.to_thread(lambda: list(itertools.islice(lines, 1000))):
            for line in page:
                yield admin_pb2.AuditRecordText(line=line)

    async def UnlockShift(self, request: admin_pb2.UnlockShiftRequest, context: Any) -> spb.Shift:
        reason = validate_text(request.reason, "reason", 512)
        shifts = self._readiness.require().shifts
        record = await shifts.unlock(request.shift_id, f"{reason} (by {caller_identity().name})")
        return shift_message(record)

    async def GetConfiguration(
        self, request: admin_pb2.GetConfigurationRequest, context: Any
    ) -> admin_pb2.Configuration:
        return admin_pb2.Configuration(json=self._config.as_json())

    async def RotateSigningKey(
        self, request: admin_pb2.RotateSigningKeyRequest, context: Any
    ) -> admin_pb2.RotateSigningKeyResponse:
        desk = self._readiness.require().assurances
        return admin_pb2.RotateSigningKeyResponse(key_id=await asyncio.to_thread(desk.rotate))
