"""gRPC servicer of AdminService, for administrators: protobuf <-> domain calls, nothing more.
None of these calls runs the model: what touches the store runs on the StorePool. A mutating
call's request id (server/api/retries.py) has its completion recorded right after the call."""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator
from datetime import UTC
from importlib.metadata import version

from grpc.aio import ServicerContext
from voxauth.v1 import admin_pb2
from voxauth.v1 import admin_pb2_grpc as admin_grpc
from voxauth.v1 import shifts_pb2 as spb

from enrollment.watchlist import WatchlistService
from server.api.convert import audio_input, shift_message, timestamp
from server.api.readiness import Readiness
from server.api.retries import RequestDigest, once
from server.config import ServerConfig
from server.errors import InvalidAudioError, InvalidRequestError, ServiceNotReadyError
from server.records import WatchlistEntry
from server.runtime.clock import Clock
from server.runtime.inference import InferencePool
from server.runtime.requests import Receipt
from server.runtime.store_pool import StorePool
from server.security.audit import cef_lines, jsonl_lines, read_chain
from server.security.identity import caller_identity
from server.validation import validate_agent_id, validate_text


class AdminServicer(admin_grpc.AdminServiceServicer):
    def __init__(
        self,
        readiness: Readiness,
        config: ServerConfig,
        clock: Clock,
        store_pool: StorePool,
        inference: InferencePool,
    ) -> None:
        self._readiness = readiness
        self._config = config
        self._clock = clock
        self._store_pool = store_pool
        self._inference = inference

    def _watchlist(self) -> WatchlistService:
        watchlist = self._readiness.require().watchlist
        if watchlist is None:
            raise ServiceNotReadyError("the watchlist is not available on this server")
        return watchlist

    async def AddWatchlistEntry(
        self,
        request: admin_pb2.AddWatchlistEntryRequest,
        context: ServicerContext[admin_pb2.AddWatchlistEntryRequest, admin_pb2.WatchlistEntry],
    ) -> admin_pb2.WatchlistEntry:
        watchlist = self._watchlist()
        if not request.HasField("audio"):
            raise InvalidAudioError("audio is required", field="audio")
        if not request.HasField("expires_at"):
            raise InvalidRequestError("expires_at is required", field="expires_at")
        audio = audio_input(request.audio)
        expires_at = request.expires_at.ToDatetime(tzinfo=UTC)
        by = caller_identity().name
        entry = await self._inference.run(
            lambda: watchlist.add(request.label, request.legal_basis, expires_at, audio, by=by)
        )
        return _entry_message(entry)

    async def ListWatchlist(
        self,
        request: admin_pb2.ListWatchlistRequest,
        context: ServicerContext[admin_pb2.ListWatchlistRequest, admin_pb2.ListWatchlistResponse],
    ) -> admin_pb2.ListWatchlistResponse:
        watchlist = self._watchlist()
        entries = await self._store_pool.run(watchlist.entries)
        return admin_pb2.ListWatchlistResponse(entries=[_entry_message(e) for e in entries])

    async def DeleteWatchlistEntry(
        self,
        request: admin_pb2.DeleteWatchlistEntryRequest,
        context: ServicerContext[
            admin_pb2.DeleteWatchlistEntryRequest, admin_pb2.DeleteWatchlistEntryResponse
        ],
    ) -> admin_pb2.DeleteWatchlistEntryResponse:
        watchlist = self._watchlist()
        by = caller_identity().name
        await self._store_pool.run(lambda: watchlist.delete(request.entry_id, by=by))
        return admin_pb2.DeleteWatchlistEntryResponse()

    async def EnableVerification(
        self,
        request: admin_pb2.EnableVerificationRequest,
        context: ServicerContext[
            admin_pb2.EnableVerificationRequest, admin_pb2.EnableVerificationResponse
        ],
    ) -> admin_pb2.EnableVerificationResponse:
        reason = validate_text(request.reason, "reason", 512)
        agent_id = validate_agent_id(request.agent_id)
        services = self._readiness.require()
        by, now = caller_identity().name, self._clock.now()

        async def act(_: Receipt | None) -> tuple[admin_pb2.EnableVerificationResponse, str]:
            await self._store_pool.run(
                lambda: services.throttle.re_enable(agent_id, reason=reason, by=by, now=now)
            )
            return admin_pb2.EnableVerificationResponse(), ""

        return await once(
            services.requests,
            "EnableVerification",
            request.request_id,
            RequestDigest.of(request),
            admin_pb2.EnableVerificationResponse,
            act,
        )

    async def ExportAudit(
        self,
        request: admin_pb2.ExportAuditRequest,
        context: ServicerContext[admin_pb2.ExportAuditRequest, admin_pb2.AuditRecordText],
    ) -> AsyncIterator[admin_pb2.AuditRecordText]:
        store = self._readiness.require().store
        records = read_chain(store)
        if request.format == admin_pb2.AUDIT_FORMAT_CEF:
            lines = cef_lines(records, version("voxauth"))
        else:
            lines = jsonl_lines(records)
        # A page at a time off the event loop: the log can be long, memory stays bounded.
        while page := await self._store_pool.run(lambda: list(itertools.islice(lines, 1000))):
            for line in page:
                yield admin_pb2.AuditRecordText(line=line)

    async def UnlockShift(
        self,
        request: admin_pb2.UnlockShiftRequest,
        context: ServicerContext[admin_pb2.UnlockShiftRequest, spb.Shift],
    ) -> spb.Shift:
        reason = validate_text(request.reason, "reason", 512)
        services = self._readiness.require()
        caller = caller_identity()
        by, role = caller.name, ",".join(sorted(role.value for role in caller.roles))

        async def act(_: Receipt | None) -> tuple[spb.Shift, str]:
            record = await services.shifts.unlock(request.shift_id, reason, by=by, role=role)
            return shift_message(record), record.agent_id

        return await once(
            services.requests,
            "UnlockShift",
            request.request_id,
            RequestDigest.of(request),
            spb.Shift,
            act,
        )

    async def GetConfiguration(
        self,
        request: admin_pb2.GetConfigurationRequest,
        context: ServicerContext[admin_pb2.GetConfigurationRequest, admin_pb2.Configuration],
    ) -> admin_pb2.Configuration:
        document = json.loads(self._config.as_json())
        services = self._readiness.current()
        if services is not None:
            # Reads the voiceprints when the local thresholds are due: off the event loop.
            thresholds = await self._store_pool.run(services.verification.scoring_thresholds)
            calibrated = services.verification.longest_calibrated()
            document["scoring_thresholds"] = {
                t.condition.value: {
                    "shipped_normalized_threshold": round(t.shipped, 4),
                    "local_normalized_threshold": None if t.local is None else round(t.local, 4),
                    "applied_normalized_threshold": round(t.applied, 4),
                    "agents": t.agents,
                    "local_comparisons": t.comparisons,
                    # Longer speech is judged by the calibration's rule, not measured.
                    "longest_calibrated_test_seconds": round(calibrated[t.condition][0], 2),
                    "longest_calibrated_voiceprint_seconds": round(calibrated[t.condition][1], 2),
                }
                for t in thresholds
            }
        return admin_pb2.Configuration(json=json.dumps(document, sort_keys=True, indent=2))

    async def RotateSigningKey(
        self,
        request: admin_pb2.RotateSigningKeyRequest,
        context: ServicerContext[
            admin_pb2.RotateSigningKeyRequest, admin_pb2.RotateSigningKeyResponse
        ],
    ) -> admin_pb2.RotateSigningKeyResponse:
        services = self._readiness.require()

        async def act(_: Receipt | None) -> tuple[admin_pb2.RotateSigningKeyResponse, str]:
            key_id = await self._store_pool.run(services.assurances.rotate)
            return admin_pb2.RotateSigningKeyResponse(key_id=key_id), ""

        return await once(
            services.requests,
            "RotateSigningKey",
            request.request_id,
            RequestDigest.of(request),
            admin_pb2.RotateSigningKeyResponse,
            act,
        )


def _entry_message(entry: WatchlistEntry) -> admin_pb2.WatchlistEntry:
    return admin_pb2.WatchlistEntry(
        entry_id=entry.entry_id,
        label=entry.label,
        legal_basis=entry.legal_basis,
        added_at=timestamp(entry.added_at),
        expires_at=timestamp(entry.expires_at),
        model_id=entry.model_id,
        net_speech_seconds=entry.net_speech_seconds,
    )
