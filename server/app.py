"""Assembles and runs the gRPC server: store, model, servicers, health, reflection, shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from datetime import timedelta

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from voxauth.v1 import admin_pb2, admin_pb2_grpc, assurances_pb2, assurances_pb2_grpc
from voxauth.v1 import shifts_pb2 as spb
from voxauth.v1 import shifts_pb2_grpc as spb_grpc
from voxauth.v1 import voxauth_pb2 as pb
from voxauth.v1 import voxauth_pb2_grpc as pb_grpc

from enrollment.service import EnrollmentService
from models.ecapa import EcapaEmbedder
from models.embedder import SpeakerEmbedder
from models.fetch import default_model_dir
from server.api.access import (
    AccessInterceptor,
    CredentialResolver,
    DevelopmentResolver,
    IdentityResolver,
    TokenRegistry,
)
from server.api.interceptors import ErrorMappingInterceptor
from server.api.jwks_http import JwksHttpServer
from server.api.mfa_servicers import AdminServicer, AssuranceServicer
from server.api.servicers import EnrollmentServicer, Readiness, Services, VerificationServicer
from server.api.shift_servicer import ShiftServicer
from server.config import MfaConfig, ServerConfig, TransportConfig
from server.errors import ConfigurationError, VoxauthError
from server.pipeline.analysis import VoiceAnalyser
from server.pipeline.channel import Channel
from server.pipeline.speech import QualityThresholds, SileroSpeechDetector
from server.runtime.clock import Clock, SystemClock
from server.runtime.inference import InferencePool
from server.scoring.scorer import Scorer, ScoringModel
from server.security.assurance_desk import AssuranceDesk
from server.security.assurances import AssurancePolicy, SigningKeyCipher, SigningKeyring
from server.security.audit import AuditKey
from server.security.certificates import server_credentials
from server.security.config_audit import record_configuration
from server.security.crypto import VoiceprintCipher
from server.shifts.service import ShiftService
from server.storage.interface import Store
from server.storage.sqlite import open_store
from server.verification.retention import expire_unused_voiceprints
from server.verification.service import VerificationService
from server.verification.throttling import VerificationThrottle

log = logging.getLogger(__name__)

_RETENTION_PERIOD_SECONDS = 86_400.0

SERVICE_NAMES = (
    pb.DESCRIPTOR.services_by_name["EnrollmentService"].full_name,
    pb.DESCRIPTOR.services_by_name["VerificationService"].full_name,
    spb.DESCRIPTOR.services_by_name["ShiftService"].full_name,
    assurances_pb2.DESCRIPTOR.services_by_name["AssuranceService"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
)


def _resolver(transport: TransportConfig) -> IdentityResolver:
    if transport.insecure_development:
        return DevelopmentResolver()
    tokens = TokenRegistry.load(transport.tokens_file) if transport.tokens_file else None
    return CredentialResolver(tokens)


def _listen(
    server: grpc.aio.Server, transport: TransportConfig, address: str, *, client_auth: bool
) -> int:
    """Binds `address`: mutual TLS (or TLS with bearer tokens when `client_auth` is off), or
    plain text only in insecure development mode."""
    if transport.insecure_development:
        log.warning(
            "INSECURE DEVELOPMENT MODE: %s speaks plain text and every caller has every role. "
            "Never use this outside one developer's machine.",
            address,
        )
        port = server.add_insecure_port(address)
    else:
        paths = (transport.tls_certificate, transport.tls_private_key, transport.client_ca)
        if None in paths:
            raise ConfigurationError(
                "TLS is required: set VOXAUTH_TLS_CERT, VOXAUTH_TLS_KEY and "
                "VOXAUTH_TLS_CLIENT_CA (`voxauth certs init` makes a development set), or run "
                "`voxauth serve --insecure-dev` on a development machine"
            )
        certificate, private_key, client_ca = (p for p in paths if p is not None)
        credentials = server_credentials(
            certificate, private_key, client_ca, require_client_auth=client_auth
        )
        port = server.add_secure_port(address, credentials)
    if not port:
        raise OSError(f"cannot listen on {address}")
    return int(port)


def _assurance_policy(config: MfaConfig) -> AssurancePolicy:
    return AssurancePolicy(
        issuer=config.issuer,
        token_lifetime=timedelta(seconds=config.token_lifetime_seconds),
        key_rotation_interval=timedelta(days=config.key_rotation_days),
    )


class VoxauthServer:
    """One running voxauth server. `start()` binds the port at once and reports NOT_SERVING on
    the health service until the model is loaded; `stop()` drains in-flight calls."""

    def __init__(
        self,
        config: ServerConfig,
        key: bytes,
        *,
        previous_keys: tuple[bytes, ...] = (),
        load_embedder: Callable[[], SpeakerEmbedder] | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.config = config
        self._key = key
        self._previous_keys = previous_keys
        self._load_embedder = load_embedder or (
            lambda: EcapaEmbedder.load(
                config.model_dir or default_model_dir(),
                workers=config.inference.workers,
                threads=config.inference.threads,
            )
        )
        self._clock = clock or SystemClock()
        self._readiness = Readiness()
        self._health = health.aio.HealthServicer()
        self._pool = InferencePool(config.inference)
        self._store: Store | None = None
        self._shifts: ShiftService | None = None
        self._assurances: AssuranceDesk | None = None
        self._jwks_http: JwksHttpServer | None = None
        self._retention: asyncio.Task[None] | None = None
        self._server: grpc.aio.Server | None = None
        self.port = 0
        self.token_port = 0
        self.jwks_port = 0

    async def start(self) -> int:
        # Opening the store (and the signing keys in it) first means a bad key or database
        # stops the start before any port is open.
        store = open_store(
            self.config.database_path,
            VoiceprintCipher(self._key, self._previous_keys),
            audit_key=AuditKey(self._key),
        )
        self._store = store
        keyring = await asyncio.to_thread(
            SigningKeyring.load,
            store,
            SigningKeyCipher(self._key, self._previous_keys),
            _assurance_policy(self.config.mfa),
            self._clock.now(),
        )
        self._assurances = AssuranceDesk(store, keyring, self.config.mfa.audience, self._clock)
        if await asyncio.to_thread(
            record_configuration, store, self.config.as_json(), self._clock.now()
        ):
            log.info("configuration differs from the last start: recorded in the audit log")
        transport = self.config.transport
        access = AccessInterceptor(_resolver(transport), store.append_audit, self._clock)
        max_bytes = self.config.audio.max_encoded_bytes
        server = grpc.aio.server(
            # Access first: an unknown or unauthorised caller reaches nothing else.
            interceptors=[access, ErrorMappingInterceptor()],
            options=[
                ("grpc.max_receive_message_length", max_bytes),
                ("grpc.max_send_message_length", 4 * 1024 * 1024),
                # Pings find softphones that vanished without closing their shift stream, so
                # the stream is detached instead of waiting forever.
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.keepalive_timeout_ms", 10_000),
                ("grpc.http2.max_pings_without_data", 0),
                ("grpc.keepalive_permit_without_calls", 1),
            ],
        )
        pb_grpc.add_EnrollmentServiceServicer_to_server(
            EnrollmentServicer(self.config.audio, self._pool, self._readiness), server
        )
        pb_grpc.add_VerificationServiceServicer_to_server(
            VerificationServicer(self._pool, self._readiness), server
        )
        spb_grpc.add_ShiftServiceServicer_to_server(ShiftServicer(self._readiness), server)
        assurances_pb2_grpc.add_AssuranceServiceServicer_to_server(
            AssuranceServicer(self._readiness), server
        )
        admin_pb2_grpc.add_AdminServiceServicer_to_server(
            AdminServicer(self._readiness, self.config, self._clock), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = _listen(server, transport, self.config.listen_address, client_auth=True)
        if transport.token_listen_address:
            self.token_port = _listen(
                server, transport, transport.token_listen_address, client_auth=False
            )
        await server.start()
        self._server = server
        if self.config.mfa.jwks_listen_address:
            host, port = self.config.mfa.jwks_listen_address.rsplit(":", 1)
            self._jwks_http = JwksHttpServer(self._assurances.jwks)
            self.jwks_port = await self._jwks_http.start(host, int(port))
        host = self.config.listen_address.rsplit(":", 1)[0]
        log.info("voxauth listening on %s:%d (loading the speaker model)", host, self.port)
        try:
            await self._load_model(store, self._assurances)
        except BaseException:
            await self.stop(grace=0)
            raise
        self._retention = asyncio.create_task(self._expire_voiceprints(store), name="retention")
        return self.port

    async def _expire_voiceprints(self, store: Store) -> None:
        """Voiceprints unused for longer than the retention period go: now, then daily."""
        while True:
            try:
                await asyncio.to_thread(
                    expire_unused_voiceprints, store, self.config.retention, self._clock.now()
                )
            except VoxauthError as error:
                log.error("voiceprint expiry failed: %s", error.message)
            await self._clock.sleep_until(self._clock.monotonic() + _RETENTION_PERIOD_SECONDS)

    async def _load_model(self, store: Store, assurances: AssuranceDesk) -> None:
        started = asyncio.get_running_loop().time()
        embedder = await self._pool.run(self._load_embedder)
        detector = await self._pool.run(SileroSpeechDetector)
        analyser = VoiceAnalyser(embedder, detector, QualityThresholds(), self.config.audio)
        # Missing or mismatched cohort and calibration files stop the start here, clearly.
        scoring = await self._pool.run(
            lambda: ScoringModel.load(self.config.scoring, embedder.model_id)
        )
        scorer = Scorer(
            scoring, self.config.scoring, voiceprints=lambda: store.voiceprints(embedder.model_id)
        )
        now = self._clock.now
        throttle = VerificationThrottle(store, self.config.throttle)
        verification = VerificationService(
            store, analyser, self.config.verification, scorer, now, throttle
        )
        self._shifts = ShiftService(
            store,
            verification,
            analyser,
            detector,
            self._pool,
            self.config.shifts,
            self._clock,
            assurances,
        )
        self._readiness.serve(
            Services(
                enrollment=EnrollmentService(store, analyser, self.config.enrollment, now),
                verification=verification,
                shifts=self._shifts,
                assurances=assurances,
                throttle=throttle,
                store=store,
            )
        )
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        elapsed = asyncio.get_running_loop().time() - started
        log.info(
            "speaker model %s loaded in %.1f s; serving (target false-match rate %g, "
            "cohort of %d voices%s)",
            embedder.model_id,
            elapsed,
            self.config.scoring.target_fmr,
            len(scoring.cohort(Channel.WIDEBAND)),
            " and the enrolled agents" if self.config.scoring.cohort_includes_agents else "",
        )

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        await self._health.set("", status)
        for name in SERVICE_NAMES:
            await self._health.set(name, status)

    async def stop(self, grace: float | None = None) -> None:
        """Graceful: NOT_SERVING first so balancers drain, then in-flight calls finish."""
        await self._health.enter_graceful_shutdown()
        if self._retention is not None:
            self._retention.cancel()
        if self._server is not None:
            await self._server.stop(self.config.shutdown_grace_seconds if grace is None else grace)
        if self._jwks_http is not None:
            await self._jwks_http.stop()
        self._readiness.withdraw()
        if self._shifts is not None:
            await self._shifts.close()
        self._pool.shutdown()
        if self._store is not None:
            self._store.close()
        log.info("voxauth stopped")

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


async def serve_until_signalled(server: VoxauthServer) -> None:
    """Runs until SIGTERM or SIGINT, then stops gracefully."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await server.start()
    await stopping.wait()
    log.info("shutdown requested; draining in-flight calls")
    await server.stop()
